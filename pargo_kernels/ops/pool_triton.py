"""Triton kernels for adaptive average pooling of tokens, alone and fused with a projection.

Tokens ``x [B, Hin*Win, C]`` are a row-major ``Hin x Win`` grid per image, channels last. Output
cell ``(oy, ox)`` of the ``Hout x Wout`` grid averages input rows ``[floor(oy*Hin/Hout),
ceil((oy+1)*Hin/Hout))`` and columns ``[floor(ox*Win/Wout), ceil((ox+1)*Win/Wout))``, exactly
``F.adaptive_avg_pool2d``. Windows overlap when the sizes don't divide.

Every kernel works on the flattened row index ``m = b * Nout + o`` (``Nout = Hout*Wout``), so
one tile may span images and a tile never idles on a small grid. Kernels:

* ``_pool_fwd_kernel``: ``y = pool(x)``, a gather: each output tile loops over the at most
  ``KH x KW`` window offsets (``KH`` = the largest window height, computed on the host);
* ``_pool_bwd_kernel``: ``dx = unpool(dy)``, a gather as well (no atomics): each input token
  sums ``dy / count`` over the output cells whose windows contain it, at most ``KH x KW`` of
  them, found by inverting the window map (the inverse has the same form with the sizes
  swapped: input row ``iy`` is in the windows of output rows
  ``[floor(iy*Hout/Hin), ceil((iy+1)*Hout/Hin))``);
* ``_pool_proj_fwd_kernel``: ``y = pool(x) @ W^T + bias``: the GEMM's A tile is built by
  averaging the window while loading it (fp32 sum, rounded to the input dtype like the unfused
  ``F.linear(pool(x))``), so the pooled tensor never goes to memory;
* ``_pool_proj_dw_kernel``: ``dW = dY^T @ P`` (``P`` = pooled ``x``, materialised once by
  ``_pool_fwd_kernel`` in the backward) and ``db = sum_m dY``;
* ``_pool_proj_dp_kernel``: ``dP = dY @ W``, then ``dx = unpool(dP)`` by ``_pool_bwd_kernel``.

All sums are fp32; fp32 GEMMs are exact fp32 (no TF32), 16-bit GEMMs use tensor cores.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_triton import _dot, _precision

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)

_NO_SPEC = ["M", "C", "NF", "Nout", "Nin", "Hin", "Win", "Hout", "Wout", "KH", "KW"]


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _window(o, n_in, n_out):
    """Half-open input interval ``[lo, hi)`` of output index ``o`` (adaptive pooling)."""
    return (o * n_in) // n_out, ((o + 1) * n_in + n_out - 1) // n_out


@triton.jit
def _pooled_tile(X, rows, chans, M, C, Nout, Hin, Win, Hout, Wout, KH, KW, sxb, sxn, sxc,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``[len(rows), len(chans)]`` tile of ``pool(x)``: rows are flattened ``b*Nout + o``.
    Rows ``>= M`` and channels ``>= C`` come out as 0."""
    row_ok = rows < M
    c_ok = chans < C
    b = (rows // Nout).to(tl.int64)
    o = rows % Nout
    y0, y1 = _window(o // Wout, Hin, Hout)
    x0, x1 = _window(o % Wout, Win, Wout)
    inv = 1.0 / ((y1 - y0) * (x1 - x0)).to(tl.float32)
    base = X + b * sxb
    acc = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for dy in range(0, KH):
        y = y0 + dy
        for dx in range(0, KW):
            x = x0 + dx
            ok = row_ok & (y < y1) & (x < x1)
            tok = (y * Win + x).to(tl.int64)
            v = tl.load(base[:, None] + tok[:, None] * sxn + chans[None, :] * sxc,
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            acc += v.to(tl.float32)
    return acc * inv[:, None]


@triton.jit
def _row_major(n_cols, BLOCK_N: tl.constexpr):
    """(row tile, column tile) of this program on a 1-D grid launched row tile by row tile."""
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(n_cols, BLOCK_N)
    return pid // col_tiles, pid % col_tiles


# --------------------------------------------------------------------------------------------
# pooling alone
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_fwd_kernel(
    X, Y, sxb, sxn, sxc, syb, syn, syc,
    M, C, Nout, Hin, Win, Hout, Wout, KH, KW,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = _pooled_tile(X, rows, chans, M, C, Nout, Hin, Win, Hout, Wout, KH, KW, sxb, sxn, sxc,
                       BLOCK_M, BLOCK_C)
    b = (rows // Nout).to(tl.int64)
    o = rows % Nout
    tl.store(Y + b[:, None] * syb + o[:, None] * syn + chans[None, :] * syc,
             acc.to(Y.dtype.element_ty), mask=(rows < M)[:, None] & (chans < C)[None, :])


@triton.jit
def _unpooled_tile(base, t, row_ok, chans, c_ok, Hin, Win, Hout, Wout, KH, KW, sdyn, sdyc,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_C]`` tile of ``dx``: for input token ``t`` of each row (its image's
    ``dy`` at the row's pointer ``base``), the sum over the output cells whose window holds it
    of ``dy[o] / |o|``. Grids may be scalars or per-row vectors (shared with the varlen
    kernel)."""
    oy0, oy1 = _window(t // Win, Hout, Hin)  # the inverse window map: sizes swapped
    ox0, ox1 = _window(t % Win, Wout, Win)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for dy in range(0, KH):
        oy = oy0 + dy
        y0, y1 = _window(oy, Hin, Hout)
        for dx in range(0, KW):
            ox = ox0 + dx
            x0, x1 = _window(ox, Win, Wout)
            ok = row_ok & (oy < oy1) & (ox < ox1)
            inv = 1.0 / tl.maximum((y1 - y0) * (x1 - x0), 1).to(tl.float32)
            cell = (oy * Wout + ox).to(tl.int64)
            g = tl.load(base[:, None] + cell[:, None] * sdyn + chans[None, :] * sdyc,
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            acc += g.to(tl.float32) * inv[:, None]
    return acc


@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_bwd_kernel(
    DY, DX, sdyb, sdyn, sdyc, sdxb, sdxn, sdxc,
    M, C, Nin, Hin, Win, Hout, Wout, KH, KW,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx[b, t, c] = sum over output cells o whose window holds t of dy[b, o, c] / |o|``;
    here ``M = B * Nin`` and ``(KH, KW)`` bound how many output rows / columns hold a token."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    c_ok = chans < C
    b = (rows // Nin).to(tl.int64)
    t = rows % Nin
    acc = _unpooled_tile(DY + b * sdyb, t, row_ok, chans, c_ok, Hin, Win, Hout, Wout, KH, KW,
                         sdyn, sdyc, BLOCK_M, BLOCK_C)
    tl.store(DX + b[:, None] * sdxb + t[:, None] * sdxn + chans[None, :] * sdxc,
             acc.to(DX.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# pooling fused with the projection
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_proj_fwd_kernel(
    X, W, BIAS, Y, sxb, sxn, sxc, swn, swc, sbc, syb, syn, syc,
    M, C, NF, Nout, Hin, Win, Hout, Wout, KH, KW,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``y[m, f] = sum_c pool(x)[m, c] * W[f, c] (+ bias[f])``, pooling in the A-tile load;
    ``sbc``: the stride of ``bias`` (any, 0 for an expanded one). Launch order: all feature
    tiles of a row tile one after the other (its ``x`` windows are read from HBM once)."""
    row_tile, feat_tile = _row_major(NF, BLOCK_N)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = feat_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = feats < NF
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        chans = k0 + tl.arange(0, BLOCK_K)
        a = _pooled_tile(X, rows, chans, M, C, Nout, Hin, Win, Hout, Wout, KH, KW,
                         sxb, sxn, sxc, BLOCK_M, BLOCK_K).to(W.dtype.element_ty)
        w = tl.load(W + feats[None, :] * swn + chans[:, None] * swc,
                    mask=f_ok[None, :] & (chans < C)[:, None], other=0.0)
        acc += _dot(a, w, PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + feats * sbc, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    b = (rows // Nout).to(tl.int64)
    o = rows % Nout
    tl.store(Y + b[:, None] * syb + o[:, None] * syn + feats[None, :] * syc,
             acc.to(Y.dtype.element_ty), mask=(rows < M)[:, None] & f_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_proj_dw_kernel(
    DY, P, DW, DB, sdyb, sdyn, sdyc, spm, spc, sdwn, sdwc,
    M, C, NF, Nout,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dW[f, c] = sum_m dY[m, f] * P[m, c]``; programs of the first channel tile also write
    ``db[f] = sum_m dY[m, f]``. Tiles: ``BLOCK_M`` features x ``BLOCK_N`` channels."""
    feats = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = feats < NF
    c_ok = chans < C
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, M, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        r_ok = rows < M
        b = (rows // Nout).to(tl.int64)
        o = rows % Nout
        g = tl.load(DY + b[:, None] * sdyb + o[:, None] * sdyn + feats[None, :] * sdyc,
                    mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        p = tl.load(P + rows.to(tl.int64)[:, None] * spm + chans[None, :] * spc,
                    mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc += _dot(tl.trans(g), p, PRECISION)
        if HAS_BIAS:
            db += tl.sum(g.to(tl.float32), 0)
    tl.store(DW + feats[:, None] * sdwn + chans[None, :] * sdwc, acc.to(DW.dtype.element_ty),
             mask=f_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        tl.store(DB + feats, db.to(DB.dtype.element_ty), mask=f_ok & (tl.program_id(1) == 0))


@triton.jit(do_not_specialize=_NO_SPEC)
def _pool_proj_dp_kernel(
    DY, W, DP, sdyb, sdyn, sdyc, swn, swc, spm, spc,
    M, C, NF, Nout,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dP[m, c] = sum_f dY[m, f] * W[f, c]`` (the gradient of the pooled tensor). Launch
    order: all channel tiles of a row tile one after the other (its ``dY`` rows are read from
    HBM once)."""
    row_tile, chan_tile = _row_major(C, BLOCK_N)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = chan_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = rows < M
    c_ok = chans < C
    b = (rows // Nout).to(tl.int64)
    o = rows % Nout
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, NF, BLOCK_K):
        feats = k0 + tl.arange(0, BLOCK_K)
        f_ok = feats < NF
        g = tl.load(DY + b[:, None] * sdyb + o[:, None] * sdyn + feats[None, :] * sdyc,
                    mask=r_ok[:, None] & f_ok[None, :], other=0.0)
        w = tl.load(W + feats[:, None] * swn + chans[None, :] * swc,
                    mask=f_ok[:, None] & c_ok[None, :], other=0.0)
        acc += _dot(g, w, PRECISION)
    tl.store(DP + rows.to(tl.int64)[:, None] * spm + chans[None, :] * spc,
             acc.to(DP.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------------
# launch configurations (one table, used by the launchers and by `python -m pargo_kernels.aot`)
# --------------------------------------------------------------------------------------------
POOL_BLOCK_CS = (16, 32, 64)
# The fused GEMM kernels need tensor-core tl.dot: Triton 3.6 compiles them for sm_75 to
# CUDA-core code that spills (255 registers + ~1 KB), so the dispatcher refuses them there
# (pooling.py) and aot_specs(75) leaves them out. The pooling kernels run everywhere.
FUSED_MIN_ARCH = 80


def pool_config(c: int, interpret: bool = False) -> dict:
    """Tiles of the pooling kernels: ``BLOCK_C`` channels x ``BLOCK_M`` tokens, 4 warps, 1024
    elements a tile on the GPU (8 a thread: every element carries its own window bounds, so
    larger tiles spill on sm_80). Under the interpreter, whose cost is per program and per op
    rather than per element, tiles are 16x larger; every index is masked by its bounds, so the
    tile shape changes speed, never results."""
    if interpret:
        block_c = min(128, max(16, triton.next_power_of_2(c)))
        return dict(BLOCK_M=16384 // block_c, BLOCK_C=block_c, num_warps=4, num_stages=1)
    block_c = min(64, max(16, triton.next_power_of_2(c)))
    return dict(BLOCK_M=1024 // block_c, BLOCK_C=block_c, num_warps=4, num_stages=1)


def gemm_config(dtype: torch.dtype, interpret: bool = False) -> dict:
    """Tiles of the three GEMM kernels (fp32 runs on CUDA cores in true fp32: smaller tiles;
    the interpreter gets the 16-bit tiles for every dtype, see :func:`pool_config`)."""
    if dtype == torch.float32 and not interpret:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)


def launch_grid(rows: int, cols: int, block_rows: int, block_cols: int) -> tuple[int, int]:
    """Tiles of every launch: ``(row tiles, column tiles)``; as a 2-D grid, row tiles go on
    axis 0 (up to 2**31 - 1) and column tiles on axis 1."""
    return triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols)


@functools.lru_cache(maxsize=256)
def max_span(n_in: int, n_out: int) -> int:
    """Largest window length ``ceil((o+1)*n_in/n_out) - floor(o*n_in/n_out)`` over ``o``."""
    return max(-(-(o + 1) * n_in // n_out) - (o * n_in) // n_out for o in range(n_out))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every output and workspace (tests swap in a NaN-filled one so that an
    element a kernel fails to write cannot go unnoticed)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interp(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# --------------------------------------------------------------------------------------------
# launch plans: what every launcher launches, shared with benchmarks/work_model_pool.py
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One kernel launch exactly as a launcher makes it (the work model reads the same object).

    ``tiles``: ``(row tiles, column tiles)``. ``grid``: the Triton grid: 2-D, program ``(pid0,
    pid1)`` owns row tile ``pid0`` and column tile ``pid1``, launched ``pid0`` fastest; or 1-D,
    program ``pid`` owns ``divmod(pid, column tiles)`` (row-major launch order).
    ``sizes``: the kernel's integer size arguments, in its signature's order. ``meta``: its
    constexpr tiles and ``num_warps`` / ``num_stages``. ``iters``: the per-program trip count
    of the innermost loop body (every program runs the same count). ``label``: the AOT label of
    the configuration (``aot_specs``)."""
    kernel: object
    grid: tuple
    tiles: tuple
    sizes: dict
    meta: dict
    iters: int
    label: str

    def program(self, row_tile, col_tile):
        """Launch-order index of the program owning ``(row_tile, col_tile)`` (numpy-friendly)."""
        if len(self.grid) == 1:
            return row_tile * self.tiles[1] + col_tile
        return row_tile + self.grid[0] * col_tile

    def __call__(self, *pointers_and_strides):
        self.kernel[self.grid](*pointers_and_strides, *self.sizes.values(), **self.meta)


def _label(kind: str, dtype: torch.dtype, cfg: dict, has_bias=None) -> str:
    ty = _TL_DTYPE[dtype]
    tiles = " ".join(f"{k.split('_')[1]}={v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
    bias = "" if has_bias is None else (" bias" if has_bias else " nobias")
    return f"{kind} {ty}{bias} {tiles} w={cfg['num_warps']} s={cfg['num_stages']}"


def _pool_launch(kernel, rows, B, C, in_grid, out_grid, dtype, interpret) -> Launch:
    (hin, win), (hout, wout) = in_grid, out_grid
    cfg = pool_config(C, interpret)
    grid = launch_grid(rows, C, cfg["BLOCK_M"], cfg["BLOCK_C"])
    if kernel is _pool_fwd_kernel:  # gathers input windows of output cells
        sizes = dict(M=rows, C=C, Nout=hout * wout, Hin=hin, Win=win, Hout=hout, Wout=wout,
                     KH=max_span(hin, hout), KW=max_span(win, wout))
    else:  # gathers the output cells holding each input token
        sizes = dict(M=rows, C=C, Nin=hin * win, Hin=hin, Win=win, Hout=hout, Wout=wout,
                     KH=max_span(hout, hin), KW=max_span(wout, win))
    return Launch(kernel, grid, grid, sizes, cfg, sizes["KH"] * sizes["KW"],
                  _label("pool", dtype, cfg))


def pool_fwd_plan(B, C, in_grid, out_grid, dtype, interpret=False) -> list[Launch]:
    """Launches of ``pool_forward`` on ``[B, Hin*Win, C]`` (none when the output is empty)."""
    rows = B * out_grid[0] * out_grid[1]
    if rows == 0 or C == 0:
        return []
    return [_pool_launch(_pool_fwd_kernel, rows, B, C, in_grid, out_grid, dtype, interpret)]


def pool_bwd_plan(B, C, in_grid, out_grid, dtype, interpret=False) -> list[Launch]:
    """Launches of ``pool_backward`` (``dy [B, Hout*Wout, C]`` -> ``dx``)."""
    rows = B * in_grid[0] * in_grid[1]
    if rows == 0 or C == 0:
        return []
    return [_pool_launch(_pool_bwd_kernel, rows, B, C, in_grid, out_grid, dtype, interpret)]


def _gemm_launch(kernel, rows, cols, red, sizes, dtype, interpret, has_bias=None) -> Launch:
    """A GEMM kernel over a ``rows x cols`` output with a reduction of length ``red``; the
    kernels that reuse their row tile's A operand across column tiles run row-major."""
    cfg = gemm_config(dtype, interpret)
    tiles = launch_grid(rows, cols, cfg["BLOCK_M"], cfg["BLOCK_N"])
    row_major = kernel in (_pool_proj_fwd_kernel, _pool_proj_dp_kernel)
    if row_major and tiles[0] * tiles[1] > 2**31 - 1:
        raise ValueError(f"{kernel.fn.__name__}: {tiles[0]} x {tiles[1]} tiles exceed the "
                         f"2**31 - 1 programs of a 1-D grid ({rows} x {cols} output); use "
                         "fused=False")
    grid = (tiles[0] * tiles[1],) if row_major else tiles
    meta = dict(cfg, PRECISION=_precision(dtype, interpret))
    kind = "pool-proj"
    if has_bias is not None:
        meta["HAS_BIAS"] = has_bias
    iters = triton.cdiv(red, cfg["BLOCK_K"])
    if kernel is _pool_proj_fwd_kernel:
        iters *= sizes["KH"] * sizes["KW"]
    return Launch(kernel, grid, tiles, sizes, meta, iters, _label(kind, dtype, cfg, has_bias))


def pool_project_fwd_plan(B, C, NF, in_grid, out_grid, dtype, has_bias,
                          interpret=False) -> list[Launch]:
    """Launches of ``pool_project_forward`` (none when the output is empty or ``C == 0``)."""
    (hin, win), (hout, wout) = in_grid, out_grid
    M = B * hout * wout
    if M == 0 or NF == 0 or C == 0:
        return []
    sizes = dict(M=M, C=C, NF=NF, Nout=hout * wout, Hin=hin, Win=win, Hout=hout, Wout=wout,
                 KH=max_span(hin, hout), KW=max_span(win, wout))
    return [_gemm_launch(_pool_proj_fwd_kernel, M, NF, C, sizes, dtype, interpret, has_bias)]


def pool_project_bwd_plan(B, C, NF, in_grid, out_grid, dtype, has_bias,
                          interpret=False) -> list[Launch]:
    """Launches of ``pool_project_backward``, in order: ``P = pool(x)``, ``dW (, db)``,
    ``dP = dY @ W``, ``dx = unpool(dP)`` (none when any of ``M``, ``NF``, ``C`` is 0)."""
    M = B * out_grid[0] * out_grid[1]
    if M == 0 or NF == 0 or C == 0:
        return []
    nout = out_grid[0] * out_grid[1]
    return [*pool_fwd_plan(B, C, in_grid, out_grid, dtype, interpret),
            _gemm_launch(_pool_proj_dw_kernel, NF, C, M, dict(M=M, C=C, NF=NF, Nout=nout),
                         dtype, interpret, has_bias),
            _gemm_launch(_pool_proj_dp_kernel, M, C, NF, dict(M=M, C=C, NF=NF, Nout=nout),
                         dtype, interpret),
            *pool_bwd_plan(B, C, in_grid, out_grid, dtype, interpret)]


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def pool_forward(x: torch.Tensor, in_grid, out_grid) -> torch.Tensor:
    """``[B, Hin*Win, C]`` (any strides) -> ``[B, Hout*Wout, C]`` contiguous, dtype of ``x``."""
    B, _, C = x.shape
    y = _empty((B, out_grid[0] * out_grid[1], C), x.dtype, x.device)
    for launch in pool_fwd_plan(B, C, in_grid, out_grid, x.dtype, _interp(x)):
        launch(x, y, *x.stride(), *y.stride())
    return y


def pool_backward(dy: torch.Tensor, in_grid, out_grid) -> torch.Tensor:
    """``dy [B, Hout*Wout, C]`` -> ``dx [B, Hin*Win, C]`` contiguous, dtype of ``dy``."""
    B, _, C = dy.shape
    dx = _empty((B, in_grid[0] * in_grid[1], C), dy.dtype, dy.device)
    for launch in pool_bwd_plan(B, C, in_grid, out_grid, dy.dtype, _interp(dy)):
        launch(dy, dx, *dy.stride(), *dx.stride())
    return dx


def pool_project_forward(x, weight, bias, in_grid, out_grid) -> torch.Tensor:
    """``F.linear(pool(x), weight, bias)`` -> ``[B, Hout*Wout, NF]`` contiguous."""
    B, _, C = x.shape
    NF = weight.shape[0]
    y = _empty((B, out_grid[0] * out_grid[1], NF), x.dtype, x.device)
    plan = pool_project_fwd_plan(B, C, NF, in_grid, out_grid, x.dtype, bias is not None,
                                 _interp(x))
    if not plan:
        if y.numel():  # C == 0: the product is empty, the bias (or zero) remains
            y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
        return y
    (launch,) = plan
    launch(x, weight, bias if bias is not None else weight, y, *x.stride(), *weight.stride(),
           bias.stride(0) if bias is not None else 0, *y.stride())
    return y


def pool_project_backward(dy, x, weight, has_bias: bool, in_grid, out_grid):
    """Returns ``(dx, dweight, dbias)`` (``dbias`` is an empty tensor when ``has_bias`` is
    False). Materialises ``P = pool(x)`` and ``dP = dy @ W`` ([B*Hout*Wout, C] each)."""
    B, nout, NF = dy.shape
    C = x.shape[2]
    M = B * nout
    dw = _empty((NF, C), weight.dtype, weight.device)
    db = _empty((NF,) if has_bias else (0,), weight.dtype, weight.device)
    plan = pool_project_bwd_plan(B, C, NF, in_grid, out_grid, x.dtype, has_bias, _interp(x))
    if not plan:
        dx = _empty(x.shape, x.dtype, x.device)
        for t in (dx, dw, db):
            t.zero_()
        if has_bias and M > 0:
            db.copy_(dy.float().sum((0, 1)).to(db.dtype))
        return dx, dw, db
    pool_p, grad_w, grad_p, unpool = plan
    p = _empty((B, nout, C), x.dtype, x.device)
    pool_p(x, p, *x.stride(), *p.stride())
    p = p.view(M, C)
    grad_w(dy, p, dw, db if has_bias else dw, *dy.stride(), *p.stride(), *dw.stride())
    dp = _empty((M, C), x.dtype, x.device)
    grad_p(dy, weight, dp, *dy.stride(), *weight.stride(), *dp.stride())
    dx = _empty(x.shape, x.dtype, x.device)
    dpv = dp.view(B, nout, C)
    unpool(dpv, dx, *dpv.stride(), *dx.stride())
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (read by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
def split_options(cfg: dict) -> tuple[dict, dict]:
    """A launch configuration as ``(constexprs, compile options)``, the halves of an AOT spec."""
    cfg = dict(cfg)
    return cfg, dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))


def aot_specs(arch: int | None = None):
    """Yield ``(kernel, pointer_types, constexprs, options, label)`` for every launch the
    launchers can make on ``arch`` (e.g. 75, 86, 90; None: every arch): each dtype x pooling
    channel tile, and (``arch >= FUSED_MIN_ARCH``) each dtype x GEMM kernel x bias. Labels are
    the ``Launch.label`` of the plans, so the work model can look them up. Every one of them
    uses at most 8 KB of shared memory (sm_75's limit is 64 KB)."""
    for dtype, ty in _TL_DTYPE.items():
        ptrs = dict(X=ty, Y=ty, DY=ty, DX=ty, W=ty, BIAS=ty, P=ty, DW=ty, DB=ty, DP=ty)
        for block_c in POOL_BLOCK_CS:
            label = _label("pool", dtype, pool_config(block_c))
            for kernel in (_pool_fwd_kernel, _pool_bwd_kernel):
                yield (kernel, ptrs, *split_options(pool_config(block_c)), label)
        if arch is not None and arch < FUSED_MIN_ARCH:
            continue
        cfg, options = split_options(gemm_config(dtype))
        cfg["PRECISION"] = _precision(dtype)
        for has_bias in (False, True):
            label = _label("pool-proj", dtype, gemm_config(dtype), has_bias)
            for kernel in (_pool_proj_fwd_kernel, _pool_proj_dw_kernel):
                yield kernel, ptrs, dict(cfg, HAS_BIAS=has_bias), options, label
        yield (_pool_proj_dp_kernel, ptrs, cfg, options,
               _label("pool-proj", dtype, gemm_config(dtype)))
