"""LLaVA-format data: the dataset, the image resize policies and the padding collator.

A LLaVA JSON file (a list, or JSON lines when the name ends in ``.jsonl``) holds records
``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "..."}, ...]}``. ``"image"`` is a file name relative to ``image_folder`` or a list of
them (multi-image: one ``<image>`` per file, in order; each image's visual tokens go to its
placeholder). ``"video"`` (instead of ``"image"``) is a video given as its frames: a list of
frame file names relative to ``image_folder``, or the name of a directory there whose image
files (``.png .jpg .jpeg .bmp .webp``, in natural name order: ``2.png`` before ``10.png``) are
the frames. Its conversation holds ONE ``<image>`` (LLaVA-Video's convention), which becomes
the tokens of every frame, frame after frame: to the model a video is several images, each
frame encoded alone. Records without either are text-only.

Resize policies (``image_resize``): ``"fixed"`` (LLaVA-1.5: ``image_aspect_ratio`` padding, then
the image processor's resize and crop to the tower's square size; every image gives
``num_image_tokens`` tokens; items carry ``pixel_values [n, 3, S, S]``) and ``"native"``: aspect
ratio kept, downscaled only when over ``max_pixels`` pixels, each side then rounded to a multiple
of the tower's patch size (:func:`native_size`); items carry a list of ``[3, H_i, W_i]`` images,
their ``visual_grids`` ``(H_i / patch, W_i / patch)``, and each image's token count is the
projector's ``tokens_for_grid`` of its grid.

One policy for bad data: every record is checked when the dataset is built (malformed JSON line,
not a dict, missing / malformed ``conversations``, turns that do not alternate human / gpt from
a human turn (a ``system`` turn, an unknown role), malformed image / video field, both given,
``<image>`` count not matching the images (one per image, one per video), a one-turn record
(nothing to train on), missing image / frame file; under the native policy an image whose
header cannot be read or whose aspect ratio it cannot fit; and, tokenised up to its first
answer token and its last image token, a record whose answers ``max_length`` would cut off
entirely (no token to train on) or whose image tokens it would cut). A bad record is skipped
and counted in ``bad_records``, and ONE warning at the end of construction names each (record
index and id or line, field, reason); ``strict=True`` raises ``ValueError`` with the same
report instead; a dataset left with no record is an error (naming ``--model_max_length`` when
that is why). What can only fail when read (an image that cannot be decoded) raises
``ValueError`` naming the record and field; the dataset warns once for that record, adds it
to ``bad_records`` and serves the next good record, then and on every later read of it
(``strict=True``: the error propagates). The chat_template template needs a tokenizer with a
chat template: a ``ValueError`` at construction otherwise.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .conversation import (IGNORE_INDEX, IMAGE_PLACEHOLDER, TEMPLATE_NAMES, get_template,
                           tokenize_conversation, truncation_problem)

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


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def record_visuals(rec: dict, image_folder: Path | None) -> tuple[str, list[str]]:
    """``(field, files)``: the record's images (field ``"image"``) or video frames (``"video"``)
    as file names relative to ``image_folder`` (``("image", [])`` for a text-only record). A
    video directory is listed here. Raises ``ValueError`` naming the field when malformed."""
    video = rec.get("video")
    if video is None:
        images = rec.get("image")
        if images is None:
            return "image", []
        if isinstance(images, str):
            return "image", [images]
        if isinstance(images, list) and images and all(isinstance(x, str) for x in images):
            return "image", list(images)
        raise ValueError(f"'image' must be a file name or a non-empty list of them, got "
                         f"{images!r}")
    if rec.get("image") is not None:
        raise ValueError("has both 'image' and 'video' (give one)")
    if isinstance(video, list) and video and all(isinstance(x, str) for x in video):
        return "video", list(video)
    if not isinstance(video, str):
        raise ValueError(f"'video' must be a directory of frames or a non-empty list of frame "
                         f"file names, got {video!r}")
    if image_folder is None:
        raise ValueError("has a 'video' but no image_folder was given")
    folder = image_folder / video
    if not folder.is_dir():
        raise ValueError(f"'video' {video!r} is not a directory of frames under image_folder "
                         f"(a video file must be converted to frame images)")
    frames = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                    key=_natural_key)
    if not frames:
        raise ValueError(f"'video' directory {video!r} holds no frame images "
                         f"({' '.join(FRAME_SUFFIXES)})")
    return "video", [f"{video}/{f}" for f in frames]


def record_problem(rec, image_folder: Path | None, template: str) -> str | None:
    """Why ``rec`` cannot be trained on, or None when it can (cheap checks, no decoding; the
    turns' roles and lengths are checked by the dataset, with the tokenizer:
    :func:`~models.mllm.conversation.truncation_problem`)."""
    if not isinstance(rec, dict):
        return f"not a dict ({type(rec).__name__})"
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
    try:
        field, files = record_visuals(rec, image_folder)
    except ValueError as e:
        return str(e)
    n_ph = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conv)
    if field == "video" and n_ph != 1:
        return (f"'video': {n_ph} {IMAGE_PLACEHOLDER} placeholder(s) in 'conversations' but a "
                f"video takes exactly one (its frames' tokens go there)")
    if field == "image" and n_ph != len(files):
        return (f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(files)} image(s) in "
                f"'image'")
    if files:
        if image_folder is None:
            return f"has an '{field}' but no image_folder was given"
        missing = [f"{field}[{j}] {x!r}" for j, x in enumerate(files)
                   if not (image_folder / x).is_file()]
        if missing:
            return f"missing file(s): {', '.join(missing)}"
    return None


def native_size(width: int, height: int, max_pixels: int, patch: int) -> tuple[int, int]:
    """``(width, height)`` of the ``native`` policy: the aspect ratio kept, downscaled (never
    up) so that ``width * height <= max_pixels``, then each side rounded to the nearest multiple
    of ``patch`` (at least one patch), or down to one when nearest rounding would exceed
    ``max_pixels``. Each side ends within one patch of the exactly scaled size. Raises
    ``ValueError`` when no such size fits ``max_pixels`` (an extreme aspect ratio: the short
    side cannot go below one patch)."""
    for name, v in (("width", width), ("height", height), ("max_pixels", max_pixels),
                    ("patch", patch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w, h = width * scale, height * scale
    rw, rh = (max(patch, round(v / patch) * patch) for v in (w, h))
    if rw * rh > max_pixels:
        rw, rh = (max(patch, math.floor(v / patch) * patch) for v in (w, h))
    if rw * rh > max_pixels:
        raise ValueError(f"a {width}x{height} image does not fit max_pixels={max_pixels} with "
                         f"sides that are multiples of the patch size {patch} (aspect ratio "
                         f"too extreme: at least {rw}x{rh})")
    return rw, rh


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


def processor_kwargs(processor) -> dict:
    """Call arguments that switch off an image processor's own padding (``do_pad``, e.g.
    ``LlavaImageProcessor``'s pad to a square): the resize policies pad (or not) themselves,
    so each does what it says whatever processor a checkpoint ships."""
    return {"do_pad": False} if getattr(processor, "do_pad", None) else {}


def fixed_pixels(processor, image, image_aspect_ratio: str) -> torch.Tensor:
    """One PIL image as ``[3, S, S]`` under the fixed policy: ``"pad"`` (expand to a square
    with the processor's mean colour, as ints, then the processor) or ``"crop"`` (the
    processor alone: resize + centre crop); the processor's own padding is off either way."""
    if image_aspect_ratio == "pad":
        mean = getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)
        image = expand2square(image, tuple(int(255 * m) for m in mean))
    elif image_aspect_ratio != "crop":
        raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got "
                         f"{image_aspect_ratio!r}")
    return processor(images=image, return_tensors="pt",
                     **processor_kwargs(processor))["pixel_values"][0]


IMAGE_RESIZE = ("fixed", "native")


class LLaVADataset(Dataset):
    """Items: ``{"input_ids", "labels", "pixel_values", "id"}`` (+ ``"visual_grids"``).

    ``image_resize="fixed"``: ``pixel_values`` ``[n_images, 3, H, W]`` or None.
    ``image_resize="native"`` (needs ``max_pixels``, ``patch_size`` and ``tokens_for_grid``, the
    model's :meth:`~models.mllm.model.MLLM.packed_tokens_for_grid`): ``pixel_values`` a list of
    ``[3, H_i, W_i]`` (empty for text-only records) and ``visual_grids`` their ``(H_i / patch,
    W_i / patch)``. A video's frames count as its images (module docstring).

    ``bad_records`` lists ``(where, reason)`` of the records skipped at construction
    (``where`` = "record I" or "line N"), then of those that failed when read (each once);
    ``modality_lengths`` is a length estimate per record (words + the image tokens), positive
    with images and negative without, never 0 (for ``--group_by_modality_length``).
    ``image_aspect_ratio`` (fixed policy only; None = "pad"): ``"pad"`` (LLaVA-1.5: pad to a
    square with the processor's mean colour, then the processor) or ``"crop"`` (the processor
    alone: resize + centre crop).
    """

    def __init__(self, data, image_folder, tokenizer, image_processor, *, image_token_id: int,
                 num_image_tokens: int, template: str = "vicuna_v1",
                 max_length: int | None = 2048, image_aspect_ratio: str | None = None,
                 strict: bool = False, image_resize: str = "fixed",
                 max_pixels: int | None = None, patch_size: int | None = None,
                 tokens_for_grid=None):
        if image_resize not in IMAGE_RESIZE:
            raise ValueError(f"image_resize must be one of {IMAGE_RESIZE}, got {image_resize!r}")
        if image_resize == "fixed":
            image_aspect_ratio = "pad" if image_aspect_ratio is None else image_aspect_ratio
            if image_aspect_ratio not in ("pad", "crop"):
                raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got "
                                 f"{image_aspect_ratio!r}")
            if max_pixels is not None:
                raise ValueError("max_pixels applies to image_resize='native' only")
        else:
            if image_aspect_ratio is not None:
                raise ValueError(f"image_aspect_ratio applies to image_resize='fixed' only "
                                 f"(native keeps the aspect ratio), got {image_aspect_ratio!r}")
            for name, v in (("max_pixels", max_pixels), ("patch_size", patch_size)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"image_resize='native' needs {name} as a positive int, "
                                     f"got {v!r}")
            if max_pixels < patch_size * patch_size:
                raise ValueError(f"max_pixels={max_pixels} is below one patch "
                                 f"({patch_size}x{patch_size})")
            if not callable(tokens_for_grid):
                raise ValueError("image_resize='native' needs tokens_for_grid (the model's "
                                 "packed_tokens_for_grid)")
        get_template(template)  # validates the name
        if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'chat_template' (--version chat_template) renders with "
                             f"the tokenizer's own chat template, and this tokenizer has no "
                             f"chat_template: pick another --version "
                             f"({', '.join(t for t in TEMPLATE_NAMES if t != 'chat_template')})")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer must have an eos_token (it closes every answer)")
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
        self.template, self.max_length = template, max_length
        self.image_aspect_ratio, self.image_resize = image_aspect_ratio, image_resize
        self.max_pixels, self.patch_size = max_pixels, patch_size
        self.tokens_for_grid, self.strict = tokens_for_grid, strict
        records, bad = load_llava_json(data)
        total = len(records) + len(bad)
        # the constant text parts (system prompt, template headers) are tokenised once
        encode = functools.lru_cache(maxsize=4096)(
            lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))
        kept, visuals, where, tokens, n_cut = [], [], [], [], 0
        for i, rec in enumerate(records):
            where_i = f"record {i}"
            if isinstance(rec, dict) and rec.get("id") is not None:
                where_i += f" (id {rec['id']!r})"
            why = record_problem(rec, self.image_folder, template)
            if why is None:
                vis = record_visuals(rec, self.image_folder)
                try:
                    counts = self._build_counts(*vis)
                    why = truncation_problem(tokenizer, rec["conversations"],
                                             image_token_id=self.image_token_id,
                                             num_image_tokens=counts, template=template,
                                             max_length=max_length, encode=encode)
                except ValueError as e:
                    why = str(e)
                n_cut += why is not None and "leaves no answer token" in why
            if why is None:
                kept.append(rec)
                visuals.append(vis)
                where.append(where_i)
                tokens.append(sum(counts))
            else:
                bad.append((where_i, why))
        self.bad_records = bad
        report = None
        if bad:
            listed = "; ".join(f"{w}: {r}" for w, r in bad[:_MAX_REPORTED])
            report = (f"{len(bad)} bad record(s) of {total} skipped: " + listed
                      + (" ..." if len(bad) > _MAX_REPORTED else ""))
            if strict:
                raise ValueError(report)
        if not kept:
            if n_cut == total:
                raise ValueError(f"max_length={max_length} (--model_max_length) leaves no answer "
                                 f"token in every record ({total}): nothing to train on; "
                                 f"raise --model_max_length. {report}")
            raise ValueError(f"the dataset has no usable records ({n_cut} with no answer token "
                             f"within max_length={max_length}, --model_max_length). {report}")
        if report:
            warnings.warn(report + f" ({len(kept)} records left)", stacklevel=2)
        self.records, self._visuals, self._where = kept, visuals, where
        self._image_tokens = tokens
        self._failed: dict[int, str] = {}  # index -> why, for records that failed when read

    def _build_counts(self, field: str, files: list[str]) -> list[int]:
        """The image tokens of each ``<image>`` of a record, when the dataset is built: fixed
        policy from ``num_image_tokens``; native from each image's size (its header only, no
        decoding). A video's one placeholder stands for all its frames."""
        if self.image_resize == "native":
            from PIL import Image
            counts = []
            for j, name in enumerate(files):
                try:
                    with Image.open(self.image_folder / name) as im:
                        size = im.size
                except Exception as e:  # noqa: BLE001 - any unreadable header is a bad file
                    raise ValueError(f"{field}[{j}] {name!r}: cannot read image: "
                                     f"{type(e).__name__}: {e}") from e
                try:
                    w, h = native_size(*size, self.max_pixels, self.patch_size)
                except ValueError as e:
                    raise ValueError(f"{field}[{j}] {name!r}: {e}") from e
                counts.append(int(self.tokens_for_grid((h // self.patch_size,
                                                        w // self.patch_size))))
        else:
            counts = [self.num_image_tokens] * len(files)
        return [sum(counts)] if field == "video" else counts

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Per record: words + image tokens, positive with images, negative without (never 0:
        the sign is the modality)."""
        out = []
        for rec, (_, files), n_img in zip(self.records, self._visuals, self._image_tokens):
            n = sum(len(t["value"].split()) for t in rec["conversations"])
            out.append(n + n_img if files else -max(1, n))
        return out

    def _open(self, name: str):
        from PIL import Image
        path = self.image_folder / name
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
            raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e

    def _pixels(self, image) -> torch.Tensor:
        """The fixed policy: ``[3, S, S]`` (:func:`fixed_pixels`)."""
        return fixed_pixels(self.image_processor, image, self.image_aspect_ratio)

    def _native_pixels(self, image) -> torch.Tensor:
        """The native policy: ``[3, H, W]`` at :func:`native_size`; the processor only rescales
        and normalises (its resize and crop are switched off)."""
        from PIL import Image
        size = native_size(*image.size, self.max_pixels, self.patch_size)
        if size != image.size:
            resample = getattr(self.image_processor, "resample", None)
            image = image.resize(size, Image.BICUBIC if resample is None else resample)
        return self.image_processor(images=image, do_resize=False, do_center_crop=False,
                                    return_tensors="pt",
                                    **processor_kwargs(self.image_processor))["pixel_values"][0]

    def load(self, idx: int) -> dict:
        """One item; raises ``ValueError`` naming the record and field when it cannot be used."""
        rec, (field, files) = self.records[idx], self._visuals[idx]
        pix = []
        for j, name in enumerate(files):
            try:
                image = self._open(name)
                pix.append(self._native_pixels(image) if self.image_resize == "native"
                           else self._pixels(image))
            except ValueError as e:
                raise ValueError(f"{self._where[idx]}: {field}[{j}] {name!r}: {e}") from e
        if self.image_resize == "native":
            p = self.patch_size
            grids = [(int(x.shape[1]) // p, int(x.shape[2]) // p) for x in pix]
            counts = [self.tokens_for_grid(g) for g in grids]
        else:
            if len({tuple(x.shape) for x in pix}) > 1:
                raise ValueError(f"{self._where[idx]}: '{field}': its images have different "
                                 f"sizes after preprocessing {[tuple(x.shape) for x in pix]}")
            counts = [self.num_image_tokens] * len(pix)
        per_placeholder = [sum(counts)] if field == "video" else counts
        try:
            enc = tokenize_conversation(self.tokenizer, rec["conversations"],
                                        image_token_id=self.image_token_id,
                                        num_image_tokens=per_placeholder,
                                        template=self.template, max_length=self.max_length)
        except ValueError as e:
            raise ValueError(f"{self._where[idx]}: 'conversations': {e}") from e
        item = {"input_ids": enc["input_ids"], "labels": enc["labels"], "id": rec.get("id", idx)}
        if self.image_resize == "native":
            item.update(pixel_values=pix, visual_grids=grids)
        else:
            item["pixel_values"] = torch.stack(pix) if pix else None
        return item

    def __getitem__(self, idx: int) -> dict:
        if self.strict:
            return self.load(idx)
        for k in range(len(self)):
            j = (idx + k) % len(self)
            if j in self._failed:  # reported when it first failed
                continue
            try:
                return self.load(j)
            except ValueError as e:
                self._failed[j] = str(e)
                self.bad_records.append((self._where[j], str(e)))
                warnings.warn(f"skipping a record (now and on every later read): {e}",
                              stacklevel=2)
        raise RuntimeError("every record of the dataset failed to load")


class Collator:
    """Pads a list of items into the model inputs ``{"input_ids", "attention_mask", "labels",
    "pixel_values"}`` (``padding_side`` "right" for training, "left" for generation); the
    images of the batch are concatenated in record order: ``pixel_values`` ``[N, 3, H, W]``
    for fixed-size items; for native-size items a list of ``[3, H_i, W_i]`` plus
    ``visual_grids`` (int64 ``[N, 2]``). None when the batch has no image."""

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
        # a CPU batch whatever the default device (the Trainer / accelerate moves it)
        batch = {"input_ids": torch.tensor(ids, device="cpu"),
                 "attention_mask": torch.tensor(mask, device="cpu"),
                 "labels": torch.tensor(labels, device="cpu")}
        packed = ["visual_grids" in it for it in items]
        if any(packed) and not all(packed):
            raise ValueError("items mix the fixed and native resize policies (only native "
                             "items carry 'visual_grids')")
        if all(packed):
            pix = [x for it in items for x in it["pixel_values"]]
            grids = [tuple(g) for it in items for g in it["visual_grids"]]
            batch.update(pixel_values=pix or None,
                         visual_grids=torch.tensor(grids, dtype=torch.long, device="cpu")
                         if pix else None)
        else:
            pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
            batch["pixel_values"] = torch.cat(pix) if pix else None
        return batch


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
