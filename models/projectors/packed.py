"""Attention patterns of a packed batch of images for the query projectors (ParGo, Q-Former).

The queries of all images are concatenated, ``[1, H, total_q, D]`` (image ``i``: its partial
queries, then its globals), and so are the visual tokens, ``[1, H, total_v, D]``. A packed
pattern holds the fixed-shape pattern of every image (the reference path loops over the images
through them: ``impl="reference"`` is the per-image computation by construction) and, for the
kernel path, the varlen plans, built once per forward (O(#images) host work, no mask tensor)
and reused by every layer:

* cross-attention: one ``partial_global_attention_varlen`` call (each image its own
  ``n_partial`` and, with 2-D windows, its own visual and partial grids);
* self-attention: ParGo's self mask is block-diagonal (partial queries see partial queries,
  globals see globals), so each image contributes two segments, its partial queries and its
  globals, and the layer is banded attention within segments: ``band_attention_varlen`` over
  segments that share a window. With the official mask every segment is full, one call over
  the batch as it lies; with the cascade the partial segments of images with different
  partial counts have different bands: they are gathered by window (one call per distinct
  window; segments whose band covers them entirely count as full) and scattered back.
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
class _BandGroup:
    """Segments sharing one band ``window``: their rows (``None``: every row of the batch, in
    order, no gather) and the plan over their lengths."""

    window: tuple[int, int]
    rows: Optional[Tensor]
    plan: VarlenPlan


@dataclass(frozen=True, eq=False)
class PackedSelf(PackedPattern):
    groups: tuple
    inverse: Optional[Tensor]  # scatter back: rows of cat(group outputs) -> batch order

    def packed(self, q, k, v, backend):
        outs = []
        for g in self.groups:
            qs, ks, vs = (q, k, v) if g.rows is None else (q[g.rows], k[g.rows], v[g.rows])
            outs.append(band_attention_varlen(qs, ks, vs, window=g.window, backend=backend,
                                              plan=g.plan))
        return outs[0] if self.inverse is None else torch.cat(outs, 0)[self.inverse]


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
    """Packed self-attention patterns of one batch, one per layer, sharing their plans: a
    plan per distinct set of segments, built once per forward."""

    def __init__(self, n_partials: Sequence[int], n_global: int, device):
        self.device = device
        counts = [n + n_global for n in n_partials]
        self.cu_q = tuple(offsets(counts))
        # segments (start, length, image, is_partial), empty ones dropped
        self.segments = [seg for i, (s, n) in enumerate(zip(self.cu_q, n_partials))
                         for seg in ((s, n, i, True), (s + n, n_global, i, False)) if seg[1]]
        self._plans: dict[tuple[int, ...], tuple] = {}

    def _group(self, ids: tuple[int, ...]) -> tuple:
        """(rows on the host, rows on the device, plan) of the segments ``ids``; rows None when
        they are all the segments."""
        if ids not in self._plans:
            segs = [self.segments[j] for j in ids]
            rows = None if len(ids) == len(self.segments) else torch.cat(
                [torch.arange(s, s + n) for s, n, _, _ in segs])
            plan = plan_band(offsets(n for _, n, _, _ in segs), device=self.device)
            self._plans[ids] = rows, None if rows is None else rows.to(self.device), plan
        return self._plans[ids]

    def layer(self, images: Sequence, windows: Sequence[Optional[tuple[int, int]]]
              ) -> PackedSelf:
        """The pattern of a layer whose image ``i`` has the fixed-shape pattern ``images[i]``
        and partial band ``windows[i]`` (``None``: every partial query)."""
        by_window: dict[Optional[tuple[int, int]], list[int]] = {}
        for j, (_, n, i, partial) in enumerate(self.segments):
            w = windows[i] if partial else None
            if w is not None and min(w) >= n - 1:  # the band covers the whole segment
                w = None
            by_window.setdefault(w, []).append(j)
        groups, host_rows = [], []
        for w, ids in by_window.items():
            rows, device_rows, plan = self._group(tuple(ids))
            if w is None:
                longest = max(self.segments[j][1] for j in ids)
                w = (longest - 1, longest - 1)
            groups.append(_BandGroup(w, device_rows, plan))
            host_rows.append(rows)
        inverse = None
        if len(groups) > 1:  # computed on the host: no synchronisation
            inverse = torch.argsort(torch.cat(host_rows)).to(self.device)
        return PackedSelf(tuple(images), self.cu_q, self.cu_q, tuple(groups), inverse)
