"""Public pooling ops: adaptive average pooling of tokens, optionally fused with a projection
(DESIGN.md §3, DeCo).

Layering (as in :mod:`pargo_kernels.attention`): Triton kernels and launchers live in
``ops/pool_triton.py``, CUDA kernels in ``csrc/pool_tokens.cu`` (loaded by
:mod:`pargo_kernels._cuda`); here they are registered as ``torch.library`` custom ops with fake
(meta) implementations and autograd, and wrapped in documented, validated functions.

Registered ops (grids as ``[rows, cols]`` int lists):

* ``pargo::pool_tokens_fwd(x, in_grid, out_grid, backend) -> y``
* ``pargo::pool_tokens_bwd(dy, in_grid, out_grid, backend) -> dx``
* ``pargo::pool_project_fwd(x, weight, bias?, in_grid, out_grid, backend) -> y``
* ``pargo::pool_project_bwd(dy, x, weight, has_bias, in_grid, out_grid, backend)
  -> (dx, dweight, dbias)`` (``dbias`` has shape ``[0]`` when ``has_bias`` is False)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _cuda
from ._transforms import autocast_like_sdpa, no_double_backward, refuse_functorch, register_autocast
from ._validate import check_grid, check_same, check_tensor

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The path ``adaptive_avg_pool_project(fused=None)`` takes: the pooling kernel, then F.linear
# (cuBLAS). Chosen by the work model (benchmarks/work_model_pool.py; benchmarks/README.md,
# "pool_project: fused or pool + matmul"), a model, not a timing: at the DeCo shape the fused
# kernel requests fewer HBM bytes (1.00x vs 1.25x the floor) but re-pools every row tile once
# per 64-wide feature tile (64x the pooling adds, 4-8x the loads into the SMs of pool + a
# 128x128-tiled GEMM), so the model does not show it at least as cheap. A GPU benchmark
# (bench_pooling.py: ours[triton] vs ours-fused[triton]) may revisit this.
FUSED_DEFAULT = False


# --------------------------------------------------------------------------------------------
# reference (eager PyTorch; the tests run it in float64 as the oracle)
# --------------------------------------------------------------------------------------------
def pool_tokens_reference(x: Tensor, in_grid: Sequence[int], out_grid: Sequence[int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` on ``x [B, Hin*Win, C]`` viewed as ``[B, C, Hin, Win]``."""
    B, _, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, int(in_grid[0]), int(in_grid[1]))
    return F.adaptive_avg_pool2d(img, (int(out_grid[0]), int(out_grid[1]))).flatten(2) \
        .transpose(1, 2)


def pool_project_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           in_grid: Sequence[int], out_grid: Sequence[int]) -> Tensor:
    """``F.linear(pool_tokens_reference(x, in_grid, out_grid), weight, bias)``."""
    return F.linear(pool_tokens_reference(x, in_grid, out_grid), weight, bias)


# --------------------------------------------------------------------------------------------
# registered ops
# --------------------------------------------------------------------------------------------
def _triton():
    from .ops import pool_triton  # imported lazily: triton is only needed when used
    return pool_triton


@torch.library.custom_op("pargo::pool_tokens_fwd", mutates_args=())
def _pool_fwd_op(x: Tensor, in_grid: list[int], out_grid: list[int], backend: str) -> Tensor:
    if backend == "triton":
        return _triton().pool_forward(x, in_grid, out_grid)
    if backend == "cuda":
        return _cuda.ops().pool_tokens_fwd(x, *in_grid, *out_grid)
    raise ValueError(f"pargo::pool_tokens_fwd: unknown backend {backend!r}")


@_pool_fwd_op.register_fake
def _pool_fwd_fake(x, in_grid, out_grid, backend):
    return x.new_empty((x.shape[0], out_grid[0] * out_grid[1], x.shape[2]))


@torch.library.custom_op("pargo::pool_tokens_bwd", mutates_args=())
def _pool_bwd_op(dy: Tensor, in_grid: list[int], out_grid: list[int], backend: str) -> Tensor:
    if backend == "triton":
        return _triton().pool_backward(dy, in_grid, out_grid)
    if backend == "cuda":
        return _cuda.ops().pool_tokens_bwd(dy, *in_grid, *out_grid)
    raise ValueError(f"pargo::pool_tokens_bwd: unknown backend {backend!r}")


@_pool_bwd_op.register_fake
def _pool_bwd_fake(dy, in_grid, out_grid, backend):
    return dy.new_empty((dy.shape[0], in_grid[0] * in_grid[1], dy.shape[2]))


def _pool_setup_context(ctx, inputs, output):
    _, in_grid, out_grid, backend = inputs
    ctx.args = (in_grid, out_grid, backend)


def _pool_backward(ctx, dy):
    return _pool_bwd_op(dy, *ctx.args), None, None, None


_pool_fwd_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


@torch.library.custom_op("pargo::pool_project_fwd", mutates_args=())
def _proj_fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_grid: list[int],
                 out_grid: list[int], backend: str) -> Tensor:
    if backend == "triton":
        return _triton().pool_project_forward(x, weight, bias, in_grid, out_grid)
    raise ValueError(f"pargo::pool_project_fwd: unknown backend {backend!r}")


@_proj_fwd_op.register_fake
def _proj_fwd_fake(x, weight, bias, in_grid, out_grid, backend):
    return x.new_empty((x.shape[0], out_grid[0] * out_grid[1], weight.shape[0]))


@torch.library.custom_op("pargo::pool_project_bwd", mutates_args=())
def _proj_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, in_grid: list[int],
                 out_grid: list[int], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton().pool_project_backward(dy, x, weight, has_bias, in_grid, out_grid)
    raise ValueError(f"pargo::pool_project_bwd: unknown backend {backend!r}")


@_proj_bwd_op.register_fake
def _proj_bwd_fake(dy, x, weight, has_bias, in_grid, out_grid, backend):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],) if has_bias else (0,)))


def _proj_setup_context(ctx, inputs, output):
    x, weight, bias, in_grid, out_grid, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (bias is not None, in_grid, out_grid, backend)


def _proj_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    has_bias, in_grid, out_grid, backend = ctx.args
    dx, dw, db = _proj_bwd_op(dy, x, weight, has_bias, in_grid, out_grid, backend)
    return dx, dw, (db if has_bias else None), None, None, None


_proj_fwd_op.register_autograd(_proj_backward, setup_context=_proj_setup_context)
no_double_backward(_pool_bwd_op, "adaptive_avg_pool_tokens")
no_double_backward(_proj_bwd_op, "adaptive_avg_pool_project")
register_autocast(torch.ops.pargo.pool_project_fwd.default)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def _triton_reasons(x: Tensor, fused: bool = False) -> list[str]:
    why = _backend.triton_device_reasons([x])
    if x.dtype not in _KERNEL_DTYPES:
        why.append(f"dtype {x.dtype} is not supported (float16, bfloat16, float32)")
    if fused and not why and x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        if major * 10 + minor < _triton().FUSED_MIN_ARCH:
            why.append(f"the fused pooling + projection kernel needs compute capability >= 8.0 "
                       f"(tensor-core tl.dot), this GPU is sm_{major}{minor}; fused=False "
                       "runs the pooling kernel, then F.linear")
    return why


def _cuda_reasons(x: Tensor) -> list[str]:
    why = _cuda.cuda_extension_reasons([x])
    if x.dtype not in _KERNEL_DTYPES:
        why.append(f"dtype {x.dtype} is not supported (float16, bfloat16, float32)")
    return why


def _choose(op: str, x: Tensor, backend: str, cuda_reasons, fused: bool = False) -> str:
    chosen = _backend.resolve(
        op, backend,
        reasons={"cuda": cuda_reasons,
                 "triton": lambda: _triton_reasons(x, fused),
                 "reference": lambda: []},
        preference=("cuda", "triton", "reference") if x.is_cuda else ("reference",))
    refuse_functorch(op, chosen)
    return chosen


def check_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """``weight [F, C]`` and ``bias [F]`` (or None) of a projection of ``x [..., C]``: ranks,
    devices and dtypes as ``x``, matching sizes (shared with the varlen op)."""
    check_tensor("weight", weight, 2)
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_same(("x", "weight", "bias"), (x, weight, bias))
    else:
        check_same(("x", "weight"), (x, weight))
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[1]} in-features but x has {x.shape[-1]} "
                         "channels (weight must be [out_features, C])")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} "
                         "out-features")


def _check_x(x, in_grid, out_grid) -> tuple[list[int], list[int]]:
    check_tensor("x", x, 3)
    hin, win = check_grid("in_grid", in_grid)
    hout, wout = check_grid("out_grid", out_grid)
    if hin * win != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} tokens but in_grid {(hin, win)} has "
                         f"{hin * win} cells (x must be [B, Hin*Win, C])")
    if hout * wout >= 2**31:  # as the varlen op's limit; the ops' int lists stop at 2**63
        raise ValueError(f"out_grid {(hout, wout)} has {hout * wout} cells, more than "
                         "2**31 - 1")
    return [hin, win], [hout, wout]


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def adaptive_avg_pool_tokens(x: Tensor, in_grid: Sequence[int], out_grid: Sequence[int], *,
                             backend: str = "auto") -> Tensor:
    """Adaptive average pooling of a token grid (DeCo), differentiable.

    Args:
        x: ``[B, Hin*Win, C]`` tokens of a row-major ``Hin x Win`` grid, channels last (as a ViT
            emits them), any strides.
        in_grid: ``(Hin, Win)``, positive ints with ``Hin * Win == x.shape[1]``.
        out_grid: ``(Hout, Wout)``, positive ints (any size: smaller, equal or larger).
        backend: ``"auto"`` (CUDA tensors: the CUDA extension if built, else Triton; CPU:
            reference), ``"cuda"`` (``csrc/pool_tokens.cu``), ``"triton"`` (on CPU tensors only
            under ``TRITON_INTERPRET=1``) or ``"reference"`` (``F.adaptive_avg_pool2d``).
            ``PARGO_BACKEND`` pins the backend of ``"auto"`` calls.

    Returns ``[B, Hout*Wout, C]`` in the dtype of ``x``: exactly ``F.adaptive_avg_pool2d`` on
    ``x`` viewed as ``[B, C, Hin, Win]``. Output cell ``(i, j)`` averages input rows
    ``[floor(i*Hin/Hout), ceil((i+1)*Hin/Hout))`` and columns
    ``[floor(j*Win/Wout), ceil((j+1)*Win/Wout))``; windows overlap when the sizes don't divide
    (27x27 -> 12x12: windows of 3 rows, some sharing a row). Sums are fp32 for 16-bit inputs;
    the backward is a gather (each input token sums ``dy / window size`` over the cells whose
    windows hold it), no atomics.
    """
    in_grid, out_grid = _check_x(x, in_grid, out_grid)
    chosen = _choose("adaptive_avg_pool_tokens", x, backend, lambda: _cuda_reasons(x))
    if chosen == "reference":
        return pool_tokens_reference(x, in_grid, out_grid)
    return _pool_fwd_op(x, in_grid, out_grid, chosen)


@autocast_like_sdpa("x", "weight", "bias")  # as F.linear; the pooling alone is not cast
def adaptive_avg_pool_project(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                              in_grid: Sequence[int], out_grid: Sequence[int],
                              backend: str = "auto", fused: Optional[bool] = None) -> Tensor:
    """``F.linear(adaptive_avg_pool_tokens(x, in_grid, out_grid), weight, bias)``.

    Args:
        x: ``[B, Hin*Win, C]`` tokens, any strides; ``in_grid``, ``out_grid`` as in
            :func:`adaptive_avg_pool_tokens`.
        weight: ``[F, C]`` (``nn.Linear`` layout), bias: ``[F]`` or None (any stride, also an
            expanded one); same dtype and device as ``x``.
        backend: ``"auto"`` (CUDA tensors: the CUDA extension's pooling if built, else
            Triton; CPU: reference), ``"cuda"``, ``"triton"`` or ``"reference"``. The fused
            kernel is Triton-only: ``fused=True`` with ``"cuda"`` refuses.
        fused: ``False``: the pooling kernel, then ``F.linear`` (cuBLAS); ``True``: the fused
            Triton kernel; ``None`` (default): ``FUSED_DEFAULT`` (``False``).

    Returns ``[B, Hout*Wout, F]`` in the dtype of ``x``.

    Why pool + matmul is the default (a work model, not a timing; benchmarks/README.md): the
    fused kernel re-pools each row tile's windows once per 64-wide feature tile. With its
    row-major launch order those re-reads hit in cache (forward HBM bytes at the floor, DeCo
    shape), but it still issues 64x the pooling work and 4-8x the loads into the SMs of pool +
    a tiled GEMM, so the model does not show it at least as cheap as pool + ``F.linear``
    (1.25x the HBM floor: the pooled tensor, 1/4 of ``x``, is written and read once).

    Pool + matmul: the pooled tensor ``[B, Hout*Wout, C]`` is materialised (and saved for the
    backward by ``F.linear``); the backward is autograd's: ``dP = dY @ W``,
    ``dweight = dY^T @ P``, ``dbias = sum dY``, ``dx = unpool(dP)``.

    Fused: one GEMM whose A tile is the pooled window average, computed while loading it (fp32
    sum, rounded to the input dtype as the unfused ``F.linear(pool(x))`` does); the pooled
    tensor is never written to memory. fp32 accumulation; fp32 inputs in true fp32 (no TF32).
    Its backward materialises ``pool(x)`` once and ``dP = dY @ W``; ``dweight = dY^T @
    pool(x)``, ``dbias = sum dY`` (fused into the dweight GEMM), ``dx = unpool(dP)``.
    """
    in_grid, out_grid = _check_x(x, in_grid, out_grid)
    check_projection(x, weight, bias)
    if fused is None:
        fused = FUSED_DEFAULT
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {type(fused).__name__}")
    chosen = _choose("adaptive_avg_pool_project", x, backend,
                     (lambda: ["the fused pooling + projection has no CUDA kernel (Triton only; "
                               "fused=False runs the CUDA pooling, then F.linear)"]) if fused
                     else (lambda: _cuda_reasons(x)), fused)
    if chosen == "reference":
        return pool_project_reference(x, weight, bias, in_grid, out_grid)
    if fused:
        return _proj_fwd_op(x, weight, bias, in_grid, out_grid, chosen)
    return F.linear(_pool_fwd_op(x, in_grid, out_grid, chosen), weight, bias)


__all__ = ["adaptive_avg_pool_tokens", "adaptive_avg_pool_project", "pool_tokens_reference",
           "pool_project_reference"]
