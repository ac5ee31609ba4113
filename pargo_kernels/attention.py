"""Public attention ops: partial-global cross-attention, banded (cascaded) self-attention and
ParGo's whole self-attention (partial band + global block) in one launch.

Layering (as in FlashAttention / Liger): Triton kernels and launchers live in
``ops/attention_triton.py``; here they are registered as ``torch.library`` custom ops with fake
(meta) implementations and autograd, and wrapped in documented, validated functions.

Registered ops (mask as ``kind`` + five int ``params``, see :mod:`pargo_kernels.masks`):

* ``pargo::masked_attention_fwd(q, k, v, kind, params, scale, backend) -> (out, lse)``
* ``pargo::masked_attention_bwd(dout, q, k, v, out, lse, kind, params, scale, backend)
  -> (dq, dk, dv)``
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _cuda
from ._transforms import autocast_like_sdpa, no_double_backward, refuse_functorch, register_autocast
from ._validate import check_int, check_same, check_scale, check_tensor
from .masks import BandMask, ParGoSelfMask, PartialGlobalMask
from .reference import masked_attention

MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What the hand-written CUDA kernels (csrc/attention_*.cu) serve: tensor-core mma.sync on sm_80+.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MIN_CAPABILITY = (8, 0)
_CUDA_MAX_TILES = 65535  # grid y: query tiles of 64 rows (fwd, dQ), key tiles of 64 (dK/dV)


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
def _triton():
    from .ops import attention_triton  # imported lazily: triton is only needed when used
    return attention_triton


@torch.library.custom_op("pargo::masked_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, kind: int, params: list[int], scale: float,
            backend: str) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return _triton().attention_forward(q, k, v, kind, params, scale)
    if backend == "cuda":
        return _cuda.ops().attention_fwd(q, k, v, kind, params, scale)
    raise ValueError(f"pargo::masked_attention_fwd: unknown backend {backend!r}")


@_fwd_op.register_fake
def _fwd_fake(q, k, v, kind, params, scale, backend):
    B, H, Nq, _ = q.shape
    return (q.new_empty((B, H, Nq, v.shape[3])),
            q.new_empty((B, H, Nq), dtype=torch.float32))


@torch.library.custom_op("pargo::masked_attention_bwd", mutates_args=())
def _bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kind: int,
            params: list[int], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    # A row whose scores are all -inf (only reachable with -inf in the inputs) has LSE = -inf, its
    # logsumexp; the kernels' P = 2^(S - LSE) would be NaN there. +inf makes P = 0: zero
    # gradients, as F.scaled_dot_product_attention gives (its forward output is 0 already).
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    if backend == "triton":
        return _triton().attention_backward(dout, q, k, v, out, lse, kind, params, scale)
    if backend == "cuda":
        return _cuda.ops().attention_bwd(dout, q, k, v, out, lse, kind, params, scale)
    raise ValueError(f"pargo::masked_attention_bwd: unknown backend {backend!r}")


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, kind, params, scale, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, kind, params, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mask = (kind, params, scale, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    kind, params, scale, backend = ctx.mask
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, kind, params, scale, backend)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
no_double_backward(_bwd_op, "partial_global_attention / band_attention")
register_autocast(torch.ops.pargo.masked_attention_fwd.default)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def _triton_reasons(q: Tensor, k: Tensor, v: Tensor, capability=None) -> list[str]:
    """Why the Triton backend cannot serve these inputs; ``capability`` (``(major, minor)``)
    defaults to that of ``q``'s GPU (none is checked for CPU tensors, the interpreter)."""
    why = _backend.triton_device_reasons([q])
    if q.dtype not in _TRITON_DTYPES:
        why.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    elif capability is not None or (q.is_cuda and not why):
        from .ops.attention_plan import arch_refusal  # no triton import needed
        refusal = arch_refusal(capability or torch.cuda.get_device_capability(q.device), q.dtype,
                               max(q.shape[3], v.shape[3]))
        if refusal:
            why.append(refusal)
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        why.append(f"head dims ({q.shape[3]}, {v.shape[3]}) exceed {MAX_HEAD_DIM}")
    return why


def _cuda_reasons(q: Tensor, k: Tensor, v: Tensor) -> list[str]:
    why = []
    if q.dtype == torch.float32:
        why.append("fp32 uses the Triton backend (the CUDA kernels are fp16/bf16 tensor-core "
                   "kernels)")
    elif q.dtype not in CUDA_DTYPES:
        why.append(f"dtype {q.dtype} is not supported (float16, bfloat16)")
    if q.shape[3] not in CUDA_HEAD_DIMS:
        why.append(f"head dim {q.shape[3]} is not supported (the CUDA kernels are built for "
                   f"{', '.join(map(str, CUDA_HEAD_DIMS))}; other head dims use the Triton "
                   "backend)")
    if v.shape[3] != q.shape[3]:
        why.append(f"value head dim Dv = {v.shape[3]} differs from D = {q.shape[3]} (the CUDA "
                   "kernels need Dv == D)")
    if -(-q.shape[2] // 64) > _CUDA_MAX_TILES or -(-k.shape[2] // 64) > _CUDA_MAX_TILES:
        why.append(f"Nq = {q.shape[2]} or Nv = {k.shape[2]} exceeds {_CUDA_MAX_TILES} tiles of 64")
    ext = _cuda.cuda_extension_reasons([q, k, v])
    why += ext
    if not ext:
        cap = torch.cuda.get_device_capability(q.device)
        if cap < CUDA_MIN_CAPABILITY:
            why.append(f"the CUDA kernels need sm_80 or newer (mma.sync bf16), device is "
                       f"sm_{cap[0]}{cap[1]}")
    return why


# ``auto`` on CUDA tensors picks whichever of "cuda" / "triton" is faster *as measured*, never
# by guess (issue 5, requirement 3). No GPU session has yet measured the CUDA kernels against
# the Triton ones (benchmarks/bench_partial_global.py and bench_band.py, provider
# "ours[cuda]" vs "ours[triton]", results committed under benchmarks/results/), so Triton comes
# first. The first GPU session that commits those numbers must set this order from them (per
# op, dtype and head dim if the winner differs) and cite the results file here.
_AUTO_PREFERENCE_CUDA_TENSORS = ("triton", "cuda", "reference")


def _run(op: str, q: Tensor, k: Tensor, v: Tensor, mask, scale: float, backend: str) -> Tensor:
    chosen = _backend.resolve(
        op, backend,
        reasons={"cuda": lambda: _cuda_reasons(q, k, v),
                 "triton": lambda: _triton_reasons(q, k, v),
                 "reference": lambda: []},
        preference=_AUTO_PREFERENCE_CUDA_TENSORS if q.is_cuda else ("reference",))
    if chosen == "reference":
        return masked_attention(q, k, v, mask.materialize(q.device), scale)
    refuse_functorch(op, chosen)
    out, _ = _fwd_op(q, k, v, mask.kind, list(mask.params), scale, chosen)
    return out


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    check_same(("q", "k", "v"), (q, k, v))
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError("q, k, v must share batch and head dims [B, H]: got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {q.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} tokens but k has {k.shape[2]}; they must match")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise ValueError(f"{name} must have at least one token and one channel, got shape "
                             f"{tuple(t.shape)}")


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
@autocast_like_sdpa("q", "k", "v")
def partial_global_attention(q: Tensor, k: Tensor, v: Tensor, n_partial: int, *,
                             scale: Optional[float] = None,
                             visual_grid: Optional[Sequence[int]] = None,
                             partial_grid: Optional[Sequence[int]] = None,
                             backend: str = "auto") -> Tensor:
    """ParGo partial-global cross-attention (DESIGN.md §1), block-sparse, differentiable.

    Args:
        q: ``[B, H, Nq, D]`` queries: the first ``n_partial`` are partial, the rest global.
        k: ``[B, H, Nv, D]`` keys (visual tokens). v: ``[B, H, Nv, Dv]`` values. Any strides.
        n_partial: number of partial queries ``Np``, ``0 <= Np <= min(Nq, Nv)``. ``0`` is plain
            cross-attention; ``Np = Nq`` is pure block-diagonal attention.
        scale: softmax scale, default ``1/sqrt(D)``.
        visual_grid, partial_grid: ``(rows, cols)`` of the key grid and of the partial-query
            grid (row-major); give both for 2-D windows (those of ``adaptive_avg_pool2d``).
        backend: ``"auto"`` (CUDA tensors: Triton; CPU: reference), ``"triton"`` (on CPU tensors
            only under ``TRITON_INTERPRET=1``), ``"reference"`` (dense-mask eager PyTorch) or
            ``"cuda"`` (csrc/attention_*.cu: fp16/bf16, head dims 64 and 128 with ``Dv == D``,
            sm_80+, the extension built). ``PARGO_BACKEND`` pins the backend of ``"auto"``
            calls.

    Windows (1-D): partial query ``i`` attends to keys ``[floor(i*Nv/Np), floor((i+1)*Nv/Np))``;
    global queries attend to all keys. With ``Np = 4, Ng = 2, Nv = 8``::

        q0  ##......
        q1  ..##....
        q2  ....##..
        q3  ......##
        g0  ########
        g1  ########

    Returns ``[B, H, Nq, Dv]`` (contiguous) in the dtype of ``q``. Softmax statistics and
    accumulation are fp32; fp32 inputs are computed in true fp32 (no TF32).
    """
    _check_qkv(q, k, v)
    mask = PartialGlobalMask(q.shape[2], k.shape[2], n_partial, _grid("visual_grid", visual_grid),
                             _grid("partial_grid", partial_grid))
    scale = check_scale(scale, q.shape[3])
    return _run("partial_global_attention", q, k, v, mask, scale, backend)


@autocast_like_sdpa("q", "k", "v")
def band_attention(q: Tensor, k: Tensor, v: Tensor, window: Sequence[int], *,
                   scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Banded self-attention (ParGo's Cascaded Partial Perception, DESIGN.md §2).

    ``q, k, v``: ``[B, H, N, D]`` (``v`` may have its own head dim), any strides.
    ``window = (left, right)``, non-negative ints: query ``i`` attends to key ``j`` iff
    ``i - left <= j <= i + right``. ``(left, 0)`` is causal-like, ``(N-1, N-1)`` full attention;
    wider windows are clipped. Every row sees at least itself. With ``window = (2, 1)``, N = 6::

        ##....
        ###...
        ####..
        .####.
        ..####
        ...###

    The window reaches the kernels as two int scalars: a new window per layer costs no
    recompilation and builds no mask tensor. ``backend`` as in :func:`partial_global_attention`.
    """
    _check_qkv(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"band_attention is self-attention: k has {k.shape[2]} tokens but q has "
                         f"{q.shape[2]}")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right) of non-negative ints, got {window!r}")
    mask = BandMask(q.shape[2], window[0], window[1])
    scale = check_scale(scale, q.shape[3])
    return _run("band_attention", q, k, v, mask, scale, backend)


def pargo_self_attention(q: Tensor, k: Tensor, v: Tensor, n_partial: int,
                         window: Optional[Sequence[int]] = None, *, scale: Optional[float] = None,
                         backend: str = "auto") -> Tensor:
    """ParGo's whole self-attention in one launch (DESIGN.md §4): the partial queries' band and
    the global queries' block, which nothing crosses.

    ``q, k, v``: ``[B, H, N, D]`` (``v`` may have its own head dim), any strides; the first
    ``n_partial`` tokens are partial, the rest global. Rows ``i < Np`` attend to keys
    ``j < Np`` with ``i - left <= j <= i + right`` (``window = (left, right)``, non-negative ints;
    wider than ``Np`` is clipped); ``window=None`` lets them see every partial key (the released
    ParGo code's static mask). Rows ``i >= Np`` attend to keys ``[Np, N)``. ``n_partial = 0`` is
    full attention over ``N``, ``n_partial = N`` a pure band. With ``Np = 5, N = 7,
    window = (1, 0)``::

        #......
        ##.....
        .##....
        ..##...
        ...##..
        .....##
        .....##

    Equals ``band_attention`` on the partial rows concatenated with full attention on the global
    rows, in one launch of each kernel. The window reaches the kernels as int scalars: a new
    window per layer costs no recompilation and builds no mask tensor. ``backend`` as in
    :func:`partial_global_attention`.
    """
    _check_qkv(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"pargo_self_attention is self-attention: k has {k.shape[2]} tokens but "
                         f"q has {q.shape[2]}")
    if window is None:
        left = right = None
    elif not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError("window must be None or a pair (left, right) of non-negative ints, got "
                        f"{window!r}")
    else:
        left, right = window
        if left is None or right is None:
            raise TypeError(f"window must be None or a pair of ints, got {window!r}")
    mask = ParGoSelfMask(q.shape[2], n_partial, left, right)
    scale = check_scale(scale, q.shape[3])
    return _run("pargo_self_attention", q, k, v, mask, scale, backend)


CASCADE_MODES = ("causal", "symmetric")


def cascade_windows(n_partial: int, n_layers: int, mode: str = "causal") -> list[tuple[int, int]]:
    """Per-layer band windows of ParGo's cascade: layer ``l`` (1-based) of ``d`` lets each partial
    token see ``n_vis = ceil(l * n_partial / d)`` adjacent tokens (itself included).

    Rounding: ``ceil``, so the last layer's band is ``n_partial`` wide and the first at least
    one; when ``d`` divides ``n_partial`` it is the paper's ``l * n_partial / d`` exactly. A band
    is clipped at the ends of the sequence (it is not shifted inwards), so tokens near an end see
    fewer than ``n_vis`` tokens.

    * ``"causal"``: ``(n_vis - 1, 0)``, the token and the ``n_vis - 1`` before it;
    * ``"symmetric"``: ``n_vis - 1`` split around the token, the odd one to the left:
      ``(ceil((n_vis - 1) / 2), floor((n_vis - 1) / 2))``.

    ``cascade_windows(288, 6)`` -> ``[(47, 0), (95, 0), ..., (287, 0)]`` (widths 48, 96, ..., 288).
    """
    n_partial = check_int("n_partial", n_partial, 1)
    n_layers = check_int("n_layers", n_layers, 1)
    if mode not in CASCADE_MODES:
        raise ValueError(f"mode must be one of {CASCADE_MODES}, got {mode!r}")
    windows = []
    for layer in range(1, n_layers + 1):
        n_vis = -(-layer * n_partial // n_layers)
        if mode == "causal":
            windows.append((n_vis - 1, 0))
        else:
            windows.append((n_vis // 2, (n_vis - 1) // 2))
    return windows


def _grid(name, grid):
    if grid is None:
        return None
    if isinstance(grid, (tuple, list)):
        return tuple(grid)
    raise TypeError(f"{name} must be a pair (rows, cols) of ints, got {grid!r}")


__all__ = ["partial_global_attention", "band_attention", "pargo_self_attention",
           "cascade_windows"]
