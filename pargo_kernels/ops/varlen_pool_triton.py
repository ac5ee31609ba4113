"""Triton kernels for adaptive average pooling of packed (varlen) token grids, alone and fused
with a projection.

Image ``i`` of a packed batch is tokens ``[in_start_i, in_start_i + Hin_i*Win_i)`` of
``x [total_in, C]``, pooled to rows ``[out_start_i, out_start_i + Hout_i*Wout_i)`` of ``y``;
the per-image offsets and grids are one int32 row each of the plan's metadata
(:mod:`pargo_kernels.varlen_plan`). Kernels work on the flattened output (forward) or input
(backward) row: a row finds its image by a binary search over the offsets, then takes its
window from the image's own grids. A tile of rows may span images (each row reads only its own
image), so no program idles on a small image. The fixed-shape helpers of
:mod:`pool_triton` (``_pooled_tile``, ``_unpooled_tile``) do the window arithmetic, with per-row
(vector) grids; the fused projection's backward reuses the fixed-shape GEMM kernels on the
packed rows as one "image" of ``total_out`` rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import varlen_plan as _plan
from .attention_plan import DEFAULT_ARCH
from .attention_triton import _dot, _precision
from .pool_triton import (_TL_DTYPE, FUSED_MIN_ARCH, POOL_BLOCK_CS, _label, _pool_proj_dp_kernel,
                          _pool_proj_dw_kernel, _pooled_tile, _unpooled_tile, gemm_config,
                          launch_grid, pool_config, split_options)

# metadata columns, as constexprs for the kernels
P_IN_START = tl.constexpr(_plan.P_IN_START)
P_OUT_START = tl.constexpr(_plan.P_OUT_START)
P_HIN = tl.constexpr(_plan.P_HIN)
P_WIN = tl.constexpr(_plan.P_WIN)
P_HOUT = tl.constexpr(_plan.P_HOUT)
P_WOUT = tl.constexpr(_plan.P_WOUT)
P_FIELDS = tl.constexpr(_plan.P_FIELDS)

_NO_SPEC = ["M", "C", "NF", "n_seq", "STEPS", "KH", "KW"]


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _find_seq(META, column, t, n_seq, STEPS, F: tl.constexpr):
    """Sequence holding position ``t`` (scalar or vector, ``0 <= t < total``): the largest
    ``s`` with ``META[s, column] <= t``, by binary search over the cumulative column (empty
    sequences are skipped) in ``STEPS = ceil(log2(n_seq))`` iterations."""
    lo = t * 0
    hi = lo + n_seq
    for _ in range(0, STEPS):
        mid = (lo + hi) // 2
        go = tl.load(META + mid * F + column) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _image_rows(META, rows, M, n_seq, STEPS, column, other):
    """Per row of a flattened packed tile (``column``: the offsets it indexes, ``other``: the
    offsets of the other side): (local index in its image, the image's ``other`` offset,
    Hin, Win, Hout, Wout)."""
    s = _find_seq(META, column, tl.minimum(rows, M - 1), n_seq, STEPS, P_FIELDS)
    meta = META + s * P_FIELDS
    return (rows - tl.load(meta + column), tl.load(meta + other).to(tl.int64),
            tl.load(meta + P_HIN), tl.load(meta + P_WIN), tl.load(meta + P_HOUT),
            tl.load(meta + P_WOUT))


@triton.jit
def _varlen_pooled_tile(X, META, rows, chans, M, C, n_seq, STEPS, KH, KW, sxn,
                        sxc, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile of ``pool(x)`` for packed output rows ``rows`` (rows >= M come out as 0):
    the fixed-shape tile of one image per row, with that image's grids as vectors."""
    o, in_start, hin, win, hout, wout = _image_rows(META, rows, M, n_seq, STEPS, P_OUT_START,
                                                    P_IN_START)
    n_out = hout * wout
    # B = 1 per row (o < n_out, so the image index rows // Nout is 0); invalid rows get M = 0
    return _pooled_tile(X + in_start * sxn, o, chans, tl.where(rows < M, n_out, 0), C, n_out,
                        hin, win, hout, wout, KH, KW, 0, sxn, sxc, BLOCK_R, BLOCK_K)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_varlen_fwd_kernel(
    X, Y, META, sxn, sxc, syn, syc, M, C, n_seq, STEPS, KH, KW,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = _varlen_pooled_tile(X, META, rows, chans, M, C, n_seq, STEPS, KH, KW, sxn, sxc,
                              BLOCK_M, BLOCK_C)
    tl.store(Y + rows.to(tl.int64)[:, None] * syn + chans[None, :] * syc,
             acc.to(Y.dtype.element_ty), mask=(rows < M)[:, None] & (chans < C)[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_varlen_bwd_kernel(
    DY, DX, META, sdyn, sdyc, sdxn, sdxc, M, C, n_seq, STEPS, KH, KW,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx[t] = sum over the output cells o of t's image whose window holds t of
    dy[o] / |o|`` (a gather, no atomics); ``M = total_in``, ``(KH, KW)`` bound the inverse
    windows over the batch."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    c_ok = chans < C
    t, out_start, hin, win, hout, wout = _image_rows(META, rows, M, n_seq, STEPS, P_IN_START,
                                                     P_OUT_START)
    acc = _unpooled_tile(DY + out_start * sdyn, t, row_ok, chans, c_ok, hin, win, hout, wout,
                         KH, KW, sdyn, sdyc, BLOCK_M, BLOCK_C)
    tl.store(DX + rows.to(tl.int64)[:, None] * sdxn + chans[None, :] * sdxc,
             acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_proj_varlen_fwd_kernel(
    X, W, BIAS, Y, META, sxn, sxc, swn, swc, sbc, syn, syc, M, C, NF, n_seq, STEPS, KH, KW,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y[m, f] = sum_c pool(x)[m, c] * W[f, c] (+ bias[f])``, pooling in the A-tile load;
    ``sbc``: the stride of ``bias`` (any, 0 for an expanded one)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = feats < NF
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        chans = k0 + tl.arange(0, BLOCK_K)
        a = _varlen_pooled_tile(X, META, rows, chans, M, C, n_seq, STEPS, KH, KW, sxn, sxc,
                                BLOCK_M, BLOCK_K).to(W.dtype.element_ty)
        w = tl.load(W + feats[None, :] * swn + chans[:, None] * swc,
                    mask=f_ok[None, :] & (chans < C)[:, None], other=0.0)
        acc += _dot(a, w, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + feats * sbc, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * syn + feats[None, :] * syc,
             acc.to(Y.dtype.element_ty), mask=(rows < M)[:, None] & f_ok[None, :])


# --------------------------------------------------------------------------------------------
# launch configurations (one table, read by the launchers and by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
# The pooling kernels take the fixed-shape tiles (pool_triton.pool_config: 1024 elements, 4
# warps) except where `python -m pargo_kernels.aot --arch 75 80 86 89 90 --filter _pool_varlen`
# found them spilling. sm_90, backward gather, 16-bit: 4 warps spill 8-56 B at 72 registers
# (the packed kernel holds each row's image offsets and grids on top of the fixed-shape
# kernel's registers); 8 warps on the same tile (4 elements a thread) use 51 registers, no
# spill. Only the warp count changes, never the tile, so results do not change either.
# arch -> {(kernel, dtype class): num_warps}
_POOL_WARPS = {90: {("bwd", "16bit"): 8}}


def pool_varlen_config(kernel: str, c: int, dtype: torch.dtype, arch: int = DEFAULT_ARCH,
                       interpret: bool = False) -> dict:
    """Launch configuration of the varlen pooling kernel ``kernel`` ("fwd" or "bwd") for ``c``
    channels on ``sm_<arch>`` (the interpreter's tiles are pool_config's, whatever the arch)."""
    cfg = pool_config(c, interpret)
    if not interpret:
        cls = "fp32" if dtype == torch.float32 else "16bit"
        cfg["num_warps"] = _POOL_WARPS.get(arch, {}).get((kernel, cls), cfg["num_warps"])
    return cfg


def _arch(t: torch.Tensor) -> int:
    """Compute capability of ``t``'s GPU as ``major * 10 + minor`` (DEFAULT_ARCH on the CPU)."""
    if not t.is_cuda:
        return DEFAULT_ARCH
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


# --------------------------------------------------------------------------------------------
# launchers (``plan``: a pooling VarlenPlan; nothing here reads a device tensor)
# --------------------------------------------------------------------------------------------
def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every output and workspace (tests swap in a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interp(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _bounds(plan, backward: bool = False) -> dict:
    kh, kw, ikh, ikw = (int(v) for v in plan.extra.tolist())
    return dict(n_seq=plan.n_seq, STEPS=plan.search_steps(),
                KH=ikh if backward else kh, KW=ikw if backward else kw)


def _pool_launch(src: torch.Tensor, plan, backward: bool) -> torch.Tensor:
    """Forward (``src = x``) or backward (``src = dy``): one gather over the other side."""
    src_col, dst_col = ((_plan.P_OUT_START, _plan.P_IN_START) if backward else
                        (_plan.P_IN_START, _plan.P_OUT_START))
    plan.check_length("dy" if backward else "x", src.shape[0], src_col,
                      "cu_seqlens_out" if backward else "cu_seqlens")
    M, C = plan.total(dst_col), src.shape[1]
    dst = _empty((M, C), src.dtype, src.device)
    if M == 0 or C == 0:
        return dst
    cfg = pool_varlen_config("bwd" if backward else "fwd", C, src.dtype, _arch(src),
                             _interp(src))
    kernel = _pool_varlen_bwd_kernel if backward else _pool_varlen_fwd_kernel
    kernel[launch_grid(M, C, cfg["BLOCK_M"], cfg["BLOCK_C"])](
        src, dst, plan.meta, *src.stride(), *dst.stride(), M, C, **_bounds(plan, backward),
        **cfg)
    return dst


def pool_varlen_forward(x: torch.Tensor, plan) -> torch.Tensor:
    """``x [total_in, C]`` (any strides) -> ``y [total_out, C]`` contiguous."""
    return _pool_launch(x, plan, backward=False)


def pool_varlen_backward(dy: torch.Tensor, plan) -> torch.Tensor:
    """``dy [total_out, C]`` -> ``dx [total_in, C]`` contiguous."""
    return _pool_launch(dy, plan, backward=True)


def pool_project_varlen_forward(x, weight, bias, plan) -> torch.Tensor:
    """``F.linear(pool(x), weight, bias)`` -> ``[total_out, NF]`` contiguous."""
    plan.check_length("x", x.shape[0], _plan.P_IN_START, "cu_seqlens")
    M, C, NF = plan.total(_plan.P_OUT_START), x.shape[1], weight.shape[0]
    y = _empty((M, NF), x.dtype, x.device)
    if M == 0 or NF == 0:
        return y
    if C == 0:
        y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
        return y
    cfg = gemm_config(x.dtype, _interp(x))
    _pool_proj_varlen_fwd_kernel[launch_grid(M, NF, cfg["BLOCK_M"], cfg["BLOCK_N"])](
        x, weight, bias if bias is not None else weight, y, plan.meta, *x.stride(),
        *weight.stride(), bias.stride(0) if bias is not None else 0, *y.stride(), M, C, NF,
        **_bounds(plan), HAS_BIAS=bias is not None,
        PRECISION=_precision(x.dtype, _interp(x)), **cfg)
    return y


def pool_project_varlen_backward(dy, x, weight, has_bias: bool, plan):
    """Returns ``(dx, dweight, dbias)`` (``dbias`` empty when ``has_bias`` is False).
    Materialises ``P = pool(x)`` and ``dP = dy @ W`` (``[total_out, C]`` each); the GEMMs are
    the fixed-shape kernels on the packed rows as one image of ``total_out`` rows."""
    M, NF = dy.shape
    C = x.shape[1]
    dw = _empty((NF, C), weight.dtype, weight.device)
    db = _empty((NF,) if has_bias else (0,), weight.dtype, weight.device)
    if M == 0 or NF == 0 or C == 0:
        dx = _empty(x.shape, x.dtype, x.device)
        for t in (dx, dw, db):
            t.zero_()
        if has_bias and M > 0:
            db.copy_(dy.float().sum(0).to(db.dtype))
        return dx, dw, db
    cfg = gemm_config(x.dtype, _interp(x))
    prec = _precision(x.dtype, _interp(x))
    p = pool_varlen_forward(x, plan)
    dy_strides = (0, *dy.stride())  # [1, M, NF]: image stride unused (Nout = M)
    _pool_proj_dw_kernel[launch_grid(NF, C, cfg["BLOCK_M"], cfg["BLOCK_N"])](
        dy, p, dw, db if has_bias else dw, *dy_strides, *p.stride(), *dw.stride(), M, C, NF, M,
        HAS_BIAS=has_bias, PRECISION=prec, **cfg)
    dp = _empty((M, C), x.dtype, x.device)
    row_tiles, col_tiles = launch_grid(M, C, cfg["BLOCK_M"], cfg["BLOCK_N"])
    _pool_proj_dp_kernel[(row_tiles * col_tiles,)](  # 1-D, row-major (see the kernel)
        dy, weight, dp, *dy_strides, *weight.stride(), *dp.stride(), M, C, NF, M,
        PRECISION=prec, **cfg)
    return pool_varlen_backward(dp, plan), dw, db


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (read by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
def aot_specs(arch: int = DEFAULT_ARCH):
    """Yield ``(kernel, pointer_types, constexprs, options, label)`` for every launch the
    launchers can make on ``sm_<arch>``: each dtype x pooling channel tile x direction with
    :func:`pool_varlen_config`, and (``arch >= pool_triton.FUSED_MIN_ARCH``, as the fixed-shape
    dispatcher) the fused kernel per dtype x bias; the fixed-shape GEMM kernels of the fused
    backward are listed by pool_triton."""
    for dtype, ty in _TL_DTYPE.items():
        ptrs = dict(X=ty, Y=ty, DY=ty, DX=ty, W=ty, BIAS=ty, META="i32")
        for block_c in POOL_BLOCK_CS:  # pool_config's channel tiles: every C maps to one
            for which, kernel in (("fwd", _pool_varlen_fwd_kernel),
                                  ("bwd", _pool_varlen_bwd_kernel)):
                cfg = pool_varlen_config(which, block_c, dtype, arch)
                yield (kernel, ptrs, *split_options(cfg), _label("pool-varlen", dtype, cfg))
        if arch < FUSED_MIN_ARCH:
            continue
        cfg, options = split_options(gemm_config(dtype))
        for has_bias in (False, True):
            yield (_pool_proj_varlen_fwd_kernel, ptrs,
                   dict(cfg, HAS_BIAS=has_bias, PRECISION=_precision(dtype)), options,
                   _label("pool-proj-varlen", dtype, gemm_config(dtype), has_bias))
