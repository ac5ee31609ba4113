"""Attention patterns of a packed batch of images for the query projectors (ParGo, Q-Former).

The queries of all images are concatenated, ``[1, H, total_q, D]`` (image ``i``: its partial
queries, then its globals), and so are the visual tokens, ``[1, H, total_v, D]``. A packed
pattern holds the fixed-shape pattern of every image (the reference path loops over the images
through them: ``impl="reference"`` is the per-image computation by construction) and, for the
kernel path, the varlen plans, built on the host (O(#images) work, no mask tensor):

* cross-attention: one ``partial_global_attention_varlen`` call (each image its own
  ``n_partial`` and, with 2-D windows, its own visual and partial grids), one plan per forward;
* self-attention: ParGo's self mask is block-diagonal (partial queries see partial queries,
  globals see globals), so each image contributes two segments, its partial queries and its
  globals, which tile the batch in order; a layer is one ``band_attention_varlen`` call over
  the segments as they lie, each segment with its own window (a partial segment: its image's
  cascade band; a global segment, or the official mask: the whole segment). The plan carries
  the windows, so one is built per distinct set of windows: once per forward with the official
  mask, at most once per layer with the cascade.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from pargo_kernels import band_attention_varlen, partial_global_attention_varlen
from pargo_kernels.varlen_plan import VarlenPlan, plan_band, plan_partial_global

from .common import offsets


@dataclass(frozen=True, eq=False)
class PackedPattern:
    """Image ``i``'s queries ``[cu_q[i], cu_q[i+1])`` attend to its keys ``[cu_k[i],
    cu_k[i+1])`` as ``images[i]`` (a fixed-shape pattern) prescribes; nothing crosses images.
    Subclasses give ``packed(q, k, v, backend)`` on ``[total, H, D]`` layouts."""

    images: tuple
    cu_q: tuple
    cu_k: tuple

    def kernels(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        o = self.packed(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                        backend)
        return o.transpose(0, 1)[None]

    def reference(self, q: Tensor, k: Tensor, v: Tensor,
                  probs_hook: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        outs = [p.reference(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], probs_hook)
                for p, q0, q1, k0, k1 in zip(self.images, self.cu_q, self.cu_q[1:], self.cu_k,
                                             self.cu_k[1:])]
        return torch.cat(outs, 2)

    def packed(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class PackedCross(PackedPattern):
    plan: VarlenPlan

    def packed(self, q, k, v, backend):
        return partial_global_attention_varlen(q, k, v, backend=backend, plan=self.plan)


@dataclass(frozen=True, eq=False)
class PackedSelf(PackedPattern):
    plan: VarlenPlan  # band plan over the segments, with each segment's window

    def packed(self, q, k, v, backend):
        return band_attention_varlen(q, k, v, backend=backend, plan=self.plan)


def cross_pattern(images: Sequence, counts_q: Sequence[int], counts_k: Sequence[int],
                  device) -> PackedCross:
    """The packed cross-attention of images whose fixed-shape patterns are ``images``
    (:class:`~models.projectors.layers.CrossPattern`), ``counts_q`` queries and ``counts_k``
    visual tokens each."""
    masks = [p.mask for p in images]
    two_d = masks[0].visual_grid is not None
    cu_q, cu_k = offsets(counts_q), offsets(counts_k)
    plan = plan_partial_global(
        cu_q, cu_k, [m.n_partial for m in masks],
        visual_grids=[m.visual_grid for m in masks] if two_d else None,
        partial_grids=[m.partial_grid for m in masks] if two_d else None, device=device)
    return PackedCross(tuple(images), tuple(cu_q), tuple(cu_k), plan)


class SelfPatternBuilder:
    """Packed self-attention patterns of one batch, one per layer: a band plan over the segments
    with per-segment windows, built once per distinct set of windows."""

    def __init__(self, n_partials: Sequence[int], n_global: int, device):
        self.device = device
        self.cu_q = tuple(offsets(n + n_global for n in n_partials))
        # segments (length, image, is_partial) in batch order, empty ones dropped
        self.segments = [seg for i, n in enumerate(n_partials)
                         for seg in ((n, i, True), (n_global, i, False)) if seg[0]]
        self.cu_seg = offsets(n for n, _, _ in self.segments)
        self._plans: dict[tuple, VarlenPlan] = {}

    def layer(self, images: Sequence, windows: Sequence[Optional[tuple[int, int]]]
              ) -> PackedSelf:
        """The pattern of a layer whose image ``i`` has the fixed-shape pattern ``images[i]``
        and partial band ``windows[i]`` (``None``: every partial query)."""
        bands = []
        for n, i, partial in self.segments:  # clipped: equal bands share a plan
            w = windows[i] if partial and windows[i] is not None else (n - 1, n - 1)
            bands.append((min(w[0], n - 1), min(w[1], n - 1)))
        key = tuple(bands)
        if key not in self._plans:
            self._plans[key] = plan_band(self.cu_seg, windows=bands, device=self.device)
        return PackedSelf(tuple(images), self.cu_q, self.cu_q, self._plans[key])
