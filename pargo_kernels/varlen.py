"""Packed (varlen) ops: partial-global and band attention, adaptive average pooling (+ fused
projection) over batches of sequences of different lengths and grids (DESIGN.md §5).

Layout as FlashAttention's ``flash_attn_varlen_func``: the tokens of all sequences
concatenated, ``[total, H, D]`` (attention) or ``[total, C]`` (pooling), with int offsets
``cu_seqlens [n_seq + 1]`` (list of ints, CPU or CUDA tensor). Sequence ``i`` of every op is
exactly the fixed-shape op on its slice, with its own ``n_partial`` and grids and the shared
scale; nothing crosses a sequence boundary.

Per-batch work is a plan (:mod:`pargo_kernels.varlen_plan`): O(#sequences) metadata and the
tile schedule, built on the host. Each op takes either the per-batch arguments (it then builds
the plan itself: no synchronisation for lists or CPU tensors, one device-to-host copy for a
CUDA ``cu_seqlens``) or ``plan=`` (built once, e.g. for the 6 x 2 attention calls of a ParGo
projector on one batch; no synchronisation at all).

Registered ops (the plan's tensors are op inputs, so ``torch.compile`` does not specialise on
the lengths; ``*_token`` are empty ``[0, total]`` tensors carrying output sizes as shapes):

* ``pargo::varlen_attention_fwd(q, k, v, meta, meta_host, extra, kind, window, scale)
  -> (out, lse)`` and ``pargo::varlen_attention_bwd(dout, q, k, v, out, lse, meta, meta_host,
  extra, kind, window, scale) -> (dq, dk, dv)``
* ``pargo::pool_tokens_varlen_fwd(x, meta, meta_host, extra, out_token) -> y`` and
  ``pargo::pool_tokens_varlen_bwd(dy, meta, meta_host, extra, in_token) -> dx``
* ``pargo::pool_project_varlen_fwd(x, weight, bias?, meta, meta_host, extra, out_token) -> y``
  and ``pargo::pool_project_varlen_bwd(dy, x, weight, has_bias, meta, meta_host, extra)
  -> (dx, dweight, dbias)``
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend
from ._transforms import autocast_like_sdpa, no_double_backward, refuse_functorch, register_autocast
from ._validate import check_same, check_scale, check_tensor
from .attention import _triton_reasons as _attention_triton_reasons
from .masks import KIND_BAND, KIND_PG1D, KIND_PG2D, BandMask, PartialGlobalMask
from .pooling import _triton_reasons as _pool_triton_reasons
from .pooling import check_projection, pool_project_reference, pool_tokens_reference
from .reference import masked_attention
from .varlen_plan import (A_K_START, A_NQ, A_NV, A_P0, A_Q_START, KIND_POOL, P_HIN, P_HOUT,
                          P_IN_START, P_WIN, P_WOUT, VarlenPlan, band_window, check_cu_seqlens,
                          check_windows, plan_band, plan_partial_global, plan_pool)

_MAX_TOKENS = 2**31 - 1  # check_cu_seqlens refuses longer batches
_CUDA_REFUSAL = ("the CUDA extension has no varlen kernels (packed batches run on the Triton "
                 "backend)")


def _attn_triton():
    from .ops import varlen_triton  # imported lazily: triton is only needed when used
    return varlen_triton


def _pool_triton():
    from .ops import varlen_pool_triton
    return varlen_pool_triton


def _view(kind: int, meta: Tensor, meta_host: Tensor, extra: Tensor) -> VarlenPlan:
    """The plan as the launchers see it, rebuilt from the op's tensor inputs."""
    return VarlenPlan(kind, meta, meta_host, extra, meta_host, meta_host)


# --------------------------------------------------------------------------------------------
# registered ops: attention
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("pargo::varlen_attention_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, meta: Tensor, meta_host: Tensor,
                 extra: Tensor, kind: int, window: list[int],
                 scale: float) -> tuple[Tensor, Tensor]:
    return _attn_triton().varlen_forward(q, k, v, _view(kind, meta, meta_host, extra), kind,
                                         window, scale)


@_attn_fwd_op.register_fake
def _attn_fwd_fake(q, k, v, meta, meta_host, extra, kind, window, scale):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("pargo::varlen_attention_bwd", mutates_args=())
def _attn_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 meta: Tensor, meta_host: Tensor, extra: Tensor, kind: int, window: list[int],
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # A row whose scores are all -inf has LSE = -inf; +inf makes its P = 0: zero gradients, as
    # the fixed-shape op and F.scaled_dot_product_attention (its output is 0 already).
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return _attn_triton().varlen_backward(dout, q, k, v, out, lse,
                                          _view(kind, meta, meta_host, extra), kind, window,
                                          scale)


@_attn_bwd_op.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, meta, meta_host, extra, kind, window, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, meta, meta_host, extra, kind, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, meta, meta_host, extra)
    ctx.args = (kind, window, scale)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, dout, _dlse):
    dq, dk, dv = _attn_bwd_op(dout, *ctx.saved_tensors, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup)
no_double_backward(_attn_bwd_op, "partial_global_attention_varlen / band_attention_varlen")
register_autocast(torch.ops.pargo.varlen_attention_fwd.default)


# --------------------------------------------------------------------------------------------
# registered ops: pooling
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("pargo::pool_tokens_varlen_fwd", mutates_args=())
def _pool_fwd_op(x: Tensor, meta: Tensor, meta_host: Tensor, extra: Tensor,
                 out_token: Tensor) -> Tensor:
    return _pool_triton().pool_varlen_forward(x, _view(KIND_POOL, meta, meta_host, extra))


@_pool_fwd_op.register_fake
def _pool_fwd_fake(x, meta, meta_host, extra, out_token):
    return x.new_empty((out_token.shape[1], x.shape[1]))


@torch.library.custom_op("pargo::pool_tokens_varlen_bwd", mutates_args=())
def _pool_bwd_op(dy: Tensor, meta: Tensor, meta_host: Tensor, extra: Tensor,
                 in_token: Tensor) -> Tensor:
    return _pool_triton().pool_varlen_backward(dy, _view(KIND_POOL, meta, meta_host, extra))


@_pool_bwd_op.register_fake
def _pool_bwd_fake(dy, meta, meta_host, extra, in_token):
    return dy.new_empty((in_token.shape[1], dy.shape[1]))


def _pool_setup(ctx, inputs, output):
    x, meta, meta_host, extra, _ = inputs
    # an empty [0, total_in] token: x's length as a shape, without keeping x alive
    ctx.save_for_backward(meta, meta_host, extra, x.new_empty((0, x.shape[0])))


def _pool_backward(ctx, dy):
    return _pool_bwd_op(dy, *ctx.saved_tensors), None, None, None, None


_pool_fwd_op.register_autograd(_pool_backward, setup_context=_pool_setup)


@torch.library.custom_op("pargo::pool_project_varlen_fwd", mutates_args=())
def _proj_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], meta: Tensor,
                 meta_host: Tensor, extra: Tensor, out_token: Tensor) -> Tensor:
    return _pool_triton().pool_project_varlen_forward(x, weight, bias,
                                                      _view(KIND_POOL, meta, meta_host, extra))


@_proj_fwd_op.register_fake
def _proj_fwd_fake(x, weight, bias, meta, meta_host, extra, out_token):
    return x.new_empty((out_token.shape[1], weight.shape[0]))


@torch.library.custom_op("pargo::pool_project_varlen_bwd", mutates_args=())
def _proj_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, meta: Tensor,
                 meta_host: Tensor, extra: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _pool_triton().pool_project_varlen_backward(dy, x, weight, has_bias,
                                                       _view(KIND_POOL, meta, meta_host, extra))


@_proj_bwd_op.register_fake
def _proj_bwd_fake(dy, x, weight, has_bias, meta, meta_host, extra):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if has_bias else (0,)))


def _proj_setup(ctx, inputs, output):
    x, weight, bias, meta, meta_host, extra, _ = inputs
    ctx.save_for_backward(x, weight, meta, meta_host, extra)
    ctx.has_bias = bias is not None


def _proj_backward(ctx, dy):
    x, weight, meta, meta_host, extra = ctx.saved_tensors
    dx, dw, db = _proj_bwd_op(dy, x, weight, ctx.has_bias, meta, meta_host, extra)
    return dx, dw, (db if ctx.has_bias else None), None, None, None, None


_proj_fwd_op.register_autograd(_proj_backward, setup_context=_proj_setup)
no_double_backward(_pool_bwd_op, "adaptive_avg_pool_tokens_varlen")
no_double_backward(_proj_bwd_op, "adaptive_avg_pool_project_varlen")
register_autocast(torch.ops.pargo.pool_project_varlen_fwd.default)


# --------------------------------------------------------------------------------------------
# dispatch and plan resolution
# --------------------------------------------------------------------------------------------
def _choose(op: str, x: Tensor, backend: str, triton_reasons) -> str:
    """The backend, with the fixed-shape op's Triton refusals (dtype, device, per-arch limits:
    ``triton_reasons()``)."""
    return _backend.resolve(
        op, backend,
        reasons={"cuda": lambda: [_CUDA_REFUSAL], "triton": triton_reasons,
                 "reference": lambda: []},
        preference=("triton", "reference") if x.is_cuda else ("reference",))


def _resolve_plan(plan, kinds: tuple, builder: str, device, args: dict, build,
                  optional: Optional[dict] = None) -> VarlenPlan:
    """The caller's plan (checked against the op and device) or one built from ``args``
    (required) and ``optional``."""
    given = [name for name, value in {**args, **(optional or {})}.items() if value is not None]
    if plan is None:
        missing = [name for name, value in args.items() if value is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} must be given (or pass plan=)")
        return build()
    if given:
        raise ValueError(f"pass either plan= or the per-batch arguments, not both (got "
                         f"{', '.join(given)} with a plan)")
    if not isinstance(plan, VarlenPlan) or plan.kind not in kinds:
        got = f"a plan of kind {plan.kind}" if isinstance(plan, VarlenPlan) else \
            type(plan).__name__
        raise TypeError(f"plan must be a VarlenPlan from {builder}, got {got}")
    if plan.meta.device != device:
        raise ValueError(f"plan was built for {plan.meta.device} but the tensors are on {device}")
    return plan


def _eager() -> bool:
    """Host-side checks that read the plan's CPU tensors run eagerly only (the launchers
    repeat them at run time, also under torch.compile)."""
    return not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def _check_packed_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 3)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError("q, k, v must share the head dim H of [total, H, D]: got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head dim {k.shape[2]} must equal q head dim {q.shape[2]}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v has {v.shape[0]} tokens but k has {k.shape[0]}; they must match")
    if q.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError("q, k, v must have at least one channel")


def _run_attention(op: str, q, k, v, plan: VarlenPlan, kind: int, window, scale, backend):
    # the fixed-shape op's refusals, on [1, total, H, D] views (head dim last, as there)
    chosen = _choose(op, q, backend,
                     lambda: _attention_triton_reasons(q[None], k[None], v[None]))
    if _eager():
        plan.check_lengths(q.shape[0], k.shape[0])
    if chosen == "reference":
        return _attention_reference(q, k, v, plan, kind, window, scale)
    refuse_functorch(op, chosen)
    out, _ = _attn_fwd_op(q, k, v, plan.meta, plan.meta_host, plan.extra, kind,
                          [int(w) for w in window], scale)
    return out


def _attention_reference(q, k, v, plan: VarlenPlan, kind: int, window, scale):
    """Per sequence, the fixed-shape reference on its slices (``[1, H, N, D]`` views)."""
    outs = []
    for row in plan.meta_host[:-1].tolist():
        qs, ks, nq, nv = row[A_Q_START], row[A_K_START], row[A_NQ], row[A_NV]
        if kind == KIND_BAND:
            mask = BandMask(nq, *band_window(row, window))
        else:
            p = row[A_P0:A_P0 + 5]
            grids = ((p[1], p[2]), (p[3], p[4])) if kind == KIND_PG2D else (None, None)
            mask = PartialGlobalMask(nq, nv, p[0], *grids)
        sl = [t[s:s + n].transpose(0, 1)[None] for t, s, n in ((q, qs, nq), (k, ks, nv),
                                                                 (v, ks, nv))]
        outs.append(masked_attention(*sl, mask.materialize(q.device), scale)[0].transpose(0, 1))
    return torch.cat(outs, 0)


@autocast_like_sdpa("q", "k", "v")
def partial_global_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q=None,
                                    cu_seqlens_k=None, n_partial=None, *, visual_grids=None,
                                    partial_grids=None, scale: Optional[float] = None,
                                    backend: str = "auto",
                                    plan: Optional[VarlenPlan] = None) -> Tensor:
    """ParGo partial-global cross-attention over a packed batch (DESIGN.md §1, §5).

    Args:
        q: ``[total_q, H, D]``, k: ``[total_k, H, D]``, v: ``[total_k, H, Dv]``, any strides:
            the sequences' tokens concatenated.
        cu_seqlens_q, cu_seqlens_k: offsets ``[n_seq + 1]`` (list of ints, CPU or CUDA int
            tensor; a CUDA tensor is copied to the host once, a synchronisation): ``0``,
            non-decreasing, ending at ``total_q`` / ``total_k``; every sequence needs
            ``Nq_i >= 1`` queries and ``Nv_i >= 1`` keys.
        n_partial: an int for every sequence, or one per sequence (list / 1-D int tensor),
            ``0 <= Np_i <= min(Nq_i, Nv_i)``: the first ``Np_i`` queries of sequence ``i`` are
            partial, the rest global (``Np_i = 0``: plain cross-attention; ``Np_i = Nq_i``: no
            globals).
        visual_grids, partial_grids: None (1-D windows) or both ``[n_seq, 2]`` (list of pairs or
            int tensor) for 2-D windows; then ``Hv_i * Wv_i = Nv_i`` and ``hp_i * wp_i = Np_i``
            (so ``Np_i >= 1``).
        scale: softmax scale shared by all sequences, default ``1/sqrt(D)``.
        backend: ``"auto"`` (CUDA tensors: Triton; CPU: reference), ``"triton"`` (on CPU only
            under ``TRITON_INTERPRET=1``) or ``"reference"`` (a loop over sequences of the
            dense-mask reference). ``"cuda"`` refuses: the CUDA kernels have no varlen form.
        plan: a :func:`~pargo_kernels.varlen_plan.plan_partial_global` plan instead of the
            per-batch arguments (then leave ``cu_seqlens_q``, ``cu_seqlens_k``, ``n_partial``
            and the grids None): no host-device synchronisation, no validation cost per call.

    Sequence ``i`` of the result equals ``partial_global_attention`` on its slices
    (``[1, H, N, D]``) with its own ``n_partial`` and grids. Returns ``[total_q, H, Dv]``.
    """
    _check_packed_qkv(q, k, v)
    plan = _resolve_plan(
        plan, (KIND_PG1D, KIND_PG2D), "plan_partial_global", q.device,
        dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, n_partial=n_partial),
        lambda: plan_partial_global(cu_seqlens_q, cu_seqlens_k, n_partial,
                                    visual_grids=visual_grids, partial_grids=partial_grids,
                                    device=q.device),
        dict(visual_grids=visual_grids, partial_grids=partial_grids))
    return _run_attention("partial_global_attention_varlen", q, k, v, plan, plan.kind, (0, 0),
                          check_scale(scale, q.shape[2]), backend)


@autocast_like_sdpa("q", "k", "v")
def band_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens=None, window=None, *,
                          scale: Optional[float] = None, backend: str = "auto",
                          plan: Optional[VarlenPlan] = None) -> Tensor:
    """Banded self-attention over a packed batch (DESIGN.md §2, §5).

    ``q, k, v``: ``[total, H, D]`` (``v`` may have its own head dim), any strides;
    ``cu_seqlens``: offsets as in :func:`partial_global_attention_varlen`. ``window``:

    * ``(left, right)``, non-negative ints shared by all sequences; or
    * one ``(left, right)`` per sequence: a list of ``n_seq`` pairs or an int tensor
      ``[n_seq, 2]`` (CPU: no synchronisation; CUDA: one copy to the host), e.g. a cascade over
      images with different partial counts (``cascade_windows(n_partial_i, ...)[layer]``).

    Query ``i`` of sequence ``s`` sees keys ``j`` of the same sequence with
    ``i - left_s <= j <= i + right_s`` (windows wider than the sequence are clipped); no key
    crosses a sequence boundary. One launch per pass serves the whole batch, whatever the
    windows. ``plan=``: a :func:`~pargo_kernels.varlen_plan.plan_band` plan instead of
    ``cu_seqlens`` (no synchronisation): ``plan_band(cu_seqlens)`` serves every shared window
    (pass ``window=(left, right)`` with it: one plan for a whole cascade);
    ``plan_band(cu_seqlens, windows=...)`` carries per-sequence windows (leave ``window`` None).
    ``scale``, ``backend`` as in :func:`partial_global_attention_varlen`.
    Returns ``[total, H, Dv]``.
    """
    _check_packed_qkv(q, k, v)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"band_attention_varlen is self-attention: k has {k.shape[0]} tokens "
                         f"but q has {q.shape[0]}")
    per_seq = _per_sequence(window)
    windows = window if per_seq else None
    plan = _resolve_plan(plan, (KIND_BAND,), "plan_band", q.device, dict(cu_seqlens=cu_seqlens),
                         lambda: _band_plan(cu_seqlens, windows, q.device), dict(window=windows))
    if plan.windows:  # the plan's per-sequence windows; the kernels take (0, 0) as the pair
        if window is not None and not per_seq:
            raise ValueError("window must be None with a plan built with per-sequence windows "
                             f"(plan_band(cu_seqlens, windows=...)), got {window!r}")
        window = (0, 0)
    elif not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError("window must be a pair (left, right) of non-negative ints, or one pair "
                        f"per sequence, got {window!r}")
    else:
        band = BandMask(1, window[0], window[1])  # validates the window
        # Clipped as the kernels clip it to each sequence (no sequence reaches 2**31 tokens), so
        # a window of 2**63 or more is as valid as on the fixed-shape op.
        window = (min(band.left, _MAX_TOKENS), min(band.right, _MAX_TOKENS))
    return _run_attention("band_attention_varlen", q, k, v, plan, KIND_BAND, window,
                          check_scale(scale, q.shape[2]), backend)


def _per_sequence(window) -> bool:
    """Is ``window`` one pair per sequence (an int tensor, or a list holding pairs) rather than
    one ``(left, right)`` for all?"""
    return isinstance(window, Tensor) or isinstance(window, (list, tuple)) and any(
        isinstance(w, (list, tuple)) or isinstance(w, Tensor) and w.dim() > 0 for w in window)


def _band_plan(cu_seqlens, windows, device) -> VarlenPlan:
    """``plan_band`` from the call's arguments; per-sequence windows are checked here so that
    errors name the argument ``window`` (the offsets go on as a list: one host copy at most)."""
    cu = check_cu_seqlens("cu_seqlens", cu_seqlens, min_len=1)
    windows = None if windows is None else check_windows("window", windows, len(cu) - 1)
    return plan_band(cu, windows=windows, device=device)


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------
def _pool_plan(x, cu_seqlens, in_grids, out_grids, plan) -> VarlenPlan:
    plan = _resolve_plan(plan, (KIND_POOL,), "plan_pool", x.device,
                         dict(cu_seqlens=cu_seqlens, in_grids=in_grids, out_grids=out_grids),
                         lambda: plan_pool(cu_seqlens, in_grids, out_grids, device=x.device))
    if _eager():
        plan.check_length("x", x.shape[0], P_IN_START, "cu_seqlens")
    return plan


def _pool_reference(x, plan: VarlenPlan, project=None) -> Tensor:
    """Per image, the fixed-shape reference on its slice."""
    outs = []
    for row in plan.meta_host[:-1].tolist():
        start, grid = row[P_IN_START], (row[P_HIN], row[P_WIN])
        xs = x[start:start + grid[0] * grid[1]][None]
        out_grid = (row[P_HOUT], row[P_WOUT])
        outs.append(pool_tokens_reference(xs, grid, out_grid)[0] if project is None else
                    pool_project_reference(xs, *project, grid, out_grid)[0])
    return torch.cat(outs, 0)


def adaptive_avg_pool_tokens_varlen(x: Tensor, cu_seqlens=None, in_grids=None, out_grids=None,
                                    *, backend: str = "auto",
                                    plan: Optional[VarlenPlan] = None):
    """Adaptive average pooling of a packed batch of token grids (DeCo), differentiable.

    Args:
        x: ``[total_in, C]``, the images' tokens concatenated (each a row-major grid), any
            strides.
        cu_seqlens: offsets ``[n_seq + 1]`` (list, CPU or CUDA int tensor; CUDA: one copy to
            host).
        in_grids: ``[n_seq, 2]`` (list of pairs or int tensor), ``Hin_i * Win_i`` = the length
            of image ``i``.
        out_grids: ``[n_seq, 2]``, or one pair for every image.
        backend: ``"auto"`` (CUDA tensors: Triton; CPU: reference), ``"triton"`` or
            ``"reference"``; ``"cuda"`` refuses (no varlen CUDA kernel).
        plan: a :func:`~pargo_kernels.varlen_plan.plan_pool` plan instead of the per-batch
            arguments (no synchronisation).

    Returns ``(y [total_out, C], cu_seqlens_out)``: image ``i`` of ``y`` is
    ``adaptive_avg_pool_tokens`` of its slice from ``in_grids[i]`` to ``out_grids[i]``;
    ``cu_seqlens_out`` is a CPU int32 tensor (feed it to the next plan without a sync).
    """
    check_tensor("x", x, 2)
    plan = _pool_plan(x, cu_seqlens, in_grids, out_grids, plan)
    chosen = _choose("adaptive_avg_pool_tokens_varlen", x, backend,
                     lambda: _pool_triton_reasons(x))
    if chosen == "reference":
        return _pool_reference(x, plan), plan.cu_seqlens_out
    refuse_functorch("adaptive_avg_pool_tokens_varlen", chosen)
    return (_pool_fwd_op(x, plan.meta, plan.meta_host, plan.extra, plan.out_token),
            plan.cu_seqlens_out)


@autocast_like_sdpa("x", "weight", "bias")  # as F.linear; the pooling alone is not cast
def adaptive_avg_pool_project_varlen(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     cu_seqlens=None, in_grids=None, out_grids=None, *,
                                     backend: str = "auto", plan: Optional[VarlenPlan] = None):
    """``F.linear(adaptive_avg_pool_tokens_varlen(x, ...)[0], weight, bias)``, fused (the
    pooling is done while loading the GEMM's input tile, as in
    ``adaptive_avg_pool_project``). ``weight [F, C]``, ``bias [F]`` or None; other arguments as
    in :func:`adaptive_avg_pool_tokens_varlen`. Returns ``(y [total_out, F], cu_seqlens_out)``.
    """
    check_tensor("x", x, 2)
    check_projection(x, weight, bias)
    plan = _pool_plan(x, cu_seqlens, in_grids, out_grids, plan)
    chosen = _choose("adaptive_avg_pool_project_varlen", x, backend,
                     lambda: _pool_triton_reasons(x, fused=True))
    if chosen == "reference":
        return _pool_reference(x, plan, (weight, bias)), plan.cu_seqlens_out
    refuse_functorch("adaptive_avg_pool_project_varlen", chosen)
    return (_proj_fwd_op(x, weight, bias, plan.meta, plan.meta_host, plan.extra, plan.out_token),
            plan.cu_seqlens_out)


__all__ = ["partial_global_attention_varlen", "band_attention_varlen",
           "adaptive_avg_pool_tokens_varlen", "adaptive_avg_pool_project_varlen",
           "VarlenPlan", "plan_partial_global", "plan_band", "plan_pool"]
