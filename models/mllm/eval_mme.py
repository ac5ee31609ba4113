"""MME evaluation: yes/no questions, two per image, scored as the MME toolkit does.

Questions: one file per category, ``<questions_dir>/<category>.txt``, lines
``image<TAB>question<TAB>answer`` (answer ``Yes`` / ``No``). Images are looked up as
``<image_root>/<category>/images/<image>``, ``<image_root>/<category>/<image>`` or
``<image_root>/<image>``. Results are written as the toolkit's input:
``<results_dir>/<category>.txt`` with lines ``image<TAB>question<TAB>answer<TAB>prediction``.

Scoring (MME ``eval_tool/calculation.py``): a prediction is ``yes`` / ``no`` when it is exactly
that (lower-cased, stripped), else when its first 4 characters contain ``yes`` / ``no``, else
``other`` (wrong). Per category: ``acc`` = % questions right, ``acc_plus`` = % images with both
questions right, ``score = acc + acc_plus`` (max 200). Perception = sum of the 10 perception
category scores (max 2000), cognition = sum of the 4 cognition ones (max 800).

    python -m models.eval_mme --model merged/ --questions_dir MME/questions \\
        --image_root MME/images --results_dir mme_results
    python -m models.eval_mme --score_only --results_dir mme_results
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")


def parse_prediction(pred: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``, as MME's ``parse_pred_ans``."""
    p = str(pred).lower().strip().replace("\n", " ")
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_category(rows) -> dict:
    """``rows``: ``(image, question, answer, prediction)`` tuples of one category."""
    by_image: dict[str, list[bool]] = defaultdict(list)
    n = right = 0
    for i, row in enumerate(rows):
        if len(row) != 4:
            raise ValueError(f"rows[{i}] must be (image, question, answer, prediction), got {row!r}")
        image, _, answer, pred = row
        gt = str(answer).lower().strip()
        if gt not in ("yes", "no"):
            raise ValueError(f"rows[{i}] answer must be Yes or No, got {answer!r}")
        ok = parse_prediction(pred) == gt
        by_image[image].append(ok)
        n += 1
        right += ok
    if n == 0:
        raise ValueError("rows is empty")
    acc = 100.0 * right / n
    acc_plus = 100.0 * sum(all(v) for v in by_image.values()) / len(by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "questions": n,
            "images": len(by_image)}


def score_mme(results: dict) -> dict:
    """``results``: ``{category: rows}``. Returns ``{"categories": {cat: score_category},
    "perception", "cognition", "total"}`` (sums of the category scores present)."""
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict {category: rows}")
    cats = {c: score_category(rows) for c, rows in results.items()}
    perception = sum(v["score"] for c, v in cats.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in cats.items() if c in COGNITION)
    return {"categories": cats, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


def read_category_file(path, with_prediction: bool) -> list[tuple]:
    rows = []
    width = 4 if with_prediction else 3
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != width:
                raise ValueError(f"{path}:{ln}: expected {width} tab-separated fields, "
                                 f"got {len(parts)}: {line!r}")
            rows.append(tuple(parts))
    return rows


def read_dir(path, with_prediction: bool) -> dict:
    path = Path(path)
    files = sorted(path.glob("*.txt"))
    if not files:
        raise ValueError(f"no <category>.txt files in {str(path)!r}")
    return {f.stem: read_category_file(f, with_prediction) for f in files}


def score_results_dir(results_dir) -> dict:
    return score_mme(read_dir(results_dir, with_prediction=True))


def _find_image(image_root: Path, category: str, image: str) -> Path:
    for p in (image_root / category / "images" / image, image_root / category / image,
              image_root / image):
        if p.is_file():
            return p
    raise FileNotFoundError(f"image {image!r} of category {category!r} not found under "
                            f"{str(image_root)!r}")


def run_mme(model, questions_dir, image_root, results_dir=None, *, batch_size: int = 8,
            max_new_tokens: int = 8, template: str = "vicuna_v1") -> dict:
    """Answer every question with ``model.chat`` (batched, left padding, greedy), write the
    results files when ``results_dir`` is given, and return :func:`score_mme`."""
    from PIL import Image
    questions = read_dir(questions_dir, with_prediction=False)
    image_root = Path(image_root)
    results = {}
    model.eval()
    for cat, rows in questions.items():
        out = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            images = []
            for image, _, _ in chunk:
                with Image.open(_find_image(image_root, cat, image)) as im:
                    images.append(im.convert("RGB"))
            preds = model.chat(images, [q for _, q, _ in chunk], template=template,
                               max_new_tokens=max_new_tokens)
            out += [(im, q, a, p.replace("\t", " ").replace("\n", " "))
                    for (im, q, a), p in zip(chunk, preds)]
        results[cat] = out
    if results_dir is not None:
        rd = Path(results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        for cat, rows in results.items():
            with open(rd / f"{cat}.txt", "w", encoding="utf-8") as f:
                f.writelines("\t".join(r) + "\n" for r in rows)
    return score_mme(results)


def format_scores(s: dict) -> str:
    lines = []
    for group, cats in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        present = [c for c in s["categories"] if c in cats]
        if present:
            lines.append(f"=========== {group} ===========  total score: {s[group.lower()]:.2f}")
            lines += [f"  {c:24s} score {s['categories'][c]['score']:7.2f}  acc "
                      f"{s['categories'][c]['acc']:6.2f}  acc+ {s['categories'][c]['acc_plus']:6.2f}"
                      for c in present]
    other = [c for c in s["categories"] if c not in PERCEPTION + COGNITION]
    lines += [f"  {c:24s} score {s['categories'][c]['score']:7.2f} (not an MME category)"
              for c in other]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.eval_mme", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="MLLM directory (MLLM.save_pretrained / train export) or a "
                                   "training checkpoint")
    p.add_argument("--questions_dir")
    p.add_argument("--image_root")
    p.add_argument("--results_dir")
    p.add_argument("--score_only", action="store_true", help="score an existing results_dir")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    a = p.parse_args(argv)
    if a.score_only:
        if not a.results_dir:
            p.error("--score_only needs --results_dir")
        scores = score_results_dir(a.results_dir)
    else:
        if not (a.model and a.questions_dir and a.image_root):
            p.error("--model, --questions_dir and --image_root are required")
        import torch
        from .model import MLLM_CONFIG, MLLM
        if (Path(a.model) / MLLM_CONFIG).is_file():
            model = MLLM.from_pretrained(a.model)
        else:
            from .train import load_checkpoint_model
            model = load_checkpoint_model(a.model)
        if torch.cuda.is_available():
            model.to("cuda", dtype=torch.bfloat16)
        scores = run_mme(model, a.questions_dir, a.image_root, a.results_dir,
                         batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                         template=a.template)
    print(json.dumps(scores, indent=2) if a.json else format_scores(scores))


if __name__ == "__main__":
    main(sys.argv[1:])
