"""LLaVA-format data: the dataset, the padding collator and the global-batch sampler.

A LLaVA JSON file is a list of ``{"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`` (``"image"`` relative to
``image_folder``; samples without ``"image"`` are text-only).

Bad data never crashes an epoch: missing image files are found when the dataset is built
(``on_missing="skip"``: one warning naming every missing file, samples dropped and counted;
``"error"``: ``FileNotFoundError`` naming them); an image that exists but cannot be decoded (or a
sample too long to keep its image tokens) is reported by file name when it is read, replaced by
the next good sample, and counted in the batch's ``"skipped"`` field.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .conversation import IGNORE_INDEX, tokenize_conversation


def load_llava_json(data) -> list[dict]:
    """A list of records from a path (JSON list, or JSON-lines when it ends in .jsonl) or a list."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"data_path {str(path)!r} does not exist")
        with open(path) as f:
            if path.suffix == ".jsonl":
                data = [json.loads(line) for line in f if line.strip()]
            else:
                data = json.load(f)
    if not isinstance(data, list):
        raise TypeError(f"data must be a path or a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "conversations" not in rec:
            raise ValueError(f"data record {i} must be a dict with 'conversations', got {rec!r}")
    return data


class LLaVADataset(Dataset):
    """Items: ``{"input_ids", "labels", "pixel_values" ([3, H, W] or None), "id", "skipped"}``."""

    def __init__(self, data, image_folder, tokenizer, image_processor, *, image_token_id: int,
                 num_image_tokens: int, template: str = "vicuna_v1",
                 max_length: int | None = 2048, on_missing: str = "skip"):
        if on_missing not in ("skip", "error"):
            raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
        records = load_llava_json(data)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        missing = []
        kept = []
        for rec in records:
            if rec.get("image") is not None:
                if self.image_folder is None:
                    raise ValueError("image_folder is required: the data has image samples")
                if not (self.image_folder / rec["image"]).is_file():
                    missing.append(str(rec["image"]))
                    continue
            kept.append(rec)
        self.missing_files = missing
        if missing:
            msg = (f"{len(missing)} image file(s) missing under {str(self.image_folder)!r}: "
                   f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
            if on_missing == "error":
                raise FileNotFoundError(msg)
            warnings.warn(msg + f" (skipped; {len(kept)} samples left)", stacklevel=2)
        if not kept:
            raise ValueError("the dataset has no usable samples")
        self.records = kept
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
        self.template, self.max_length = template, max_length

    def __len__(self) -> int:
        return len(self.records)

    def load(self, idx: int) -> dict:
        """One item; raises ``ValueError`` naming the file for a bad image."""
        rec = self.records[idx]
        pixel_values = None
        if rec.get("image") is not None:
            from PIL import Image
            path = self.image_folder / rec["image"]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
                raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        enc = tokenize_conversation(self.tokenizer, rec["conversations"],
                                    image_token_id=self.image_token_id,
                                    num_image_tokens=self.num_image_tokens,
                                    template=self.template, max_length=self.max_length)
        n_img = 0 if pixel_values is None else 1
        if enc["num_images"] != n_img:
            raise ValueError(f"sample {rec.get('id', idx)!r} has {enc['num_images']} <image> "
                             f"placeholders and {n_img} image (one image per sample)")
        return {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "pixel_values": pixel_values, "id": rec.get("id", idx)}

    def __getitem__(self, idx: int) -> dict:
        skipped = 0
        for k in range(len(self)):
            j = (idx + k) % len(self)
            try:
                item = self.load(j)
            except ValueError as e:
                warnings.warn(f"skipping sample {self.records[j].get('id', j)!r}: {e}",
                              stacklevel=2)
                skipped += 1
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError("every sample of the dataset failed to load")


class Collator:
    """Pads a list of items into ``{"input_ids", "attention_mask", "labels", "pixel_values",
    "ids", "skipped", "num_images"}`` (``padding_side`` "right" for training, "left" for
    generation)."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids, labels, mask = [], [], []
        for it in items:
            n = width - len(it["input_ids"])
            pad = lambda seq, v: ([v] * n + seq) if self.padding_side == "left" else (seq + [v] * n)  # noqa: E731
            ids.append(pad(list(it["input_ids"]), self.pad_token_id))
            labels.append(pad(list(it["labels"]), IGNORE_INDEX))
            mask.append(pad([1] * len(it["input_ids"]), 0))
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels),
                "pixel_values": torch.stack(pix) if pix else None,
                "ids": [it["id"] for it in items],
                "skipped": sum(it.get("skipped", 0) for it in items), "num_images": len(pix)}


def global_batches(num_samples: int, *, global_batch: int, per_device_batch: int, world_size: int,
                   rank: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """This rank's micro-batches, grouped by optimizer step.

    Epoch ``e`` shuffles the indices with ``seed + e``; optimizer step ``s`` uses the global
    batch ``perm[s*G:(s+1)*G]`` (the last one wraps around to the start, so every step is full),
    of which rank ``r`` takes the ``r``-th contiguous slice of ``G / world_size`` samples, cut
    into ``accumulation = G / (per_device_batch * world_size)`` micro-batches. So the samples of
    a step do not depend on the world size, and ranks see disjoint samples.
    """
    if global_batch % (per_device_batch * world_size):
        raise ValueError(f"global_batch {global_batch} must be a multiple of per_device_batch "
                         f"{per_device_batch} x world_size {world_size}")
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_samples, generator=g).tolist()
    steps = math.ceil(num_samples / global_batch)
    while len(perm) < steps * global_batch:
        perm += perm[:steps * global_batch - len(perm)]
    per_rank = global_batch // world_size
    out = []
    for s in range(steps):
        mine = perm[s * global_batch + rank * per_rank: s * global_batch + (rank + 1) * per_rank]
        out.append([mine[i:i + per_device_batch] for i in range(0, per_rank, per_device_batch)])
    return out


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
