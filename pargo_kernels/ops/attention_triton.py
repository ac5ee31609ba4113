"""Triton kernels for block-sparse masked attention: partial-global (1-D, 2-D) and banded.

One family of kernels serves every mask of :mod:`pargo_kernels.masks`. The mask reaches a kernel
as ``KIND`` (a constexpr: 1-D / 2-D partial-global, band, ParGo self) and five int scalars
``P0..P4`` that are never specialised on, so a new window costs no recompilation. From these
scalars each kernel derives, per query row, the half-open key interval ``[lo, hi)`` (plus a
column interval ``[x0, x1)`` for 2-D windows), and per tile the range of tiles it must visit:

* forward / dQ: a query tile visits only the key range its rows' windows cover; partial tiles and
  global tiles are separate programs, so a partial tile never streams all keys;
* dK/dV: a key tile visits only the query rows whose windows can contain it (the inverse of the
  window map), then, for partial-global masks, every global query.

Nothing of size ``[Nq, Nv]`` is ever materialised. Softmax runs in base 2 with fp32 statistics;
the saved log-sum-exp ``LSE`` is in base 2 as well.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import KIND_BAND, KIND_PARGO_SELF, KIND_PG1D, KIND_PG2D

LOG2E = 1.4426950408889634
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)
MAX_HEAD_DIM = 256

_NO_SPEC = ["H", "Nq", "Nv", "P0", "P1", "P2", "P3", "P4"]


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. ``PRECISION="interpret"`` upcasts both operands to fp32
    first: the Triton 3.6 interpreter multiplies bfloat16 operands wrongly, and the operands are
    already rounded to the input dtype, so the upcast product is the exact one a GPU computes."""
    if PRECISION == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _row_windows(rows, valid, is_global, Nv, P0, P1, P2, P3, P4, KIND: tl.constexpr):
    """Per-row key window: flat ``[lo, hi)`` and, for 2-D windows, columns ``[x0, x1)``.

    Rows that are not ``valid`` get the empty window ``[0, 0)``.
    """
    zero = rows * 0
    if KIND == 2:  # band: P0 = left, P1 = right (both already clipped to N - 1)
        lo = tl.maximum(rows - P0, 0)
        hi = tl.minimum(rows + P1 + 1, Nv)
        x0 = zero
        x1 = zero
    elif KIND == 3:  # ParGo self: P0 = n_partial, (P1, P2) = (left, right) clipped to Np - 1
        lo = tl.where(is_global, zero + P0, tl.maximum(rows - P1, 0))
        hi = tl.where(is_global, zero + Nv, tl.minimum(rows + P2 + 1, P0))
        x0 = zero
        x1 = zero
    elif KIND == 0:  # 1-D partial-global: P0 = n_partial
        n_p = tl.maximum(P0, 1)
        lo = tl.where(is_global, zero, (rows * Nv) // n_p)
        hi = tl.where(is_global, zero + Nv, ((rows + 1) * Nv) // n_p)
        x0 = zero
        x1 = zero
    else:  # 2-D partial-global: P0 = n_partial, (P1, P2) = (Hv, Wv), (P3, P4) = (hp, wp)
        r = rows // P4
        c = rows % P4
        y0 = (r * P1) // P3
        y1 = ((r + 1) * P1 + P3 - 1) // P3
        lo = tl.where(is_global, zero, y0 * P2)
        hi = tl.where(is_global, zero + Nv, y1 * P2)
        x0 = tl.where(is_global, zero, (c * P2) // P4)
        x1 = tl.where(is_global, zero + P2, ((c + 1) * P2 + P4 - 1) // P4)
    lo = tl.where(valid, lo, 0)
    hi = tl.where(valid, hi, 0)
    return lo, hi, x0, x1


@triton.jit
def _allowed(cols, lo, hi, x0, x1, P2, KIND: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: which (row, key) pairs the mask allows."""
    ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    if KIND == 1:
        x = cols % P2
        ok = ok & (x[None, :] >= x0[:, None]) & (x[None, :] < x1[:, None])
    return ok


@triton.jit
def _query_tile(pid_m, Nq, P0, BLOCK_M: tl.constexpr, KIND: tl.constexpr):
    """Query tile ``pid_m``: (first row, end of its row segment, is it a global tile).

    Partial-global and ParGo-self masks put partial tiles first (rows ``[0, Np)``), then global
    tiles (rows ``[Np, Nq)``), so no tile mixes the two kinds. Band masks have one segment.
    """
    if KIND == 2:
        n_seg = Nq
    else:
        n_seg = P0
    n_ptiles = tl.cdiv(n_seg, BLOCK_M)
    is_global = pid_m >= n_ptiles
    g = is_global.to(tl.int32)
    m0 = pid_m * BLOCK_M + g * (n_seg - n_ptiles * BLOCK_M)
    row_end = n_seg + g * (Nq - n_seg)
    return m0, row_end, is_global


@triton.jit
def _query_program(H, Nq, Nv, P0, P1, P2, P3, P4, BLOCK_M: tl.constexpr, KIND: tl.constexpr):
    """Prologue of a query-tile program (forward, dQ): its (batch, head), rows, their windows
    and the key range ``[n_lo, n_hi)`` the tile must visit."""
    bh = tl.program_id(0).to(tl.int64)
    m0, row_end, is_global = _query_tile(tl.program_id(1), Nq, P0, BLOCK_M, KIND)
    rows = m0 + tl.arange(0, BLOCK_M)
    valid = rows < row_end
    lo, hi, x0, x1 = _row_windows(rows, valid, is_global, Nv, P0, P1, P2, P3, P4, KIND)
    n_lo = tl.min(tl.where(valid, lo, Nv), 0)
    n_hi = tl.max(hi, 0)
    return bh, bh // H, bh % H, rows, valid, lo, hi, x0, x1, n_lo, n_hi


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, b, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi = _query_program(
        H, Nq, Nv, P0, P1, P2, P3, P4, BLOCK_M, KIND)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_ok = cols < n_hi
        kt = tl.load(k_base + cols[None, :] * skn + d[:, None] * skd,
                     mask=kv_ok[None, :] & (d[:, None] < D), other=0.0)
        s = _dot(q, kt, PRECISION) * qk_scale
        s = tl.where(_allowed(cols, lo, hi, x0, x1, P2, KIND), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + dv[None, :] * svd,
                    mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * som + dv[None, :] * sod,
             o.to(O.dtype.element_ty), mask=valid[:, None] & (dv[None, :] < DV))
    tl.store(LSE + bh * Nq + rows, m_i + tl.log2(l_safe), mask=valid)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Nq"])
def _attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Nq,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[row] = sum_d O[row, d] * dO[row, d]: the softmax-backward row term for fp32 inputs,
    whose O is not rounded (16-bit inputs compute delta in the dQ kernel, see there)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < Nq) & (dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + dv[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + dv[None, :] * sdod, mask=ok,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Nq + rows, delta, mask=rows < Nq)


@triton.jit
def _dq_tile(q, do, lse, k_base, v_base, n0, n_hi, d, dv, skn, skd, svn, svd, lo, hi, x0, x1, P2,
             qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
             KIND: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the dQ kernel: ``(K tile, P = exp2(S - lse) masked, dP = dO V^T)``."""
    cols = n0 + tl.arange(0, BLOCK_N)
    kv_ok = cols < n_hi
    k = tl.load(k_base + cols[:, None] * skn + d[None, :] * skd,
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    vt = tl.load(v_base + cols[None, :] * svn + dv[:, None] * svd,
                 mask=kv_ok[None, :] & (dv[:, None] < DV), other=0.0)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    p = tl.where(_allowed(cols, lo, hi, x0, x1, P2, KIND), tl.exp2(s - lse[:, None]), 0.0)
    return k, p, _dot(do, vt, PRECISION)


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    DELTA_PASS: tl.constexpr,
):
    bh, b, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi = _query_program(
        H, Nq, Nv, P0, P1, P2, P3, P4, BLOCK_M, KIND)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + dv[None, :] * sdod,
                 mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh * Nq + rows, mask=valid, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # Pass 1 (DELTA_PASS, 16-bit inputs): delta = rowsum(P * dP) from the fp32 P and dP this
    # kernel (and the dK/dV kernel) use, not rowsum(dO * O) from the *rounded* O: with a 16-bit O
    # the latter leaves rows of dS that do not sum to zero, an error of ~2^-8 |O| |dO| that
    # dominates dQ and dK when attention is sharp (5-100x PyTorch's eager bf16 error on the
    # projector tests). fp32 inputs keep O unrounded: their delta comes from the delta kernel.
    if DELTA_PASS:
        delta = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            k, p, dp = _dq_tile(q, do, lse, k_base, v_base, n0, n_hi, d, dv, skn, skd, svn, svd,
                                lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_N, KIND, PRECISION)
            delta += tl.sum(p * dp, 1)
        tl.store(DELTA + bh * Nq + rows, delta, mask=valid)
    else:
        delta = tl.load(DELTA + bh * Nq + rows, mask=valid, other=0.0)

    # Pass 2: dQ.
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k, p, dp = _dq_tile(q, do, lse, k_base, v_base, n0, n_hi, d, dv, skn, skd, svn, svd,
                            lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_N, KIND, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)

    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid[:, None] & (d[None, :] < D))


@triton.jit
def _dkdv_rows(
    dk, dv_acc, k, v, cols, q_lo, q_hi, is_global,
    q_base, do_base, lse_base, delta_base, sqm, sqd, sdom, sdod,
    Nv, P0, P1, P2, P3, P4, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate the dK, dV contributions of query rows [q_lo, q_hi) into one key tile."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    for m0 in range(q_lo, q_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = rows < q_hi
        lo, hi, x0, x1 = _row_windows(rows, valid, is_global, Nv, P0, P1, P2, P3, P4, KIND)
        q = tl.load(q_base + rows[:, None] * sqm + d[None, :] * sqd,
                    mask=valid[:, None] & (d[None, :] < D), other=0.0)
        do = tl.load(do_base + rows[:, None] * sdom + dv[None, :] * sdod,
                     mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        lse = tl.load(lse_base + rows, mask=valid, other=0.0)
        delta = tl.load(delta_base + rows, mask=valid, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.where(_allowed(cols, lo, hi, x0, x1, P2, KIND), tl.exp2(s - lse[:, None]), 0.0)
        dv_acc += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    return dk, dv_acc


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    kv_ok = cols < Nv
    n_last = tl.minimum(n0 + BLOCK_N, Nv) - 1
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + d[None, :] * skd,
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dv[None, :] * svd,
                mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)

    # Query rows of the first segment (partial queries, or all rows of a band) that can see a
    # key in [n0, n_last]: the inverse of _row_windows, conservative by at most a tile.
    if KIND == 2:
        q_lo = tl.maximum(n0 - P1, 0)
        q_hi = tl.minimum(n_last + P0 + 1, Nq)
    elif KIND == 3:  # partial keys j < Np are seen by partial rows [j - right, j + left]
        q_lo = tl.maximum(n0 - P2, 0)
        q_hi = tl.where(n0 < P0, tl.minimum(n_last + P1 + 1, P0), 0)
    elif KIND == 0:
        q_lo = tl.maximum(((n0 + 1) * P0 + Nv - 1) // Nv - 1, 0)
        q_hi = tl.minimum(((n_last + 1) * P0 + Nv - 1) // Nv, P0)
    else:
        r_lo = ((n0 // P2) * P3) // P1
        r_hi = tl.minimum(((n_last // P2 + 1) * P3 + P1 - 1) // P1, P3)
        q_lo = r_lo * P4
        q_hi = r_hi * P4

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + bh * Nq
    delta_base = DELTA + bh * Nq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, q_lo, q_hi, False, q_base, do_base, lse_base,
                            delta_base, sqm, sqd, sdom, sdod, Nv, P0, P1, P2, P3, P4, qk_scale,
                            D, DV, KIND, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)
    g_hi = Nq
    if KIND == 3:  # global queries see only the keys [Np, N)
        g_hi = tl.where(n_last >= P0, Nq, P0)
    if KIND != 2:  # every global query sees every key (KIND 3: every global key)
        dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, P0, g_hi, True, q_base, do_base, lse_base,
                                delta_base, sqm, sqd, sdom, sdod, Nv, P0, P1, P2, P3, P4,
                                qk_scale, D, DV, KIND, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)

    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None] & (d[None, :] < D))
    tl.store(DV_ + b * sdvb + h * sdvh + cols[:, None] * sdvn + dv[None, :] * sdvd,
             dv_acc.to(DV_.dtype.element_ty), mask=kv_ok[:, None] & (dv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# launch configurations (one table, used by the launchers and by `python -m pargo_kernels.aot`)
# --------------------------------------------------------------------------------------------
def block_dims(d: int, dv: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, input class and padded head dim. Chosen
# as the largest tiles that compile without a register spill on sm_80 and sm_90 (checked by
# `python -m pargo_kernels.aot`). fp32 inputs run exact-fp32 FMA dots, which need small tiles;
# dK/dV keeps BLOCK_N keys resident while BLOCK_M queries stream past.
_CONFIGS = {
    "fwd": {
        "16bit": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 4, 2),
                  256: (64, 32, 8, 1)},
        "fp32": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 8, 1), 128: (16, 32, 8, 1),
                 256: (16, 32, 8, 1)},
    },
    "dq": {
        "16bit": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2),
                  256: (32, 32, 8, 1)},
        "fp32": {16: (32, 32, 8, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (16, 32, 4, 1),
                 256: (16, 32, 8, 1)},
    },
    "dkdv": {
        "16bit": {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 64, 8, 1),
                  256: (16, 32, 8, 1)},
        "fp32": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 8, 1), 128: (16, 32, 8, 1),
                 256: (16, 16, 8, 1)},
    },
}


def tile_config(kernel: str, block_d: int, dtype: torch.dtype) -> dict:
    """Launch configuration of ``kernel`` ("fwd", "dq", "dkdv") for a padded head dim."""
    m, n, warps, stages = _CONFIGS[kernel]["fp32" if dtype == torch.float32 else "16bit"][block_d]
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def delta_block_m(block_dv: int) -> int:
    return max(16, min(128, 4096 // block_dv))


def _precision(dtype: torch.dtype, interpret: bool = False) -> str:
    # fp32 inputs are computed exactly in fp32 (no silent TF32); 16-bit inputs use tensor cores.
    if interpret and dtype == torch.bfloat16:
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"


def num_query_tiles(kind: int, nq: int, n_partial: int, block_m: int) -> int:
    if kind == KIND_BAND:
        return triton.cdiv(nq, block_m)
    return triton.cdiv(n_partial, block_m) + triton.cdiv(nq - n_partial, block_m)


def _empty(shape, dtype, device) -> torch.Tensor:
    """Allocation of every output and workspace (tests swap in a NaN-filled one so that an
    element a kernel fails to write cannot go unnoticed)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _mask_scalars(kind: int, params) -> dict:
    p = [int(x) for x in params]
    return dict(P0=p[0], P1=p[1], P2=p[2], P3=p[3], P4=p[4], KIND=kind)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def attention_forward(q, k, v, kind: int, params, scale: float):
    """Returns ``(out [B, H, Nq, Dv] contiguous, lse [B, H, Nq] float32, base-2)``."""
    B, H, Nq, D = q.shape
    Nv, DV = k.shape[2], v.shape[3]
    out = _empty((B, H, Nq, DV), q.dtype, q.device)
    lse = _empty((B, H, Nq), torch.float32, q.device)
    if B * H == 0:
        return out, lse
    block_d, block_dv = block_dims(D, DV)
    cfg = tile_config("fwd", max(block_d, block_dv), q.dtype)
    grid = (B * H, num_query_tiles(kind, Nq, params[0], cfg["BLOCK_M"]))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, Nq, Nv, qk_scale=scale * LOG2E, D=D, DV=DV, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=_precision(q.dtype, q.device.type == "cpu"), **_mask_scalars(kind, params), **cfg)
    return out, lse


def attention_backward(do, q, k, v, out, lse, kind: int, params, scale: float):
    """Returns ``(dq, dk, dv)``, contiguous, in the dtype of the inputs."""
    B, H, Nq, D = q.shape
    Nv, DV = k.shape[2], v.shape[3]
    dq = _empty((B, H, Nq, D), q.dtype, q.device)
    dk = _empty((B, H, Nv, D), k.dtype, q.device)
    dv = _empty((B, H, Nv, DV), v.dtype, q.device)
    if B * H == 0:
        return dq, dk, dv
    block_d, block_dv = block_dims(D, DV)
    # delta: written by the delta kernel (fp32) or the dQ kernel's first pass (16-bit), read by
    # the dK/dV kernel (same stream, so ordered)
    delta = _empty((B, H, Nq), torch.float32, q.device)
    delta_pass = q.dtype != torch.float32
    if not delta_pass:
        block_m = delta_block_m(block_dv)
        _attn_bwd_delta_kernel[(B * H, triton.cdiv(Nq, block_m))](
            out, do, delta, *_strides(out), *_strides(do), H, Nq, DV=DV, BLOCK_M=block_m,
            BLOCK_DV=block_dv)
    mask_args = _mask_scalars(kind, params)
    common = dict(qk_scale=scale * LOG2E, sm_scale=scale, D=D, DV=DV, BLOCK_D=block_d,
                  BLOCK_DV=block_dv, PRECISION=_precision(q.dtype, q.device.type == "cpu"), **mask_args)
    cfg = tile_config("dq", max(block_d, block_dv), q.dtype)
    _attn_bwd_dq_kernel[(B * H, num_query_tiles(kind, Nq, params[0], cfg["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dq), H, Nq, Nv, DELTA_PASS=delta_pass, **common, **cfg)
    cfg = tile_config("dkdv", max(block_d, block_dv), q.dtype)
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(Nv, cfg["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, Nq, Nv, **common, **cfg)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (read by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
def aot_specs():
    """Yield ``(kernel, pointer_types, constexprs, options, label)`` for every launch the
    launchers can make: each mask kind x dtype x head-dim bucket."""
    for dtype, ty in _TL_DTYPE.items():
        ptrs = dict(Q=ty, K=ty, V=ty, O=ty, DO=ty, DQ=ty, DK=ty, DV_=ty, LSE="fp32", DELTA="fp32")
        for block_d in (16, 32, 64, 128, 256):
            if dtype == torch.float32:
                yield (_attn_bwd_delta_kernel, ptrs,
                       dict(DV=block_d, BLOCK_M=delta_block_m(block_d), BLOCK_DV=block_d),
                       dict(num_warps=4, num_stages=1), f"{ty} d={block_d}")
            for kind, kname in ((KIND_PG1D, "pg1d"), (KIND_PG2D, "pg2d"), (KIND_BAND, "band"),
                                (KIND_PARGO_SELF, "pgself")):
                for kernel, which in ((_attn_fwd_kernel, "fwd"), (_attn_bwd_dq_kernel, "dq"),
                                      (_attn_bwd_dkdv_kernel, "dkdv")):
                    cfg = tile_config(which, block_d, dtype)
                    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                    constexprs = dict(D=block_d, DV=block_d, KIND=kind, BLOCK_D=block_d,
                                      BLOCK_DV=block_d, PRECISION=_precision(dtype), **cfg)
                    if which == "dq":
                        constexprs["DELTA_PASS"] = dtype != torch.float32
                    label = (f"{kname} {ty} d={block_d} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} "
                             f"w={options['num_warps']} s={options['num_stages']}")
                    yield kernel, ptrs, constexprs, options, label
