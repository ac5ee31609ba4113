"""LLaVA-format data: the dataset and the padding collator.

A LLaVA JSON file (a list, or JSON lines when the name ends in ``.jsonl``) holds records
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "..."}, ...]}``. ``"image"`` is a file name relative to ``image_folder`` or a list of
them (multi-image: one ``<image>`` per file, in order; the images must share a size after
preprocessing, their visual tokens go to the ``<image>`` placeholders in order). Records
without ``"image"`` are text-only. Records with ``"video"`` are rejected (video is not
supported: convert it to a list of frame images).

One policy for bad data: every record is checked when the dataset is built (malformed JSON line,
not a dict, missing / malformed ``conversations``, non-string image field, ``<image>`` count not
matching the images, a one-turn record (nothing to train on), missing image file, video). A bad
record is skipped and counted, and ONE warning at the end of construction names each (index or
line, reason); ``strict=True`` raises ``ValueError`` with the same report instead. A record that
passes but fails when read (an image that cannot be decoded, a sequence that ``max_length``
would cut into its image tokens) is reported by name when read and replaced by the next good
record.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, get_template, tokenize_conversation

_MAX_REPORTED = 20


def load_llava_json(data) -> tuple[list, list[tuple[str, str]]]:
    """``(records, bad)`` from a path (JSON list, or JSON lines for ``*.jsonl``) or a list.

    ``bad`` holds ``(where, reason)`` for JSONL lines that do not parse (``where`` = "line N");
    a JSON file that does not parse raises ``ValueError`` naming the file.
    """
    bad: list[tuple[str, str]] = []
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data_path {str(path)!r} does not exist")
        with open(path) as f:
            if path.suffix == ".jsonl":
                records = []
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        bad.append((f"line {n}", f"not valid JSON ({e.msg})"))
                return records, bad
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"data_path {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise TypeError(f"data must be a path or a list of records, got {type(data).__name__}")
    return data, bad


def record_problem(rec, image_folder: Path | None, template: str) -> str | None:
    """Why ``rec`` cannot be trained on, or None when it can (cheap checks, no decoding)."""
    if not isinstance(rec, dict):
        return f"not a dict ({type(rec).__name__})"
    if rec.get("video") is not None:
        return "video records are not supported (give the frames as an 'image' list)"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "'conversations' must be a non-empty list"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) \
                or "from" not in turn:
            return f"conversations[{i}] must be a dict with 'from' and a string 'value'"
    if len(conv) < 2:
        return "one turn only: there is no answer to train on"
    if template == "plain" and len(conv) != 2:
        return f"the plain template takes one question and one answer, got {len(conv)} turns"
    images = rec.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not (isinstance(images, list) and images and all(isinstance(x, str) for x in images)):
        return f"'image' must be a file name or a non-empty list of them, got {images!r}"
    n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    if n_ph != len(images):
        return f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
    if images:
        if image_folder is None:
            return "has an image but no image_folder was given"
        missing = [x for x in images if not (image_folder / x).is_file()]
        if missing:
            return f"missing image file(s) {missing}"
    return None


def expand2square(image, background):
    """Pad a PIL image to a square, centred, with ``background`` (LLaVA's ``pad`` aspect ratio)."""
    from PIL import Image
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


class LLaVADataset(Dataset):
    """Items: ``{"input_ids", "labels", "pixel_values" ([n_images, 3, H, W] or None), "id"}``.

    ``bad_records`` lists ``(where, reason)`` of the records skipped at construction
    (``where`` = "record I" or "line N"); ``modality_lengths`` is a length estimate per record,
    positive with images and negative without (for ``--group_by_modality_length``).
    ``image_aspect_ratio``: ``"pad"`` (LLaVA-1.5: pad to a square with the processor's mean
    colour, then the processor) or ``"crop"`` (the processor alone: resize + centre crop).
    """

    def __init__(self, data, image_folder, tokenizer, image_processor, *, image_token_id: int,
                 num_image_tokens: int, template: str = "vicuna_v1",
                 max_length: int | None = 2048, image_aspect_ratio: str = "pad",
                 strict: bool = False):
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got "
                             f"{image_aspect_ratio!r}")
        get_template(template)  # validates the name
        records, bad = load_llava_json(data)
        total = len(records) + len(bad)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        kept = []
        for i, rec in enumerate(records):
            why = record_problem(rec, self.image_folder, template)
            if why is None:
                kept.append(rec)
            else:
                where = f"record {i}"
                if isinstance(rec, dict) and rec.get("id") is not None:
                    where += f" (id {rec['id']!r})"
                bad.append((where, why))
        self.bad_records = bad
        if bad:
            listed = "; ".join(f"{w}: {r}" for w, r in bad[:_MAX_REPORTED])
            report = (f"{len(bad)} bad record(s) of {total} skipped: " + listed
                      + (" ..." if len(bad) > _MAX_REPORTED else ""))
            if strict:
                raise ValueError(report)
            warnings.warn(report + f" ({len(kept)} records left)", stacklevel=2)
        if not kept:
            raise ValueError("the dataset has no usable records")
        self.records = kept
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
        self.template, self.max_length = template, max_length
        self.image_aspect_ratio = image_aspect_ratio

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        out = []
        for rec in self.records:
            n = sum(len(t["value"].split()) for t in rec["conversations"])
            n_img = len(self._images(rec))
            out.append(n + n_img * self.num_image_tokens if n_img else -n)
        return out

    @staticmethod
    def _images(rec) -> list[str]:
        im = rec.get("image")
        return [] if im is None else [im] if isinstance(im, str) else list(im)

    def _pixels(self, name: str) -> torch.Tensor:
        from PIL import Image
        path = self.image_folder / name
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
            raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
        if self.image_aspect_ratio == "pad":
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            image = expand2square(image, tuple(int(255 * m) for m in mean))
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def load(self, idx: int) -> dict:
        """One item; raises ``ValueError`` naming the file / record when it cannot be used."""
        rec = self.records[idx]
        pix = [self._pixels(name) for name in self._images(rec)]
        if len({tuple(p.shape) for p in pix}) > 1:
            raise ValueError(f"record {rec.get('id', idx)!r}: its images have different sizes "
                             f"after preprocessing {[tuple(p.shape) for p in pix]}")
        enc = tokenize_conversation(self.tokenizer, rec["conversations"],
                                    image_token_id=self.image_token_id,
                                    num_image_tokens=self.num_image_tokens,
                                    template=self.template, max_length=self.max_length)
        return {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "pixel_values": torch.stack(pix) if pix else None, "id": rec.get("id", idx)}

    def __getitem__(self, idx: int) -> dict:
        for k in range(len(self)):
            j = (idx + k) % len(self)
            try:
                return self.load(j)
            except ValueError as e:
                warnings.warn(f"skipping record {self.records[j].get('id', j)!r}: {e}",
                              stacklevel=2)
        raise RuntimeError("every record of the dataset failed to load")


class Collator:
    """Pads a list of items into the model inputs ``{"input_ids", "attention_mask", "labels",
    "pixel_values"}`` (``padding_side`` "right" for training, "left" for generation); the
    images of the batch are concatenated in record order (``pixel_values`` ``[N, 3, H, W]``,
    None when the batch has none)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side

    def _pad(self, seq: list, n: int, value) -> list:
        return [value] * n + seq if self.padding_side == "left" else seq + [value] * n

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids, labels, mask = [], [], []
        for it in items:
            n = width - len(it["input_ids"])
            ids.append(self._pad(list(it["input_ids"]), n, self.pad_token_id))
            labels.append(self._pad(list(it["labels"]), n, IGNORE_INDEX))
            mask.append(self._pad([1] * len(it["input_ids"]), n, 0))
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels), "pixel_values": torch.cat(pix) if pix else None}


TOY_COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230),
              "yellow": (230, 220, 40)}
TOY_WORDS = [*TOY_COLORS, "color", "of", "the", "square", "is", "describe", "image", "shows",
             "a", "on", "black"]


def write_toy_dataset(folder, num_samples: int, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny LLaVA-format dataset written to ``folder``: coloured squares on black, each with a
    question about the colour (``data.json`` + ``images/``). Its words are ``TOY_WORDS``."""
    import random as _random

    import numpy as np
    from PIL import Image
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = _random.Random(seed)
    recs = []
    for i in range(num_samples):
        color = rng.choice(sorted(TOY_COLORS))
        arr = np.zeros((image_size, image_size, 3), np.uint8)
        x, y = rng.randrange(image_size // 2), rng.randrange(image_size // 2)
        arr[y:y + image_size // 2, x:x + image_size // 2] = TOY_COLORS[color]
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        q = rng.choice(["What color is the square?", "describe the image"])
        a = f"the square is {color}" if q.startswith("What") else f"the image shows a {color} square on black"
        recs.append({"id": i, "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                       {"from": "gpt", "value": a}]})
    with open(folder / "data.json", "w") as f:
        json.dump(recs, f)
    return folder / "data.json"
