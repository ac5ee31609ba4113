"""Digit-grid VQA from real handwriting: scikit-learn's ``load_digits`` (1797 8x8 scans, shipped
with scikit-learn, no download) composed into ``rows x cols`` grids, with questions that need

* ``local``: one cell's digit -- "which digit is in row 2 , column 3 ?" -> ``"7"``;
* ``count``: a global count -- "how many 7s are there ?" -> ``"2"`` (asked about a digit that
  is present half the time, any digit otherwise, so ``"0"`` is a common answer);
* ``relation``: a spatial yes/no between two digits that each occur once -- "is the 4 left of
  the 9 ?" / "is the 4 above the 9 ?" -> ``"yes"`` / ``"no"`` (strictly smaller column / row;
  balanced yes / no);
* ``neighbor``: the digit next to a digit that occurs once -- "what digit is right of the 5 ?" /
  "what digit is below the 5 ?" -> ``"3"``.

Every answer is one word computed from the composed labels. Files are LLaVA JSON (what
:class:`models.mllm.data.LLaVADataset` reads) plus ``images/*.png`` (grayscale, ``8 * rows * upsample``
by ``8 * cols * upsample`` px):

* ``train.json``: one record per training image with one question of each type as a multi-turn
  conversation (types in random order), so one image pass trains four answers;
* ``test.json``: one single-turn record per (test image, question type), with ``"qtype"`` and
  ``"answer"`` fields for scoring.

Split: the first 80 % of the ``load_digits`` samples (in its fixed order) compose the training
images, the last 20 % the test images, so test images use handwriting samples never seen in
training. Composition uses a fixed seed (it is a dataset).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

QTYPES = ("read", "local", "count", "relation", "neighbor")
DIGIT_WORDS = [str(d) for d in range(10)]
WORDS = [*DIGIT_WORDS, *(f"{d}s" for d in range(10)), "which", "digit", "is", "in", "row",
         "column", ",", "?", "how", "many", "are", "there", "the", "left", "right", "above",
         "below", "of", "what", "yes", "no", "read", "digits", "by", "."]
TRAIN_FRACTION = 0.8


def digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 8, 8] uint8 in 0..255, labels [N])`` of ``"train"`` (first 80 % of
    ``load_digits``) or ``"test"`` (last 20 %)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cut = int(round(TRAIN_FRACTION * len(d.target)))
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    imgs = np.clip(d.images[sl] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return imgs, d.target[sl].astype(np.int64)


def compose(images: np.ndarray, labels: np.ndarray, grid: tuple[int, int], rng: random.Random,
            upsample: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One grid image: ``(pixels [8*rows*upsample, 8*cols*upsample] uint8, labels [rows, cols],
    sample indices [rows, cols])``; cells drawn uniformly from ``images``."""
    rows, cols = grid
    idx = np.array([rng.randrange(len(images)) for _ in range(rows * cols)]).reshape(rows, cols)
    pix = np.zeros((8 * rows, 8 * cols), np.uint8)
    for r in range(rows):
        for c in range(cols):
            pix[8 * r:8 * r + 8, 8 * c:8 * c + 8] = images[idx[r, c]]
    if upsample > 1:
        pix = pix.repeat(upsample, 0).repeat(upsample, 1)
    return pix, labels[idx], idx


def _unique_cells(lab: np.ndarray) -> dict[int, tuple[int, int]]:
    vals, counts = np.unique(lab, return_counts=True)
    return {int(v): tuple(int(i) for i in np.argwhere(lab == v)[0])
            for v, n in zip(vals, counts) if n == 1}


def make_question(qtype: str, lab: np.ndarray, rng: random.Random) -> dict | None:
    """``{"qtype", "question", "answer"}`` for label grid ``lab``, or None when the grid cannot
    carry a question of this type (e.g. no digit occurs exactly once)."""
    rows, cols = lab.shape
    if qtype == "read":  # every cell, in reading order: the whole image's detail, one hop each
        return {"qtype": qtype, "question": "read the digits row by row .",
                "answer": " ".join(str(int(d)) for d in lab.ravel())}
    if qtype == "local":
        r, c = rng.randrange(rows), rng.randrange(cols)
        return {"qtype": qtype, "question": f"which digit is in row {r + 1} , column {c + 1} ?",
                "answer": str(int(lab[r, c]))}
    if qtype == "count":
        d = int(rng.choice(lab.ravel().tolist())) if rng.random() < 0.5 else rng.randrange(10)
        return {"qtype": qtype, "question": f"how many {d}s are there ?",
                "answer": str(int((lab == d).sum()))}
    uniq = _unique_cells(lab)
    if qtype == "relation":
        want = rng.random() < 0.5
        axis = rng.choice(("left", "above"))
        pairs = [(a, b) for a in uniq for b in uniq if a != b and
                 ((uniq[a][1] < uniq[b][1]) if axis == "left" else (uniq[a][0] < uniq[b][0]))
                 == want]
        if not pairs:
            return None
        a, b = rng.choice(sorted(pairs))
        return {"qtype": qtype, "question": f"is the {a} {axis} of the {b} ?",
                "answer": "yes" if want else "no"}
    if qtype == "neighbor":
        opts = [(a, d) for a, (r, c) in uniq.items() for d in ("right", "below")
                if (d == "right" and c + 1 < cols) or (d == "below" and r + 1 < rows)]
        if not opts:
            return None
        a, d = rng.choice(sorted(opts))
        r, c = uniq[a]
        r, c = (r, c + 1) if d == "right" else (r + 1, c)
        return {"qtype": qtype, "question": f"what digit is {d} of the {a} ?",
                "answer": str(int(lab[r, c]))}
    raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")


def _questions(lab: np.ndarray, rng: random.Random, qtypes=QTYPES) -> list[dict] | None:
    qs = [make_question(t, lab, rng) for t in qtypes]
    return None if any(q is None for q in qs) else qs


def _conv(q: dict, first: bool, question_first: bool = False) -> list[dict]:
    if not first:
        text = q["question"]
    elif question_first:
        text = q["question"] + "\n<image>"
    else:
        text = "<image>\n" + q["question"]
    return [{"from": "human", "value": text}, {"from": "gpt", "value": q["answer"]}]


def build_digit_dataset(folder, *, n_train: int = 2000, n_test: int = 200, grid=(3, 3),
                        upsample: int = 1, seed: int = 0, multi_turn: bool = True,
                        question_first: bool = False, qtypes=QTYPES) -> dict:
    """Write ``train.json``, ``test.json`` and ``images/`` under ``folder``.

    Returns ``{"train", "test", "image_folder", "image_size", "grid", "words", "chance"}``:
    paths, the image size in px, the vocabulary to build a tokenizer from (``WORDS``) and the
    per-type chance levels of the test set (``{"uniform", "majority", "majority_answer"}``:
    1 / number of possible answers, and the accuracy of always giving the most frequent test
    answer).
    """
    from PIL import Image
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    grid = (int(grid[0]), int(grid[1]))
    out = {}
    n_first = len(digit_split("train")[1])
    for split, n, off in (("train", n_train, 0), ("test", n_test, n_first)):
        imgs, labs = digit_split(split)
        rng = random.Random(f"{seed}-{split}")
        recs = []
        i = 0
        while i < n:
            pix, lab, idx = compose(imgs, labs, grid, rng, upsample)
            qs = _questions(lab, rng, tuple(qtypes))
            if qs is None:
                continue
            name = f"{split}_{i:05d}.png"
            Image.fromarray(pix, mode="L").save(folder / "images" / name)
            meta = {"labels": lab.tolist(), "digit_index": (idx + off).tolist()}
            if split == "train" and multi_turn:
                rng.shuffle(qs)
                conv = [t for j, q in enumerate(qs) for t in _conv(q, j == 0)]
                recs.append({"id": f"train_{i}", "image": name, "conversations": conv,
                             "qtypes": [q["qtype"] for q in qs], **meta})
            else:
                for q in qs:
                    recs.append({"id": f"{split}_{i}_{q['qtype']}", "image": name,
                                 "conversations": _conv(q, True, question_first),
                                 "qtype": q["qtype"],
                                 "answer": q["answer"], **meta})
            i += 1
        with open(folder / f"{split}.json", "w") as f:
            json.dump(recs, f)
        out[split] = folder / f"{split}.json"
        if split == "test":
            out["chance"] = chance_levels(recs)
    out.update(image_folder=folder / "images", grid=grid, words=list(WORDS),
               image_size=(8 * grid[0] * upsample, 8 * grid[1] * upsample))
    return out


def possible_answers(qtype: str, grid) -> list[str]:
    n = int(grid[0]) * int(grid[1])
    if qtype == "relation":
        return ["yes", "no"]
    if qtype == "count":
        return [str(k) for k in range(n + 1)]
    return list(DIGIT_WORDS)  # "read" is scored per digit


def score(qtype: str, predicted: str, answer: str) -> float:
    """Exact match, except ``"read"``: the fraction of cells whose digit is right (in order)."""
    if qtype != "read":
        return float(predicted == answer)
    want, got = answer.split(), predicted.split()
    return sum(a == b for a, b in zip(want, got)) / len(want)


def chance_levels(test_records: list[dict]) -> dict:
    """Per question type: ``uniform`` (1 / possible answers), ``majority`` (accuracy of the
    most frequent test answer) and that answer."""
    out = {}
    for t in QTYPES:
        ans = [r["answer"] for r in test_records if r["qtype"] == t]
        if not ans:
            continue
        grid = np.array(test_records[0]["labels"]).shape
        if t == "read":  # per digit: the most frequent test digit in every cell
            ans = [d for a in ans for d in a.split()]
        best = max(sorted(set(ans)), key=ans.count)
        out[t] = {"uniform": 1.0 / len(possible_answers(t, grid)),
                  "majority": ans.count(best) / len(ans), "majority_answer": best}
    return out


def batches(records: list[dict], image_folder, batch_size: int):
    """Yield ``(records, RGB PIL images, first questions)`` in chunks of ``batch_size``."""
    from PIL import Image
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        images = []
        for r in chunk:
            with Image.open(Path(image_folder) / r["image"]) as im:
                images.append(im.convert("RGB"))
        yield chunk, images, [r["conversations"][0]["value"] for r in chunk]
