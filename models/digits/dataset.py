"""Digit-grid VQA from real handwriting: scikit-learn's ``load_digits`` (1797 8x8 scans, shipped
with scikit-learn, no download) composed into ``rows x cols`` grids, with questions that need

* ``read``: every digit in reading order -- "read the digits row by row ." -> ``"3 1 ... 7"``;
* ``row``: one row's digits, the row given as one position token -- "read row r2 ." -> ``"4 0 9 1"``;
* ``cell``: one cell's digit, the cell given as one position token -- "which digit is at r2c3 ?"
  -> ``"7"`` (a tiny LM only has to look the token up, not combine two words);
* ``local``: the same with the row and column as words -- "which digit is in row 2 , column 3 ?";
* ``count``: a global count -- "how many 7s are there ?" -> ``"2"`` (asked about a digit that
  is present half the time, any digit otherwise, so ``"0"`` is a common answer);
* ``relation``: a spatial yes/no between two digits that each occur once -- "is the 4 left of
  the 9 ?" / "is the 4 above the 9 ?" -> ``"yes"`` / ``"no"`` (strictly smaller column / row;
  balanced yes / no);
* ``neighbor``: the digit next to a digit that occurs once -- "what digit is right of the 5 ?" /
  "what digit is below the 5 ?" -> ``"3"``.

Layout: digit ``(r, c)`` is pasted with its top-left corner at ``(pitch * r + dy, pitch * c + dx)``,
``dy, dx`` drawn uniformly from ``0 .. pitch - 8`` per digit (random sub-cell offsets; recorded in
``"offsets"``), on a ``pitch * rows`` x ``pitch * cols`` canvas. With 4x4 digits on a 9 px pitch
(36 px) and the study's 3 px patches (12x12 grid), each digit sits at a random offset inside its
3x3-patch cell, and the projectors' windows (3x3 and 5x7 ParGo windows, 3x3 and 6x6 DeCo cells)
do not follow the cells: at most the 4 corner digits fit inside one window, none in a 6x6 DeCo
cell (tests/test_digits.py). No projector gets the layout for free.

Every answer is computed from the composed labels. Files are LLaVA JSON (what
:class:`models.mllm.data.LLaVADataset` reads) plus ``images/*.png`` (grayscale, ``pitch * rows *
upsample`` by ``pitch * cols * upsample`` px):

* ``train.json``: one record per training image with one question of each type (``train_repeats``
  of some) as a multi-turn conversation (in random order), so one image pass trains them all;
* ``test.json``: one single-turn record per (test image, question type), with ``"qtype"`` and
  ``"answer"`` fields for scoring;
* ``val.json``: like ``test.json``, for choosing learning rates (never the test set).

Split: the first 70 % of the ``load_digits`` samples (in its fixed order) compose the training
images, the next 10 % the validation images, the last 20 % the test images, so validation and
test images use handwriting samples never seen in training. Composition uses a fixed seed (it is
a dataset).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

QTYPES = ("read", "row", "cell", "local", "count", "relation", "neighbor")
PER_DIGIT = ("read", "row")  # answers of several digits, scored per digit
DIGIT = 8  # px side of a load_digits scan
MAX_GRID = 9
DIGIT_WORDS = [str(d) for d in range(10)]
POSITION_WORDS = [f"r{r}" for r in range(1, MAX_GRID + 1)] + [
    f"r{r}c{c}" for r in range(1, MAX_GRID + 1) for c in range(1, MAX_GRID + 1)]
WORDS = [*DIGIT_WORDS, *(f"{d}s" for d in range(10)), "which", "digit", "is", "in", "row",
         "column", ",", "?", "how", "many", "are", "there", "the", "left", "right", "above",
         "below", "of", "what", "yes", "no", "read", "digits", "by", ".", "at",
         *POSITION_WORDS]
SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}  # of load_digits, in order


def split_range(split: str, n: int = 1797) -> range:
    """Indices of ``load_digits`` (``n`` samples) that compose ``split``'s images."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    lo, hi = SPLITS[split]
    return range(int(round(lo * n)), int(round(hi * n)))


def digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 8, 8] uint8 in 0..255, labels [N])`` of ``"train"`` (first 70 % of
    ``load_digits``), ``"val"`` (next 10 %) or ``"test"`` (last 20 %)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    rg = split_range(split, len(d.target))
    sl = slice(rg.start, rg.stop)
    imgs = np.clip(d.images[sl] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return imgs, d.target[sl].astype(np.int64)


def compose(images: np.ndarray, labels: np.ndarray, grid: tuple[int, int], rng: random.Random,
            upsample: int = 1, pitch: int = DIGIT):
    """One grid image: ``(pixels [pitch*rows*upsample, pitch*cols*upsample] uint8, labels
    [rows, cols], sample indices [rows, cols], offsets [rows, cols, 2] (dy, dx) in px before
    upsampling)``; cells drawn uniformly from ``images``, each pasted at a random offset
    ``0 .. pitch - 8`` inside its ``pitch`` x ``pitch`` cell."""
    rows, cols = grid
    if pitch < DIGIT:
        raise ValueError(f"pitch must be >= {DIGIT} px, got {pitch}")
    idx = np.array([rng.randrange(len(images)) for _ in range(rows * cols)]).reshape(rows, cols)
    off = np.array([rng.randrange(pitch - DIGIT + 1) for _ in range(2 * rows * cols)]
                   ).reshape(rows, cols, 2)
    pix = np.zeros((pitch * rows, pitch * cols), np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pitch * r + off[r, c, 0], pitch * c + off[r, c, 1]
            pix[y:y + DIGIT, x:x + DIGIT] = images[idx[r, c]]
    if upsample > 1:
        pix = pix.repeat(upsample, 0).repeat(upsample, 1)
    return pix, labels[idx], idx, off


def patch_labels(lab: np.ndarray, off: np.ndarray, pitch: int, patch: int,
                 upsample: int = 1) -> np.ndarray:
    """Per-patch targets ``[H / patch, W / patch]`` of a composed image for tower pretraining: the
    label of the digit whose 8x8 box covers most of the patch, or 10 (background) when no digit
    covers at least a quarter of it. ``patch`` in px of the (upsampled) image."""
    rows, cols = lab.shape
    h, w = pitch * rows * upsample, pitch * cols * upsample
    if h % patch or w % patch:
        raise ValueError(f"patch ({patch} px) must divide the image ({h}x{w} px)")
    area = np.zeros((rows * cols, h // patch, w // patch))
    edges_y = np.arange(0, h + 1, patch)
    edges_x = np.arange(0, w + 1, patch)
    for k, (r, c) in enumerate(np.ndindex(rows, cols)):
        y0 = (pitch * r + off[r, c, 0]) * upsample
        x0 = (pitch * c + off[r, c, 1]) * upsample
        oy = np.clip(np.minimum(edges_y[1:], y0 + DIGIT * upsample)
                     - np.maximum(edges_y[:-1], y0), 0, None)
        ox = np.clip(np.minimum(edges_x[1:], x0 + DIGIT * upsample)
                     - np.maximum(edges_x[:-1], x0), 0, None)
        area[k] = np.outer(oy, ox)
    best = area.argmax(0)
    out = lab.ravel()[best]
    return np.where(area.max(0) >= patch * patch / 4, out, 10)


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
    if qtype == "row":
        r = rng.randrange(rows)
        return {"qtype": qtype, "question": f"read row r{r + 1} .",
                "answer": " ".join(str(int(d)) for d in lab[r])}
    if qtype == "cell":
        r, c = rng.randrange(rows), rng.randrange(cols)
        return {"qtype": qtype, "question": f"which digit is at r{r + 1}c{c + 1} ?",
                "answer": str(int(lab[r, c]))}
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


def build_digit_dataset(folder, *, n_train: int = 2000, n_test: int = 200, n_val: int = 0,
                        grid=(3, 3), pitch: int = DIGIT, upsample: int = 1, seed: int = 0,
                        multi_turn: bool = True, question_first: bool = False, qtypes=QTYPES,
                        train_repeats: dict | None = None) -> dict:
    """Write ``train.json``, ``val.json`` (when ``n_val``), ``test.json`` and ``images/`` under
    ``folder``. ``train_repeats``: questions of a type per training image (default 1 each; e.g.
    ``{"cell": 4}`` asks four cells of every training image, in one conversation).

    Returns ``{"train", "val", "test", "image_folder", "image_size", "grid", "pitch", "words",
    "chance", "chance_val"}``: paths, the image size in px, the vocabulary to build a tokenizer
    from (``WORDS``) and the per-type chance levels of the test (validation) set
    (``{"uniform", "majority", "majority_answer"}``: 1 / number of possible answers, and the
    accuracy of always giving the most frequent answer).
    """
    from PIL import Image
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    grid = (int(grid[0]), int(grid[1]))
    if not (1 <= grid[0] <= MAX_GRID and 1 <= grid[1] <= MAX_GRID):
        raise ValueError(f"grid must be at most {MAX_GRID}x{MAX_GRID}, got {grid}")
    reps = {t: 1 for t in qtypes} | {t: int(k) for t, k in (train_repeats or {}).items()
                                     if t in qtypes}
    train_types = tuple(t for t in qtypes for _ in range(reps[t]))
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n <= 0 and split == "val":
            continue
        imgs, labs = digit_split(split)
        off0 = split_range(split).start
        rng = random.Random(f"{seed}-{split}")
        recs = []
        i = 0
        while i < n:
            pix, lab, idx, offs = compose(imgs, labs, grid, rng, upsample, pitch)
            qs = _questions(lab, rng, train_types if split == "train" else tuple(qtypes))
            if qs is None:
                continue
            name = f"{split}_{i:05d}.png"
            Image.fromarray(pix, mode="L").save(folder / "images" / name)
            meta = {"labels": lab.tolist(), "digit_index": (idx + off0).tolist(),
                    "offsets": offs.tolist(), "pitch": pitch}
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
        if split != "train":
            out["chance" if split == "test" else "chance_val"] = chance_levels(recs)
    out.update(image_folder=folder / "images", grid=grid, pitch=pitch, words=list(WORDS),
               image_size=(pitch * grid[0] * upsample, pitch * grid[1] * upsample))
    return out


def possible_answers(qtype: str, grid) -> list[str]:
    n = int(grid[0]) * int(grid[1])
    if qtype == "relation":
        return ["yes", "no"]
    if qtype == "count":
        return [str(k) for k in range(n + 1)]
    return list(DIGIT_WORDS)  # "read" / "row" are scored per digit


def score(qtype: str, predicted: str, answer: str) -> float:
    """Exact match, except ``"read"`` / ``"row"``: the fraction of cells whose digit is right
    (in order)."""
    if qtype not in PER_DIGIT:
        return float(predicted == answer)
    want, got = answer.split(), predicted.split()
    return sum(a == b for a, b in zip(want, got)) / len(want)


def chance_levels(test_records: list[dict]) -> dict:
    """Per question type: ``uniform`` (1 / possible answers), ``majority`` (accuracy of the
    most frequent answer) and that answer."""
    out = {}
    for t in QTYPES:
        ans = [r["answer"] for r in test_records if r["qtype"] == t]
        if not ans:
            continue
        grid = np.array(test_records[0]["labels"]).shape
        if t in PER_DIGIT:  # per digit: the most frequent digit in every cell
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
