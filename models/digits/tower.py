"""Pretraining of the study's tiny vision tower, then freezing it (both papers use a frozen,
pretrained tower; a 7B run would use CLIP / SigLIP, which knows nothing of 8x8 digits).

Objective: per-patch digit / background classification on the TRAINING images only -- a linear
head on the tower's last hidden state predicts, for every patch token, the label of the digit
that covers most of that patch (10 = background; :func:`models.digits.dataset.patch_labels`).
The head is thrown away; the tower is returned in eval mode with ``requires_grad=False``. This is
a plain supervised loop on a ~100k-parameter ViT: no library trainer would make it shorter.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _load(records: list[dict], image_folder, processor, pitch: int, patch: int,
          upsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [N, 3, H, W], patch targets [N, gh * gw])`` of the distinct images."""
    from PIL import Image

    from .dataset import patch_labels
    seen, ims, tgts = set(), [], []
    for r in records:
        if r["image"] in seen:
            continue
        seen.add(r["image"])
        with Image.open(Path(image_folder) / r["image"]) as im:
            ims.append(im.convert("RGB"))
        tgts.append(patch_labels(np.asarray(r["labels"]), np.asarray(r["offsets"]), pitch,
                                 patch, upsample).ravel())
    pix = processor(images=ims, return_tensors="pt")["pixel_values"]
    return pix, torch.as_tensor(np.stack(tgts), dtype=torch.long, device="cpu")


def _patch_logits(tower, head, pix):
    hs = tower(pixel_values=pix, output_hidden_states=True).hidden_states[-1][:, 1:]
    return head(hs)


def freeze(tower: nn.Module) -> nn.Module:
    tower.requires_grad_(False)
    return tower.eval()


def pretrain_tower(vision_config, processor, data: dict, *, steps: int, batch: int, lr: float,
                   seed: int, patch: int, upsample: int = 1) -> tuple[nn.Module, dict]:
    """A fresh ``CLIPVisionModel(vision_config)`` pretrained on ``data["train"]`` images (the dict
    of :func:`~models.digits.dataset.build_digit_dataset`), frozen. Returns ``(tower, stats)``,
    stats: ``losses``, ``patch_acc`` on the training images and (when built) the validation
    images, ``seconds``."""
    import transformers as tf
    t0 = time.time()
    torch.manual_seed(seed)
    tower = tf.CLIPVisionModel(vision_config)
    head = nn.Linear(vision_config.hidden_size, 11)
    with open(data["train"]) as f:
        train = json.load(f)
    pix, tgt = _load(train, data["image_folder"], processor, data["pitch"], patch, upsample)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    losses = []
    for _ in range(steps):
        i = torch.randint(len(pix), (batch,), generator=gen, device=gen.device)
        logits = _patch_logits(tower, head, pix[i])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tgt[i].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    freeze(tower)
    stats = {"losses": losses, "patch_acc": {"train": _accuracy(tower, head, pix, tgt)}}
    if data.get("val") is not None:
        with open(data["val"]) as f:
            vpix, vtgt = _load(json.load(f), data["image_folder"], processor, data["pitch"],
                               patch, upsample)
        stats["patch_acc"]["val"] = _accuracy(tower, head, vpix, vtgt)
    stats["seconds"] = time.time() - t0
    return tower, stats


@torch.no_grad()
def _accuracy(tower, head, pix, tgt, chunk: int = 256) -> float:
    ok = 0
    for s in range(0, len(pix), chunk):
        ok += int((_patch_logits(tower, head, pix[s:s + chunk]).argmax(-1)
                   == tgt[s:s + chunk]).sum())
    return ok / tgt.numel()
