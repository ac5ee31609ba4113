"""Relevance maps of an MLLM's answer over the vision patches, in the spirit of DeCo's R-GAE.

Attention projectors (ParGo, Q-Former; any :class:`models.projectors.pargo._QueryProjector`): the projector
runs its reference path (``impl="reference"``) and every layer's attention probabilities ``A``
``[B, H, Nq, Nk]`` are captured through :attr:`models.projectors.layers.Attention.probs_hook` with their
gradients w.r.t. the target logit. Gradient-weighted attention ``Abar = mean_heads((dA * A)^+)``
is rolled out over the layers as in Chefer et al. (ICCV 2021, the bi-modal rules), queries ``q``
and image patches ``i`` (the patches are not updated inside the projector, so ``R_ii = I``):

* start ``R_qq = I``, ``R_qi = 0``;
* self-attention: ``R_qq += Abar @ R_qq``, ``R_qi += Abar @ R_qi``;
* cross-attention: ``R_qi += norm(R_qq)^T @ Abar`` (``norm``: ``R_qq - I`` row-normalised, plus
  ``I``),

and the patch map is ``R_qi`` summed over the queries (``per_query`` keeps each query's row).

Other projectors (DeCo, MLP): gradient x input of the target logit w.r.t. the patch features
fed to the projector, summed over channels, absolute value.

The target is the logit of the model's own greedy answer token (the first generated token) at
the last prompt position, as R-GAE explains the model's prediction. Maps are non-negative.
"""
from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn


def is_attention_projector(proj: nn.Module) -> bool:
    from ..projectors.pargo import _QueryProjector
    return isinstance(proj, _QueryProjector)


@contextlib.contextmanager
def capture_attention(proj: nn.Module):
    """Within the block, every reference-path call of ``proj``'s attention layers appends
    ``(layer_index, "self" | "cross", P)`` to the yielded list, ``P`` with ``retain_grad()``."""
    records: list[tuple[int, str, Tensor]] = []

    def hook(layer: int, kind: str, p: Tensor) -> None:
        if p.requires_grad:
            p.retain_grad()
        records.append((layer, kind, p))

    layers = list(proj.layers)
    try:
        for i, layer in enumerate(layers):
            layer.attention.probs_hook = functools.partial(hook, i, "self")
            if layer.crossattention is not None:  # None: no cross-attention in this layer
                layer.crossattention.probs_hook = functools.partial(hook, i, "cross")
        yield records
    finally:
        for layer in layers:
            for att in (layer.attention, layer.crossattention):
                if att is not None and "probs_hook" in vars(att):
                    del att.probs_hook


def _gw(p: Tensor) -> Tensor:
    """Gradient-weighted attention, positive part, mean over heads: ``[B, Nq, Nk]``."""
    if p.grad is None:
        return torch.zeros_like(p).mean(1)
    return (p.grad * p).clamp(min=0).mean(1)


def rollout(records, n_queries: int, n_patches: int) -> Tensor:
    """``R_qi`` ``[B, Nq, Nv]`` from captured (and back-propagated) attention records."""
    b = records[0][2].shape[0]
    dev, dt = records[0][2].device, torch.float32
    eye = torch.eye(n_queries, device=dev, dtype=dt).expand(b, -1, -1)
    r_qq = eye.clone()
    r_qi = torch.zeros(b, n_queries, n_patches, device=dev, dtype=dt)
    for _, kind, p in records:
        a = _gw(p).to(dt)
        if kind == "self":
            r_qq = r_qq + a @ r_qq
            r_qi = r_qi + a @ r_qi
        else:
            hat = r_qq - eye
            hat = hat / hat.sum(-1, keepdim=True).clamp(min=1e-12)
            r_qi = r_qi + (hat + eye).transpose(1, 2) @ a
    return r_qi


def _project(proj: nn.Module, feats: Tensor) -> Tensor:
    if hasattr(proj, "impl"):
        return proj(feats, impl="reference")
    return proj(feats)


def projector_relevance(proj: nn.Module, feats: Tensor, objective) -> dict:
    """Relevance of the patches ``feats`` ``[B, Nv, C]`` for ``objective(proj_out) -> scalar``
    (a sum over the batch of per-sample scores). Returns ``{"patch": [B, Nv], "per_query":
    [B, Nq, Nv] or None, "method"}``. ``objective`` may run more of the model (the LLM)."""
    feats = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        if is_attention_projector(proj):
            with capture_attention(proj) as rec:
                out = _project(proj, feats)
            objective(out).backward()
            per_q = rollout(rec, proj.num_visual_tokens, feats.shape[1])
            return {"patch": per_q.sum(1), "per_query": per_q,
                    "method": "grad-weighted attention rollout"}
        out = _project(proj, feats)
        objective(out).backward()
        return {"patch": (feats.grad * feats).sum(-1).abs().float(), "per_query": None,
                "method": "|grad x input|"}


def _prompts(model, questions: list[str], template: str):
    return model.prompt_ids(questions, template)


def mllm_relevance(model, images, questions: list[str], *, template: str = "vicuna_v1") -> dict:
    """Relevance maps of ``model``'s first answer token for PIL ``images`` / ``questions``.

    Returns ``{"maps": [B, gh, gw] (CPU float), "per_query", "method", "answer_ids": [B]}``."""
    device = next(model.llm.parameters()).device
    was_training = model.training
    model.eval()
    ids, mask = _prompts(model, questions, template)
    ids, mask = ids.to(device), mask.to(device)
    pix = model.preprocess_images(images).to(device)
    tower_dtype = next(model.vision_tower.parameters()).dtype
    with torch.no_grad():
        hs = model.vision_tower(pixel_values=pix.to(tower_dtype),
                                output_hidden_states=True).hidden_states
        feats = hs[model.vision_feature_layer]
        gh, gw = model.visual_grid
        if feats.shape[1] == gh * gw + 1:
            feats = feats[:, 1:]
    feats = feats.to(next(model.projector.parameters()).dtype)
    embed = model.llm.get_input_embeddings()
    is_img = (ids == model.image_token_id).unsqueeze(-1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    chosen = {}

    def objective(vis: Tensor) -> Tensor:
        e = embed(ids)
        e = e.masked_scatter(is_img, vis.to(e.dtype).reshape(-1, vis.shape[-1]))
        logits = model.llm(inputs_embeds=e, attention_mask=mask, position_ids=pos,
                           use_cache=False).logits[:, -1].float()
        tgt = logits.argmax(-1)
        chosen["ids"] = tgt.detach().cpu()
        return logits.gather(1, tgt[:, None]).sum()

    try:
        rel = projector_relevance(model.projector, feats, objective)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    maps = rel["patch"].detach().float().cpu().reshape(-1, gh, gw)
    per_q = rel["per_query"]
    return {"maps": maps, "per_query": None if per_q is None else per_q.detach().cpu(),
            "method": rel["method"], "answer_ids": chosen["ids"]}


_CELL = (re.compile(r"row (\d+) , column (\d+)"), re.compile(r"\br(\d+)c(\d+)\b"))


def cell_of(question: str) -> tuple[int, int]:
    """(row, col), 0-based, of a local ("row 2 , column 3") or cell ("r2c3") question."""
    for pat in _CELL:
        m = pat.search(question)
        if m is not None:
            return int(m.group(1)) - 1, int(m.group(2)) - 1
    raise ValueError(f"not a local or cell question: {question!r}")


def digit_box(record: dict, cell) -> tuple[float, float, float, float]:
    """``(y0, x0, y1, x1)`` of digit ``cell`` of a dataset record, as fractions of the image."""
    from .dataset import DIGIT
    rows, cols = np.asarray(record["labels"]).shape
    pitch = record.get("pitch", DIGIT)
    r, c = cell
    dy, dx = record.get("offsets", np.zeros((rows, cols, 2), int))[r][c]
    h, w = pitch * rows, pitch * cols
    return ((pitch * r + dy) / h, (pitch * c + dx) / w, (pitch * r + dy + DIGIT) / h,
            (pitch * c + dx + DIGIT) / w)


def box_coverage(box, grid) -> Tensor:
    """``[gh, gw]``: the share of each patch of a ``grid`` that ``box`` (fractions) covers."""
    gh, gw = grid
    f64 = torch.float64
    ey = torch.arange(gh + 1, dtype=f64, device="cpu") / gh
    ex = torch.arange(gw + 1, dtype=f64, device="cpu") / gw
    y0, x0, y1, x1 = (torch.tensor(float(v), dtype=f64, device="cpu") for v in box)
    oy = torch.minimum(ey[1:], y1) - torch.maximum(ey[:-1], y0)
    ox = torch.minimum(ex[1:], x1) - torch.maximum(ex[:-1], x0)
    return (oy.clamp(min=0)[:, None] * gh) * (ox.clamp(min=0)[None, :] * gw)


def mass_in_box(maps: Tensor, boxes) -> Tensor:
    """Share of each map ``[B, gh, gw]`` on the patches covered by ``boxes[b]`` (weighted by the
    covered fraction of each patch)."""
    out = []
    for m, box in zip(maps, boxes):
        cov = box_coverage(box, m.shape).to(m.dtype)
        out.append((m * cov).sum() / m.sum().clamp(min=1e-20))
    return torch.stack(out)


def relevance_study(model, records: list[dict], image_folder, batch_size: int = 50) -> dict:
    """Maps for local / cell test questions ``records`` and the mean share of relevance on the
    digit each one asks about: ``{"maps": [np [gh, gw]], "in_cell", "baseline", "method"}``;
    ``baseline``: the same share for a uniform map (the digit's share of the image)."""
    from .dataset import batches
    maps, shares, base, method = [], [], [], None
    for recs, ims, qs in batches(records, image_folder, batch_size):
        rel = mllm_relevance(model, ims, qs)
        method = rel["method"]
        boxes = [digit_box(r, cell_of(q)) for r, q in zip(recs, qs)]
        shares.append(mass_in_box(rel["maps"], boxes))
        base.append(mass_in_box(torch.ones_like(rel["maps"]), boxes))
        maps += [m.numpy() for m in rel["maps"]]
    if not shares:
        return {"maps": [], "in_cell": None, "baseline": None, "method": None}
    return {"maps": maps, "in_cell": float(torch.cat(shares).mean()),
            "baseline": float(torch.cat(base).mean()), "method": method}


def save_relevance_figure(path, records: list[dict], image_folder, maps_by_name: dict) -> None:
    """One row per record (image with the asked cell outlined, then one overlay per projector)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image
    names = list(maps_by_name)
    n = min([len(records)] + [len(v) for v in maps_by_name.values()])
    if n == 0:
        return
    fig, axes = plt.subplots(n, 1 + len(names), figsize=(1.5 * (1 + len(names)), 1.6 * n),
                             dpi=72, squeeze=False)
    for i in range(n):
        rec = records[i]
        with Image.open(Path(image_folder) / rec["image"]) as im:
            img = np.asarray(im.convert("L"), float)
        h, w = img.shape
        r, c = cell_of(rec["conversations"][0]["value"])
        y0, x0, y1, x1 = digit_box(rec, (r, c))
        for j, ax in enumerate(axes[i]):
            ax.imshow(img, cmap="gray", extent=(0, w, h, 0))
            if j > 0:
                m = np.asarray(maps_by_name[names[j - 1]][i], float)
                m = m / max(m.max(), 1e-20)
                ax.imshow(m, cmap="jet", alpha=0.5, extent=(0, w, h, 0),
                          interpolation="nearest")
                if i == 0:
                    ax.set_title(names[j - 1], fontsize=8)
            elif i == 0:
                ax.set_title("image", fontsize=8)
            ax.add_patch(plt.Rectangle((x0 * w, y0 * h), (x1 - x0) * w, (y1 - y0) * h,
                                       fill=False, ec="w", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(f"r{r + 1} c{c + 1}: {rec.get('answer', '')}", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    plt.close(fig)
