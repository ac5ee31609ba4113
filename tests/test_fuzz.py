"""Property-based tests (hypothesis): every public op on drawn inputs, against the float64 oracle.

Valid inputs: one strategy per op draws a :class:`Case` (shapes, grids, windows, head dims,
dtype, memory layouts, a seed for the values). The Triton backend (the interpreter on a CPU-only
machine) must match the float64 oracle of :mod:`pargo_kernels.reference` / ``F`` in the output
and in the gradient of every input, with the documented per-dtype tolerance
(:mod:`pargo_kernels.testing`). Outputs and workspaces are NaN-filled, so an element a kernel
does not write fails.

Invalid inputs: one valid call with exactly one argument broken; the op must raise
``ValueError`` / ``TypeError`` whose message names the broken argument (never an internal
Triton or torch error).

Adding an op = one ``@st.composite`` that returns a :class:`Case`, added to ``VALID``; its
broken arguments go to ``INVALID``. An attention op with a dense-mask oracle reuses
:func:`qkv_case` (dtypes, head dims, layouts, packed QKV); e.g. the fused ParGo self-attention::

    @st.composite
    def pargo_self(draw):
        n = draw(sizes(1, 70)); np_ = draw(st.integers(0, n)); window = ...
        mask = ...  # anything with n_query, n_key and materialize(device) -> [Nq, Nv] bool
        def run(q, k, v, scale, backend):
            return pk.pargo_self_attention(q, k, v, np_, window=window, scale=scale,
                                           backend=backend)
        return draw(qkv_case(f"pargo_self N={n} Np={np_} window={window}", mask, run,
                             draw(_scales()), allow_packed_qkv=True))

A varlen op builds its own :class:`Case`: leaves ``[total, H, D]``, ``views`` adding
``cu_seqlens``, and an oracle that runs the fixed-shape reference sequence by sequence.

Budget: ``PARGO_FUZZ_EXAMPLES`` examples per strategy (default 12, CI); e.g.
``PARGO_FUZZ_EXAMPLES=500 nice -n 10 python -m pytest -q tests/test_fuzz.py`` for a long local
run. No example database is kept (``database=None``): a failure prints its reproduction blob
(``@reproduce_failure``) instead.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask
from pargo_kernels.ops import attention_triton, pool_triton, varlen_pool_triton, varlen_triton
from pargo_kernels.pooling import pool_project_reference, pool_tokens_reference
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import assert_close, attention_grad_roundoff, triton_test_device

DEVICE = triton_test_device()  # as the conftest's `device` fixture
EXAMPLES = int(os.environ.get("PARGO_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 256]
SMALL_PRIMES = [1, 2, 3, 5, 7, 11, 13, 17, 31, 37, 61]


@pytest.fixture(autouse=True, scope="module")
def poison_outputs():
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_triton, "_empty", nan_empty)
        mp.setattr(pool_triton, "_empty", nan_empty)
        mp.setattr(varlen_triton, "_empty", nan_empty)
        mp.setattr(varlen_pool_triton, "_empty", nan_empty)
        yield


# --------------------------------------------------------------------------------------------
# cases and layouts
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One drawn call. ``leaves`` are the base tensors (values in ``dtype``) that receive
    gradients; ``views(leaves)`` builds the op's tensor arguments from them (strides, expands,
    offsets), the same way for the kernel run and for the float64 oracle run."""
    label: str
    dtype: torch.dtype
    leaves: dict
    views: Callable[[dict], tuple]
    run: Callable[..., torch.Tensor]       # run(*views, backend=...)
    oracle: Callable[..., torch.Tensor]    # oracle(*float64 views)
    seed: int = 0                          # of the output gradient
    # Element-wise round-off allowance on the gradients of the views, where they come from a
    # cancellation (see pargo_kernels.testing.attention_grad_roundoff): roundoff(float64 views,
    # output gradient) -> one tensor per view; None: the relative tolerance alone.
    roundoff: Callable[..., tuple] | None = None

    def __repr__(self):
        shapes = {k: tuple(v.shape) for k, v in self.leaves.items()}
        return f"Case({self.label}, {self.dtype}, leaves={shapes})"


ATTN_LAYOUTS = ["contiguous", "bnhd", "expand_batch", "expand_heads", "offset", "last_stride"]


def _leaf(gen, shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def attn_tensor(gen, layout, B, H, N, D, dtype):
    """A leaf and the view that turns it into a ``[B, H, N, D]`` tensor of the given layout."""
    if layout == "contiguous":
        return _leaf(gen, (B, H, N, D), dtype), lambda t: t
    if layout == "bnhd":  # a fused projection's [B, N, H, D] viewed as [B, H, N, D]
        return _leaf(gen, (B, N, H, D), dtype), lambda t: t.transpose(1, 2)
    if layout == "expand_batch":  # stride 0 over the batch
        return _leaf(gen, (1, H, N, D), dtype), lambda t: t.expand(B, H, N, D)
    if layout == "expand_heads":  # stride 0 over the heads (shared K/V, as multi-query)
        return _leaf(gen, (B, 1, N, D), dtype), lambda t: t.expand(B, H, N, D)
    if layout == "offset":  # a view that starts inside its storage
        return (_leaf(gen, (B * H * N * D + 7,), dtype),
                lambda t: t[7:].view(B, H, N, D))
    if layout == "last_stride":  # channels 2 apart
        return _leaf(gen, (B, H, N, 2 * D), dtype), lambda t: t[..., ::2]
    raise AssertionError(layout)


def packed_views(gen, B, H, N, D, n_parts, dtype):
    """One ``[B, N, n_parts, H, D]`` leaf (a fused QKV / KV projection) and its per-part views."""
    leaf = _leaf(gen, (B, N, n_parts, H, D), dtype)
    return leaf, [lambda t, i=i: t[:, :, i].transpose(1, 2) for i in range(n_parts)]


@st.composite
def seeds(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return gen


@st.composite
def batch_heads(draw):
    return draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]))


def sizes(lo, hi):
    return st.one_of(st.sampled_from([n for n in SMALL_PRIMES if lo <= n <= hi]),
                     st.integers(lo, hi))


@st.composite
def qkv_case(draw, label, mask, run, scale=None, allow_packed_qkv=False):
    """q, k, v for ``mask`` in drawn dtype, head dims and layouts; ``run(q, k, v, backend)``."""
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    B, H = draw(batch_heads())
    D = draw(st.sampled_from(HEAD_DIMS))
    Dv = draw(st.one_of(st.just(D), st.sampled_from(HEAD_DIMS)))
    nq, nv = mask.n_query, mask.n_key
    packing = draw(st.sampled_from(["none", "kv"] + (["qkv"] if allow_packed_qkv else [])))
    if packing != "none":
        Dv = D
    leaves, views = {}, []
    if packing == "qkv":
        leaves["qkv"], parts = packed_views(gen, B, H, nq, D, 3, dtype)
        views = [("qkv", p) for p in parts]
    else:
        leaves["q"], fq = attn_tensor(gen, draw(st.sampled_from(ATTN_LAYOUTS)), B, H, nq, D, dtype)
        views.append(("q", fq))
        if packing == "kv":
            leaves["kv"], parts = packed_views(gen, B, H, nv, D, 2, dtype)
            views += [("kv", p) for p in parts]
        else:
            for name, d in (("k", D), ("v", Dv)):
                layout = draw(st.sampled_from(ATTN_LAYOUTS))
                leaves[name], f = attn_tensor(gen, layout, B, H, nv, d, dtype)
                views.append((name, f))
    ref_scale = D ** -0.5 if scale is None else scale
    dense = mask.materialize(DEVICE)
    return Case(f"{label} B={B} H={H} D={D} Dv={Dv} packing={packing}", dtype, leaves,
                lambda lv: tuple(f(lv[name]) for name, f in views),
                lambda q, k, v, backend: run(q, k, v, scale, backend),
                lambda q, k, v: masked_attention(q, k, v, dense, ref_scale),
                seed=draw(st.integers(0, 2**31 - 1)),
                roundoff=lambda q, k, v, g: attention_grad_roundoff(q, k, v, g, dense, ref_scale))


def _scales():
    return st.one_of(st.none(), st.floats(0.01, 1.0))


# --------------------------------------------------------------------------------------------
# valid-input strategies, one per public op
# --------------------------------------------------------------------------------------------
@st.composite
def partial_global_1d(draw):
    nv = draw(sizes(1, 70))
    np_ = draw(st.one_of(st.integers(0, nv), st.sampled_from([0, 1, nv])))
    ng = draw(st.integers(0 if np_ else 1, 8))
    mask = PartialGlobalMask(np_ + ng, nv, np_)

    def run(q, k, v, scale, backend):
        return pk.partial_global_attention(q, k, v, np_, scale=scale, backend=backend)
    return draw(qkv_case(f"pg1d Nq={np_ + ng} Nv={nv} Np={np_}", mask, run, draw(_scales())))


@st.composite
def partial_global_2d(draw):
    vgrid = (draw(sizes(1, 9)), draw(sizes(1, 9)))
    pgrid = (draw(sizes(1, 9)), draw(sizes(1, 9)))
    if pgrid[0] * pgrid[1] > vgrid[0] * vgrid[1]:
        pgrid = (min(pgrid[0], vgrid[0]), min(pgrid[1], vgrid[1]))
    np_, nv = pgrid[0] * pgrid[1], vgrid[0] * vgrid[1]
    ng = draw(st.integers(0, 6))
    mask = PartialGlobalMask(np_ + ng, nv, np_, vgrid, pgrid)

    def run(q, k, v, scale, backend):
        return pk.partial_global_attention(q, k, v, np_, visual_grid=vgrid, partial_grid=pgrid,
                                           scale=scale, backend=backend)
    return draw(qkv_case(f"pg2d vgrid={vgrid} pgrid={pgrid} Ng={ng}", mask, run,
                         draw(_scales())))


@st.composite
def band(draw):
    n = draw(sizes(1, 70))
    window = (draw(st.integers(0, n + 5)), draw(st.integers(0, n + 5)))
    mask = BandMask(n, *window)

    def run(q, k, v, scale, backend):
        return pk.band_attention(q, k, v, window, scale=scale, backend=backend)
    return draw(qkv_case(f"band N={n} window={window}", mask, run, draw(_scales()),
                         allow_packed_qkv=True))


@st.composite
def cascade(draw):
    """cascade_windows' documented rounding, then band attention with one of its windows."""
    n_partial, n_layers = draw(sizes(1, 64)), draw(st.integers(1, 8))
    mode = draw(st.sampled_from(pk.attention.CASCADE_MODES))
    windows = pk.cascade_windows(n_partial, n_layers, mode)
    assert len(windows) == n_layers
    for layer, (left, right) in enumerate(windows, 1):
        n_vis = -(-layer * n_partial // n_layers)
        assert left + right + 1 == n_vis and left >= right >= 0
        assert right == 0 if mode == "causal" else left - right in (0, 1)
    window = windows[draw(st.integers(0, n_layers - 1))]
    mask = BandMask(n_partial, *window)

    def run(q, k, v, scale, backend):
        return pk.band_attention(q, k, v, window, scale=scale, backend=backend)
    return draw(qkv_case(f"cascade Np={n_partial} d={n_layers} {mode} window={window}", mask, run,
                         allow_packed_qkv=True))


@st.composite
def pargo_self(draw):
    """ParGo's whole self-attention: partial rows banded (or all partial keys), globals apart."""
    n = draw(sizes(1, 70))
    np_ = draw(st.one_of(st.integers(0, n), st.sampled_from([0, 1, n])))
    window = draw(st.one_of(st.none(), st.tuples(st.integers(0, np_ + 3),
                                                 st.integers(0, np_ + 3))))
    mask = ParGoSelfMask(n, np_, *(window or (None, None)))

    def run(q, k, v, scale, backend):
        return pk.pargo_self_attention(q, k, v, np_, window, scale=scale, backend=backend)
    return draw(qkv_case(f"pargo_self N={n} Np={np_} window={window}", mask, run,
                         draw(_scales()), allow_packed_qkv=True))


POOL_PROJECT_PARAMS = inspect.signature(pk.adaptive_avg_pool_project).parameters
TOKEN_LAYOUTS = ["contiguous", "channels_first", "expand_batch", "offset", "last_stride"]


def token_tensor(gen, layout, B, N, C, dtype):
    """A leaf and the view that makes it ``[B, N, C]`` tokens of the given layout."""
    if layout == "contiguous":
        return _leaf(gen, (B, N, C), dtype), lambda t: t
    if layout == "channels_first":
        return _leaf(gen, (B, C, N), dtype), lambda t: t.transpose(1, 2)
    if layout == "expand_batch":
        return _leaf(gen, (1, N, C), dtype), lambda t: t.expand(B, N, C)
    if layout == "offset":
        return _leaf(gen, (B * N * C + 5,), dtype), lambda t: t[5:].view(B, N, C)
    if layout == "last_stride":
        return _leaf(gen, (B, N, 2 * C), dtype), lambda t: t[..., 1::2]
    raise AssertionError(layout)


@st.composite
def pool_grids(draw):
    in_grid = (draw(sizes(1, 13)), draw(sizes(1, 13)))
    # smaller (overlapping windows when not dividing), equal or larger
    out_grid = (draw(sizes(1, 14)), draw(sizes(1, 14)))
    return in_grid, out_grid


@st.composite
def pool_tokens(draw):
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    in_grid, out_grid = draw(pool_grids())
    B, C = draw(st.integers(1, 3)), draw(sizes(1, 80))
    layout = draw(st.sampled_from(TOKEN_LAYOUTS))
    leaf, fx = token_tensor(gen, layout, B, in_grid[0] * in_grid[1], C, dtype)
    return Case(f"pool {in_grid}->{out_grid} B={B} C={C} x={layout}", dtype, {"x": leaf},
                lambda lv: (fx(lv["x"]),),
                lambda x, backend: pk.adaptive_avg_pool_tokens(x, in_grid, out_grid,
                                                               backend=backend),
                lambda x: pool_tokens_reference(x, in_grid, out_grid))


@st.composite
def pool_project(draw):
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    in_grid, out_grid = draw(pool_grids())
    B, C, NF = draw(st.integers(1, 3)), draw(sizes(1, 80)), draw(sizes(1, 64))
    x_layout = draw(st.sampled_from(TOKEN_LAYOUTS))
    leaves = {}
    leaves["x"], fx = token_tensor(gen, x_layout, B, in_grid[0] * in_grid[1], C, dtype)
    w_layout = draw(st.sampled_from(["contiguous", "transposed", "last_stride"]))
    if w_layout == "contiguous":
        leaves["w"], fw = _leaf(gen, (NF, C), dtype, C ** -0.5), (lambda t: t)
    elif w_layout == "transposed":
        leaves["w"], fw = _leaf(gen, (C, NF), dtype, C ** -0.5), (lambda t: t.t())
    else:
        leaves["w"], fw = _leaf(gen, (NF, 2 * C), dtype, C ** -0.5), (lambda t: t[:, ::2])
    b_layout = draw(st.sampled_from(["none", "contiguous", "strided"]))
    if b_layout == "contiguous":
        leaves["b"], fb = _leaf(gen, (NF,), dtype), (lambda t: t)
    elif b_layout == "strided":
        leaves["b"], fb = _leaf(gen, (3 * NF,), dtype), (lambda t: t[1::3])

    def views(lv):
        return (fx(lv["x"]), fw(lv["w"])) + ((fb(lv["b"]),) if "b" in lv else ())

    # both paths where the op offers a choice (``fused=``): the fused kernel and pool + linear
    extra = {"fused": draw(st.booleans())} if "fused" in POOL_PROJECT_PARAMS else {}

    def run(x, w, *b, backend):
        return pk.adaptive_avg_pool_project(x, w, b[0] if b else None, in_grid=in_grid,
                                            out_grid=out_grid, backend=backend, **extra)

    def oracle(x, w, *b):
        return pool_project_reference(x, w, b[0] if b else None, in_grid, out_grid)
    return Case(f"pool_project {in_grid}->{out_grid} B={B} C={C} NF={NF} x={x_layout} "
                f"w={w_layout} bias={b_layout} {extra}", dtype, leaves, views, run, oracle)


# --------------------------------------------------------------------------------------------
# packed (varlen) ops: 1-4 sequences, the oracle is the float64 reference sequence by sequence
# --------------------------------------------------------------------------------------------
PACKED_LAYOUTS = ["contiguous", "hnd", "offset", "last_stride"]


def packed_tensor(gen, layout, total, H, D, dtype):
    """A leaf and the view that makes it ``[total, H, D]`` (``H = 0``: ``[total, D]`` tokens)."""
    shape = (total, H, D) if H else (total, D)
    n = total * max(H, 1) * D
    if layout == "contiguous":
        return _leaf(gen, shape, dtype), lambda t: t
    if layout == "hnd":  # heads (or channels) outermost: [H, total, D] / [D, total] transposed
        if H:
            return _leaf(gen, (H, total, D), dtype), lambda t: t.transpose(0, 1)
        return _leaf(gen, (D, total), dtype), lambda t: t.t()
    if layout == "offset":
        return _leaf(gen, (n + 3,), dtype), lambda t: t[3:].view(shape)
    if layout == "last_stride":
        return _leaf(gen, (*shape[:-1], 2 * D), dtype), lambda t: t[..., ::2]
    raise AssertionError(layout)


def _offsets(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


@st.composite
def packed_qkv_case(draw, label, masks, run, scale):
    """q, k, v ``[total, H, D]`` for per-sequence ``masks``; ``run(q, k, v, scale, backend)``."""
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    H = draw(st.integers(1, 2))
    D = draw(st.sampled_from(HEAD_DIMS))
    Dv = draw(st.one_of(st.just(D), st.sampled_from(HEAD_DIMS)))
    cu_q = _offsets([m.n_query for m in masks])
    cu_k = _offsets([m.n_key for m in masks])
    leaves, views = {}, []
    for name, total, d in (("q", cu_q[-1], D), ("k", cu_k[-1], D), ("v", cu_k[-1], Dv)):
        layout = draw(st.sampled_from(PACKED_LAYOUTS))
        leaves[name], f = packed_tensor(gen, layout, total, H, d, dtype)
        views.append((name, f))
    ref_scale = D ** -0.5 if scale is None else scale

    def oracle(q, k, v):
        outs = []
        for i, m in enumerate(masks):
            sl = [t[a:b].transpose(0, 1) for t, a, b in (
                (q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1]))]
            outs.append(masked_attention(*sl, m.materialize(DEVICE), ref_scale).transpose(0, 1))
        return torch.cat(outs)

    def roundoff(q, k, v, g):
        per_seq = []
        for i, m in enumerate(masks):
            sl = [t[a:b].transpose(0, 1) for t, a, b in (
                (q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1]),
                (g, cu_q[i], cu_q[i + 1]))]
            per_seq.append(attention_grad_roundoff(*sl, m.materialize(DEVICE), ref_scale))
        return tuple(torch.cat([b[j].transpose(0, 1) for b in per_seq]) for j in range(3))
    return Case(f"{label} H={H} D={D} Dv={Dv}", dtype, leaves,
                lambda lv: tuple(f(lv[name]) for name, f in views),
                lambda q, k, v, backend: run(q, k, v, cu_q, cu_k, scale, backend), oracle,
                seed=draw(st.integers(0, 2**31 - 1)), roundoff=roundoff)


@st.composite
def partial_global_varlen(draw):
    """1-D or 2-D windows (one per batch), per-sequence Np (0, Nv, non-dividing, ...)."""
    two_d = draw(st.booleans())
    masks, n_partial, vgrids, pgrids = [], [], [], []
    for _ in range(draw(st.integers(1, 4))):
        if two_d:
            vgrid = (draw(sizes(1, 6)), draw(sizes(1, 6)))
            pgrid = (draw(st.integers(1, vgrid[0])), draw(st.integers(1, vgrid[1])))
            np_, nv = pgrid[0] * pgrid[1], vgrid[0] * vgrid[1]
            vgrids.append(vgrid)
            pgrids.append(pgrid)
            ng = draw(st.integers(0, 4))
            masks.append(PartialGlobalMask(np_ + ng, nv, np_, vgrid, pgrid))
        else:
            nv = draw(sizes(1, 40))
            np_ = draw(st.one_of(st.integers(0, nv), st.sampled_from([0, nv])))
            ng = draw(st.integers(0 if np_ else 1, 5))
            masks.append(PartialGlobalMask(np_ + ng, nv, np_))
        n_partial.append(np_)
    grids = dict(visual_grids=vgrids, partial_grids=pgrids) if two_d else {}
    # global tiles split over keys (varlen_plan.SPLIT_KEYS) at these tiny lengths: a plan
    split_keys = draw(st.sampled_from([None, 16, 32]))

    def run(q, k, v, cu_q, cu_k, scale, backend):
        if split_keys is None:
            return pk.partial_global_attention_varlen(q, k, v, cu_q, cu_k, n_partial,
                                                      scale=scale, backend=backend, **grids)
        plan = pk.plan_partial_global(cu_q, cu_k, n_partial, device=q.device,
                                      split_keys=split_keys, **grids)
        return pk.partial_global_attention_varlen(q, k, v, scale=scale, backend=backend,
                                                  plan=plan)
    label = (f"pg_varlen Nq={[m.n_query for m in masks]} Nv={[m.n_key for m in masks]} "
             f"Np={n_partial} {grids} split_keys={split_keys}")
    return draw(packed_qkv_case(label, masks, run, draw(_scales())))


@st.composite
def band_varlen(draw):
    """One window for the batch, or one per sequence (a list of pairs or an int tensor)."""
    lens = draw(st.lists(sizes(1, 40), min_size=1, max_size=4))

    def pair(n):
        return draw(st.integers(0, n + 3)), draw(st.integers(0, n + 3))
    how = draw(st.sampled_from(["shared", "list", "tensor"]))
    windows = [pair(n) for n in lens] if how != "shared" else [pair(max(lens))] * len(lens)
    window = {"shared": windows[0], "list": windows, "tensor": torch.tensor(windows)}[how]
    masks = [BandMask(n, *w) for n, w in zip(lens, windows)]

    def run(q, k, v, cu_q, cu_k, scale, backend):
        return pk.band_attention_varlen(q, k, v, cu_q, window, scale=scale, backend=backend)
    return draw(packed_qkv_case(f"band_varlen N={lens} window={windows} ({how})", masks, run,
                                draw(_scales())))


@st.composite
def packed_pool_grids(draw):
    grids = [draw(pool_grids()) for _ in range(draw(st.integers(1, 4)))]
    return [g[0] for g in grids], [g[1] for g in grids]


def _pool_per_image(x, in_grids, out_grids, fn):
    cu = _offsets([h * w for h, w in in_grids])
    return torch.cat([fn(x[cu[i]:cu[i + 1]][None], in_grids[i], out_grids[i])[0]
                      for i in range(len(in_grids))])


@st.composite
def pool_tokens_varlen(draw):
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    in_grids, out_grids = draw(packed_pool_grids())
    C = draw(sizes(1, 48))
    layout = draw(st.sampled_from(PACKED_LAYOUTS))
    leaf, fx = packed_tensor(gen, layout, sum(h * w for h, w in in_grids), 0, C, dtype)
    cu = _offsets([h * w for h, w in in_grids])
    return Case(f"pool_varlen {in_grids}->{out_grids} C={C} x={layout}", dtype, {"x": leaf},
                lambda lv: (fx(lv["x"]),),
                lambda x, backend: pk.adaptive_avg_pool_tokens_varlen(
                    x, cu, in_grids, out_grids, backend=backend)[0],
                lambda x: _pool_per_image(x, in_grids, out_grids, pool_tokens_reference))


@st.composite
def pool_project_varlen(draw):
    gen = draw(seeds())
    dtype = draw(st.sampled_from(DTYPES))
    in_grids, out_grids = draw(packed_pool_grids())
    C, NF = draw(sizes(1, 48)), draw(sizes(1, 40))
    x_layout = draw(st.sampled_from(PACKED_LAYOUTS))
    leaves = {}
    leaves["x"], fx = packed_tensor(gen, x_layout, sum(h * w for h, w in in_grids), 0, C, dtype)
    w_t = draw(st.booleans())
    leaves["w"] = _leaf(gen, (C, NF) if w_t else (NF, C), dtype, C ** -0.5)
    b_layout = draw(st.sampled_from(["none", "contiguous", "strided"]))
    if b_layout != "none":
        leaves["b"] = _leaf(gen, (NF if b_layout == "contiguous" else 2 * NF,), dtype)
    cu = _offsets([h * w for h, w in in_grids])

    def views(lv):
        b = () if "b" not in lv else (lv["b"] if b_layout == "contiguous" else lv["b"][::2],)
        return (fx(lv["x"]), lv["w"].t() if w_t else lv["w"]) + b

    def run(x, w, *b, backend):
        return pk.adaptive_avg_pool_project_varlen(x, w, b[0] if b else None, cu, in_grids,
                                                   out_grids, backend=backend)[0]

    def oracle(x, w, *b):
        return _pool_per_image(x, in_grids, out_grids, lambda t, gi, go: pool_project_reference(
            t, w, b[0] if b else None, gi, go))
    return Case(f"pool_project_varlen {in_grids}->{out_grids} C={C} NF={NF} x={x_layout} "
                f"w_t={w_t} bias={b_layout}", dtype, leaves, views, run, oracle)


VALID = {
    "partial_global_1d": partial_global_1d(),
    "partial_global_2d": partial_global_2d(),
    "band_attention": band(),
    "pargo_self_attention": pargo_self(),
    "cascade_windows": cascade(),
    "adaptive_avg_pool_tokens": pool_tokens(),
    "adaptive_avg_pool_project": pool_project(),
    "partial_global_attention_varlen": partial_global_varlen(),
    "band_attention_varlen": band_varlen(),
    "adaptive_avg_pool_tokens_varlen": pool_tokens_varlen(),
    "adaptive_avg_pool_project_varlen": pool_project_varlen(),
}


def check_case(case: Case, backend: str = "triton") -> None:
    """Run ``case`` on ``backend`` and on the float64 oracle; compare output and leaf grads."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in case.leaves.items()}
    out = case.run(*case.views(leaves), backend=backend)
    gen = torch.Generator().manual_seed(case.seed)
    grad = torch.randn(out.shape, generator=gen).to(case.dtype).to(DEVICE)
    out.backward(grad)
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in case.leaves.items()}
    ref_views = case.views(ref_leaves)
    ref = case.oracle(*ref_views)
    ref.backward(grad.double())
    assert out.dtype == case.dtype
    assert_close("out", out, ref, case.dtype)
    roundoff = dict.fromkeys(leaves)
    if case.roundoff is not None:  # carry the per-view bounds back to the leaves (linear views)
        bounds = case.roundoff(*(t.detach() for t in ref_views), grad.double())
        bound_leaves = {k: v.detach().double().requires_grad_(True)
                        for k, v in case.leaves.items()}
        paired = sum((t * b).sum() for t, b in zip(case.views(bound_leaves), bounds))
        roundoff = dict(zip(bound_leaves, torch.autograd.grad(paired, list(bound_leaves.values()))))
    for name in leaves:
        got, exact = leaves[name].grad, ref_leaves[name].grad
        assert got is not None, f"no gradient for {name}"
        assert_close(f"d{name}", got, exact, case.dtype, roundoff=roundoff[name])


@pytest.mark.triton
@pytest.mark.parametrize("op", list(VALID))
def test_fuzz_matches_oracle(op):
    @FUZZ
    @given(case=VALID[op])
    def run(case):
        check_case(case)
    run()


# --------------------------------------------------------------------------------------------
# invalid inputs: one argument broken at a time
# --------------------------------------------------------------------------------------------
NOT_A_TENSOR = [None, 3.0, [[1.0]], "q"]
BAD_INTS = [None, "3", 2.5, True, float("nan"), [1], -1]
BAD_GRIDS = [8, (2,), (2, 2, 2), "ab", (2.0, 2), (0, 4), (2, -1), None, (True, 1)]
BAD_SCALES = [float("nan"), float("inf"), float("-inf"), "x", True, 1j, [0.5]]
BAD_BACKENDS = ["fast", None, 3, "TRITON"]
WRONG_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]


@dataclass
class Bad:
    """A call with one broken argument and the names its error message may give."""
    label: str
    call: Callable[[], object]
    names: tuple


def _attn_corruptions(draw, args, names_qkv, self_attention):
    """(label, new args, expected names) for one broken tensor argument of an attention op."""
    name = draw(st.sampled_from(names_qkv))
    t = args[name]
    how = draw(st.sampled_from(["not_tensor", "dtype", "other_float", "ndim", "batch", "heads",
                                "head_dim", "tokens", "empty", "device"]))
    if how == "not_tensor":
        new = draw(st.sampled_from(NOT_A_TENSOR))
    elif how == "dtype":
        new = torch.zeros(t.shape, dtype=draw(st.sampled_from(WRONG_DTYPES)), device=t.device)
    elif how == "other_float":
        other = [d for d in (torch.float16, torch.bfloat16, torch.float64) if d != t.dtype]
        new = t.to(draw(st.sampled_from(other)))
    elif how == "ndim":
        new = draw(st.sampled_from([t[0], t[None], t[..., 0]]))
    elif how in ("batch", "heads"):
        dim = 0 if how == "batch" else 1
        new = torch.cat([t, t.narrow(dim, 0, 1)], dim)
    elif how == "head_dim":
        if name == "v":  # Dv may differ from D: break the key instead
            name, t = "k", args["k"]
        new = torch.cat([t, t[..., :1]], -1)
    elif how == "tokens":
        if name == "q" and not self_attention:
            name, t = "k", args["k"]  # Nq is free in cross-attention
        new = torch.cat([t, t[:, :, :1]], 2)
    elif how == "empty":
        new = t[:, :, :0] if draw(st.booleans()) else t[..., :0]
    else:
        new = t.to("meta")
    args = dict(args)
    args[name] = new
    expected = (name,) if how not in ("batch", "heads", "tokens", "device", "other_float") \
        else ("q", "k", "v")
    return f"{name}:{how}", args, expected


def _random_qkv(draw, nq, nv):
    B, H = draw(batch_heads())
    D = draw(st.sampled_from([16, 24]))
    dtype = draw(st.sampled_from(DTYPES))
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE).to(dtype) for n in (nq, nv, nv))
    return dict(q=q, k=k, v=v)


@st.composite
def invalid_partial_global(draw):
    nv, np_, ng = 12, 6, 2
    args = _random_qkv(draw, np_ + ng, nv)
    args.update(n_partial=np_, scale=None, visual_grid=None, partial_grid=None,
                backend=draw(st.sampled_from(["triton", "reference", "auto"])))
    if draw(st.booleans()):
        args.update(visual_grid=(3, 4), partial_grid=(2, 3))
    what = draw(st.sampled_from(["tensor", "n_partial", "scale", "backend", "visual_grid",
                                 "partial_grid", "one_grid", "grid_mismatch"]))
    expected = (what,)
    if what == "tensor":
        what, args, expected = _attn_corruptions(draw, args, ["q", "k", "v"], False)
    elif what == "n_partial":
        args["n_partial"] = draw(st.sampled_from(BAD_INTS + [np_ + ng + 1, nv + 1]))
    elif what == "scale":
        args["scale"] = draw(st.sampled_from(BAD_SCALES))
    elif what == "backend":
        args["backend"] = draw(st.sampled_from(BAD_BACKENDS))
    elif what in ("visual_grid", "partial_grid"):
        args.update(visual_grid=(3, 4), partial_grid=(2, 3))
        args[what] = draw(st.sampled_from(BAD_GRIDS))
        expected = (what, f"{what}[0]", f"{what}[1]")
    elif what == "one_grid":
        key = draw(st.sampled_from(["visual_grid", "partial_grid"]))
        args.update(visual_grid=None, partial_grid=None)
        args[key] = (3, 4) if key == "visual_grid" else (2, 3)
        expected = ("visual_grid", "partial_grid")
    else:
        key = draw(st.sampled_from(["visual_grid", "partial_grid"]))
        args.update(visual_grid=(3, 4), partial_grid=(2, 3))
        args[key] = (4, 4) if key == "visual_grid" else (3, 3)
        expected = (key,)
    a = dict(args)
    return Bad(f"partial_global {what}", lambda: pk.partial_global_attention(
        a.pop("q"), a.pop("k"), a.pop("v"), a.pop("n_partial"), **a), expected)


def _self_attention_break(draw, args, what, bad_windows):
    """(label, args, expected names) for one broken argument of band / pargo_self attention:
    ``what`` in tensor, window, window_entry, scale, backend (args' window is a valid pair)."""
    expected = (what,)
    if what == "tensor":
        return _attn_corruptions(draw, args, ["q", "k", "v"], True)
    if what == "window":
        args["window"] = draw(st.sampled_from(bad_windows))
    elif what == "window_entry":
        i = draw(st.integers(0, 1))
        w = list(args["window"])
        w[i] = draw(st.sampled_from(BAD_INTS))
        args["window"] = tuple(w)
        expected = ("window", f"window[{i}]")
    elif what == "scale":
        args["scale"] = draw(st.sampled_from(BAD_SCALES))
    else:
        args["backend"] = draw(st.sampled_from(BAD_BACKENDS))
    return what, args, expected


SELF_ATTN_BREAKS = ["tensor", "window", "window_entry", "scale", "backend"]


@st.composite
def invalid_band(draw):
    args = _random_qkv(draw, 10, 10)
    args.update(window=(2, 1), scale=None,
                backend=draw(st.sampled_from(["triton", "reference", "auto"])))
    what, args, expected = _self_attention_break(
        draw, args, draw(st.sampled_from(SELF_ATTN_BREAKS)), [3, (1,), (1, 2, 3), "ab", None])
    a = dict(args)
    return Bad(f"band {what}", lambda: pk.band_attention(
        a.pop("q"), a.pop("k"), a.pop("v"), a.pop("window"), **a), expected)


@st.composite
def invalid_band_varlen(draw):
    """A packed band call (2 sequences) whose shared or per-sequence window is broken."""
    q = torch.randn(9, 2, 16, device=DEVICE).to(draw(st.sampled_from(DTYPES)))
    backend = draw(st.sampled_from(["triton", "reference", "auto"]))
    windows = [(1, 0), (2, 3)]
    how = draw(st.sampled_from(["shared", "entry", "pair", "count", "tensor"]))
    i = draw(st.integers(0, 1))
    expected = (f"window[{i}]",)
    if how == "shared":
        window = draw(st.sampled_from([3, (1,), (1, 2, 3), "ab", None, (1, -1), (2.5, 1)]))
        expected = ("window", "window[0]", "window[1]")
    elif how == "entry":
        w = list(windows[i])
        w[draw(st.integers(0, 1))] = draw(st.sampled_from(BAD_INTS))
        window = [tuple(w) if j == i else windows[j] for j in range(2)]
    elif how == "pair":
        window = [draw(st.sampled_from([3, (1,), (1, 2, 3), "ab", None])) if j == i else
                  windows[j] for j in range(2)]
    elif how == "count":
        window = draw(st.sampled_from([windows[:1], windows + [(0, 0)]]))
        expected = ("window",)
    else:
        window = draw(st.sampled_from([torch.tensor([[1, 0], [2, -1]]), torch.tensor([[1, 0]]),
                                       torch.tensor([[1.0, 0.0], [2.0, 3.0]]),
                                       torch.tensor([[1, 0, 0], [2, 3, 3]])]))
        expected = ("window", "window[1]")
    return Bad(f"band_varlen {how}", lambda: pk.band_attention_varlen(
        q, q, q, [0, 4, 9], window, backend=backend), expected)


@st.composite
def invalid_pargo_self(draw):
    """As invalid_band (window=None is valid here: every partial key), or a bad n_partial."""
    args = _random_qkv(draw, 10, 10)
    args.update(n_partial=6, window=(2, 1), scale=None,
                backend=draw(st.sampled_from(["triton", "reference", "auto"])))
    what = draw(st.sampled_from(SELF_ATTN_BREAKS + ["n_partial"]))
    if what == "n_partial":
        args["n_partial"] = draw(st.sampled_from(BAD_INTS + [11]))
        expected = (what,)
    else:
        if what != "window_entry" and draw(st.booleans()):
            args["window"] = None
        what, args, expected = _self_attention_break(draw, args, what,
                                                     [3, (1,), (1, 2, 3), "ab"])
    a = dict(args)
    return Bad(f"pargo_self {what}", lambda: pk.pargo_self_attention(
        a.pop("q"), a.pop("k"), a.pop("v"), a.pop("n_partial"), a.pop("window"), **a), expected)


@st.composite
def invalid_cascade(draw):
    args = dict(n_partial=12, n_layers=3, mode="causal")
    what = draw(st.sampled_from(list(args)))
    args[what] = draw(st.sampled_from(["wide", None, 3] if what == "mode" else BAD_INTS + [0]))
    return Bad(f"cascade {what}", lambda: pk.cascade_windows(**args), (what,))


@st.composite
def invalid_pool(draw):
    project = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(2, 12, 8, device=DEVICE).to(dtype)
    args = dict(x=x, in_grid=(3, 4), out_grid=(2, 2),
                backend=draw(st.sampled_from(["triton", "reference", "auto"])))
    names = ["x", "in_grid", "out_grid", "backend"]
    if project:
        args.update(weight=torch.randn(5, 8, device=DEVICE).to(dtype),
                    bias=torch.randn(5, device=DEVICE).to(dtype))
        names += ["weight", "bias"]
    what = draw(st.sampled_from(names))
    expected = (what,)
    if what in ("in_grid", "out_grid"):
        args[what] = draw(st.sampled_from(BAD_GRIDS + ([(4, 4), (2, 5)] if what == "in_grid"
                                                         else [])))
        expected = (what, f"{what}[0]", f"{what}[1]", "x")
    elif what == "backend":
        args["backend"] = draw(st.sampled_from(BAD_BACKENDS))
    else:
        t = args[what]
        how = draw(st.sampled_from(["not_tensor", "dtype", "ndim", "size"]
                                   + (["other_float"] if project else [])))
        if how == "not_tensor":  # (bias=None is valid: no bias)
            args[what] = draw(st.sampled_from([b for b in NOT_A_TENSOR if b is not None]
                                              if what == "bias" else NOT_A_TENSOR))
        elif how == "dtype":
            args[what] = torch.zeros(t.shape, dtype=draw(st.sampled_from(WRONG_DTYPES)),
                                     device=t.device)
        elif how == "other_float":
            other = [d for d in (torch.float16, torch.bfloat16, torch.float64) if d != dtype]
            args[what] = t.to(draw(st.sampled_from(other)))
            expected = ("x", "weight", "bias")
        elif how == "ndim":
            args[what] = t[None]
        else:  # one more token (x), in-feature (weight) or element (bias)
            dim = 1 if what == "x" else -1
            args[what] = torch.cat([t, t.narrow(dim, 0, 1)], dim)
            expected = ("x", "weight", "bias", "in_grid")
        what = f"{what}:{how}"
    a = dict(args)
    if project:
        return Bad(f"pool_project {what}", lambda: pk.adaptive_avg_pool_project(
            a.pop("x"), a.pop("weight"), a.pop("bias"), **a), expected)
    return Bad(f"pool {what}", lambda: pk.adaptive_avg_pool_tokens(
        a.pop("x"), a.pop("in_grid"), a.pop("out_grid"), **a), expected)


INVALID = {
    "partial_global_attention": invalid_partial_global(),
    "band_attention": invalid_band(),
    "band_attention_varlen": invalid_band_varlen(),
    "pargo_self_attention": invalid_pargo_self(),
    "cascade_windows": invalid_cascade(),
    "pooling": invalid_pool(),
}
PACKAGE_DIR = os.path.dirname(pk.__file__)


@pytest.mark.parametrize("op", list(INVALID))
def test_fuzz_invalid_inputs_name_the_argument(op):
    """ValueError / TypeError raised by the package's own validation (not inside a kernel
    launcher, Triton or torch), with a message that names the broken argument."""
    @settings(FUZZ, max_examples=4 * EXAMPLES)
    @given(bad=INVALID[op])
    def run(bad):
        with pytest.raises((ValueError, TypeError)) as info:
            bad.call()
        msg = str(info.value)
        assert any(re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg) for n in bad.names), \
            f"{bad.label}: message does not name {bad.names}: {msg!r}"
        origin = info.traceback[-1].path
        assert str(origin).startswith(PACKAGE_DIR) and os.sep + "ops" + os.sep not in str(origin), \
            f"{bad.label}: raised from {origin}, not from the argument checks: {msg!r}"
    run()
