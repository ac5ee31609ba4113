"""Triton kernels for block-sparse masked attention: partial-global (1-D, 2-D) and banded.

One family of kernels serves every mask of :mod:`pargo_kernels.masks`. The mask reaches a kernel
as ``KIND`` (a constexpr: 1-D / 2-D partial-global, band, ParGo self) and five int scalars
``P0..P4`` that are never specialised on, so a new window costs no recompilation. From these
scalars each kernel derives, per query row, the half-open key interval ``[lo, hi)`` (plus a
column interval ``[x0, x1)`` for 2-D windows). The range of tiles each program visits comes from
the launch plan (``attention_plan.py``, shared with the work model) as a small int32 table:

* forward / dQ: a query tile visits only the key range its rows' windows cover; partial tiles and
  global tiles are separate programs, so a partial tile never streams all keys;
* a global tile whose key loop is long (video-length Nv) is split over its keys across
  programs (flash-decoding): each writes an fp32 partial output and log-sum-exp (dQ: an fp32
  partial dQ, after a delta-only launch for 16-bit inputs) to a workspace, reduced on the host
  in a fixed order (deterministic, no atomics);
* dK/dV: a key tile visits only the query rows whose windows can contain it (the inverse of the
  window map, exact, computed on the host), then, for partial-global masks, every global query.

Every launch is a 1-D grid with the tiles of one (batch, head) adjacent in launch order, and
row / key offsets are 64-bit (a packed ``[B, N, 3, H, D]`` view of a long sequence passes 2^31
elements). Nothing of size ``[Nq, Nv]`` is ever materialised. Softmax runs in base 2 with fp32 statistics;
the saved log-sum-exp ``LSE`` is in base 2 as well.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import KIND_BAND, KIND_PARGO_SELF, KIND_PG1D, KIND_PG2D
from . import attention_plan as plan
from .attention_plan import Problem, block_dims, delta_block_m, tile_config

LOG2E = 1.4426950408889634
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES = tuple(_TL_DTYPE)
MAX_HEAD_DIM = 256

_ENTRY = tl.constexpr(plan.ENTRY)
_NO_SPEC = ["T", "NSPLIT", "H", "Nq", "Nv", "P0", "P1", "P2", "P3", "P4"]


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
def _program(T):
    """``(bh, table entry)`` of this program: 1-D grid, the ``T`` entries of a head adjacent in
    launch order (``attention_plan.program_coords``), so a head's K/V stay in L2."""
    pid = tl.program_id(0)
    return (pid // T).to(tl.int64), pid % T


@triton.jit
def _split_rows(bh, slot, rows, NSPLIT, Nq, P0):
    """Row index into a split workspace ``[B*H, NSPLIT, Nq - P0, ...]`` (global rows only)."""
    return (bh * NSPLIT + slot) * (Nq - P0) + (rows - P0)


@triton.jit
def _query_program(SCHED, T, H, Nv, P0, P1, P2, P3, P4, BLOCK_M: tl.constexpr, KIND: tl.constexpr):
    """Prologue of a query-tile program (forward, dQ): its (batch, head), rows, their windows,
    the key range ``[n_lo, n_hi)`` to visit and its split slot (-1: none), from the plan."""
    bh, t = _program(T)
    e = SCHED + t * _ENTRY
    m0 = tl.load(e)
    row_end = tl.load(e + 1)
    n_lo = tl.load(e + 2)
    n_hi = tl.load(e + 3)
    is_global = tl.load(e + 4) != 0
    slot = tl.load(e + 5)
    rows = m0 + tl.arange(0, BLOCK_M)
    valid = rows < row_end
    lo, hi, x0, x1 = _row_windows(rows, valid, is_global, Nv, P0, P1, P2, P3, P4, KIND)
    return bh, bh // H, bh % H, rows, valid, lo, hi, x0, x1, n_lo, n_hi, slot


@triton.jit
def _fwd_pass(q, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd, lo, hi, x0, x1, P2,
              qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, KIND: tl.constexpr,
              PRECISION: tl.constexpr):
    """Online softmax of a query tile over keys ``[n_lo, n_hi)`` (64-bit key offsets from
    ``k_base`` / ``v_base``): ``(o, row max m, l_safe)`` with ``o = acc / l_safe`` and the
    log-sum-exp ``m + log2(l_safe)``. A row with no allowed (or only -inf) score gets ``o = 0``
    (shared by the fixed-shape and the varlen forward kernels)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_ok = cols < n_hi
        kt = tl.load(k_base + cols.to(tl.int64)[None, :] * skn + d[:, None] * skd,
                     mask=kv_ok[None, :] & (d[:, None] < D), other=0.0)
        s = _dot(q, kt, PRECISION) * qk_scale
        s = tl.where(_allowed(cols, lo, hi, x0, x1, P2, KIND), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * svn + dv[None, :] * svd,
                    mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_safe[:, None], m_i, l_safe


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd_kernel(
    SCHED, T, Q, K, V, O, LSE, OWS, LWS, NSPLIT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, b, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi, slot = _query_program(
        SCHED, T, H, Nv, P0, P1, P2, P3, P4, BLOCK_M, KIND)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    o, m_i, l_safe = _fwd_pass(q, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd, lo, hi,
                               x0, x1, P2, qk_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_DV, KIND,
                               PRECISION)
    if slot >= 0:  # one key split of a global tile: fp32 partials, merged on the host
        ws = _split_rows(bh, slot, rows, NSPLIT, Nq, P0)
        tl.store(OWS + ws[:, None] * DV + dv[None, :], o, mask=valid[:, None] & (dv[None, :] < DV))
        tl.store(LWS + ws, m_i + tl.log2(l_safe), mask=valid)
    else:
        tl.store(O + b * sob + h * soh + rows.to(tl.int64)[:, None] * som + dv[None, :] * sod,
                 o.to(O.dtype.element_ty), mask=valid[:, None] & (dv[None, :] < DV))
        tl.store(LSE + bh * Nq + rows, m_i + tl.log2(l_safe), mask=valid)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "H", "Nq"])
def _attn_bwd_delta_kernel(
    SCHED, T, O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Nq,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[row] = sum_d O[row, d] * dO[row, d]: the softmax-backward row term for fp32 inputs,
    whose O is not rounded (16-bit inputs compute delta in the dQ kernel, see there)."""
    bh, t = _program(T)
    b = bh // H
    h = bh % H
    rows = tl.load(SCHED + t * _ENTRY) + tl.arange(0, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < Nq) & (dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + rows.to(tl.int64)[:, None] * som + dv[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows.to(tl.int64)[:, None] * sdom + dv[None, :] * sdod, mask=ok,
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
    k = tl.load(k_base + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd,
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    vt = tl.load(v_base + cols.to(tl.int64)[None, :] * svn + dv[:, None] * svd,
                 mask=kv_ok[None, :] & (dv[:, None] < DV), other=0.0)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    p = tl.where(_allowed(cols, lo, hi, x0, x1, P2, KIND), tl.exp2(s - lse[:, None]), 0.0)
    return k, p, _dot(do, vt, PRECISION)


@triton.jit
def _delta_pass(q, do, lse, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd, lo, hi, x0, x1,
                P2, qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, KIND: tl.constexpr, PRECISION: tl.constexpr):
    """delta = rowsum(P * dP) over keys [n_lo, n_hi), for 16-bit inputs.

    From the fp32 P and dP this kernel (and the dK/dV kernel) use, not rowsum(dO * O) from the
    *rounded* O: with a 16-bit O the latter leaves rows of dS that do not sum to zero, an error
    of ~2^-8 |O| |dO| that dominates dQ and dK when attention is sharp (5-100x PyTorch's eager
    bf16 error on the projector tests). fp32 inputs keep O unrounded: their delta comes from the
    delta kernel."""
    delta = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k, p, dp = _dq_tile(q, do, lse, k_base, v_base, n0, n_hi, d, dv, skn, skd, svn, svd,
                            lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_N, KIND, PRECISION)
        delta += tl.sum(p * dp, 1)
    return delta


@triton.jit
def _dq_pass(q, do, lse, delta, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd, lo, hi,
             x0, x1, P2, qk_scale, sm_scale, D: tl.constexpr, DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             KIND: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 dQ of a query tile over keys ``[n_lo, n_hi)`` (scaled by ``sm_scale``), given the
    rows' ``lse`` and ``delta`` (shared by the fixed-shape and the varlen dQ kernels)."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        k, p, dp = _dq_tile(q, do, lse, k_base, v_base, n0, n_hi, d, dv, skn, skd, svn, svd,
                            lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_N, KIND, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq * sm_scale


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    SCHED, T, Q, K, V, DO, LSE, DELTA, DQ, DQWS, DWS, NSPLIT,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    DELTA_PASS: tl.constexpr, DELTA_ONLY: tl.constexpr,
):
    bh, b, h, rows, valid, lo, hi, x0, x1, n_lo, n_hi, slot = _query_program(
        SCHED, T, H, Nv, P0, P1, P2, P3, P4, BLOCK_M, KIND)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd,
                mask=valid[:, None] & (d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows.to(tl.int64)[:, None] * sdom + dv[None, :] * sdod,
                 mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh * Nq + rows, mask=valid, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    # Pass 1 (DELTA_PASS, 16-bit inputs): delta from the fp32 P and dP (see _delta_pass).
    # A key split of a global tile (slot >= 0) reads the delta of its rows, reduced beforehand
    # from the per-split partial sums of the DELTA_ONLY launch, and writes an fp32 dQ partial.
    if DELTA_ONLY:
        delta = _delta_pass(q, do, lse, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd,
                            lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_M, BLOCK_N, KIND, PRECISION)
        tl.store(DWS + _split_rows(bh, slot, rows, NSPLIT, Nq, P0), delta, mask=valid)
    else:
        own_delta = (slot < 0) & DELTA_PASS
        if own_delta:
            delta = _delta_pass(q, do, lse, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn,
                                svd, lo, hi, x0, x1, P2, qk_scale, D, DV, BLOCK_M, BLOCK_N, KIND,
                                PRECISION)
            tl.store(DELTA + bh * Nq + rows, delta, mask=valid)
        else:
            delta = tl.load(DELTA + bh * Nq + rows, mask=valid, other=0.0)

        # Pass 2: dQ.
        dq = _dq_pass(q, do, lse, delta, k_base, v_base, n_lo, n_hi, d, dv, skn, skd, svn, svd,
                      lo, hi, x0, x1, P2, qk_scale, sm_scale, D, DV, BLOCK_M, BLOCK_N, BLOCK_D,
                      KIND, PRECISION)
        if slot >= 0:
            ws = _split_rows(bh, slot, rows, NSPLIT, Nq, P0)
            tl.store(DQWS + ws[:, None] * D + d[None, :], dq,
                     mask=valid[:, None] & (d[None, :] < D))
        else:
            tl.store(DQ + b * sdqb + h * sdqh + rows.to(tl.int64)[:, None] * sdqm
                     + d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
                     mask=valid[:, None] & (d[None, :] < D))


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
        q = tl.load(q_base + rows.to(tl.int64)[:, None] * sqm + d[None, :] * sqd,
                    mask=valid[:, None] & (d[None, :] < D), other=0.0)
        do = tl.load(do_base + rows.to(tl.int64)[:, None] * sdom + dv[None, :] * sdod,
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
    SCHED, T, Q, K, V, DO, LSE, DELTA, DK, DV_,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, Nq, Nv, P0, P1, P2, P3, P4, qk_scale, sm_scale,
    D: tl.constexpr, DV: tl.constexpr, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    bh, t = _program(T)
    b = bh // H
    h = bh % H
    e = SCHED + t * _ENTRY
    n0 = tl.load(e)
    q_lo = tl.load(e + 1)  # first-segment rows whose windows reach this key tile (exact)
    q_hi = tl.load(e + 2)
    g_lo = tl.load(e + 3)  # global rows (see every key); empty for a band
    g_hi = tl.load(e + 4)
    cols = n0 + tl.arange(0, BLOCK_N)
    kv_ok = cols < Nv
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b * skb + h * skh + cols.to(tl.int64)[:, None] * skn + d[None, :] * skd,
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + h * svh + cols.to(tl.int64)[:, None] * svn + dv[None, :] * svd,
                mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)

    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + bh * Nq
    delta_base = DELTA + bh * Nq
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, q_lo, q_hi, False, q_base, do_base, lse_base,
                            delta_base, sqm, sqd, sdom, sdod, Nv, P0, P1, P2, P3, P4, qk_scale,
                            D, DV, KIND, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)
    if KIND != 2:  # every global query sees every key
        dk, dv_acc = _dkdv_rows(dk, dv_acc, k, v, cols, g_lo, g_hi, True, q_base, do_base, lse_base,
                                delta_base, sqm, sqd, sdom, sdod, Nv, P0, P1, P2, P3, P4,
                                qk_scale, D, DV, KIND, BLOCK_M, BLOCK_D, BLOCK_DV, PRECISION)

    tl.store(DK + b * sdkb + h * sdkh + cols.to(tl.int64)[:, None] * sdkn + d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None] & (d[None, :] < D))
    tl.store(DV_ + b * sdvb + h * sdvh + cols.to(tl.int64)[:, None] * sdvn + dv[None, :] * sdvd,
             dv_acc.to(DV_.dtype.element_ty), mask=kv_ok[:, None] & (dv[None, :] < DV))


# --------------------------------------------------------------------------------------------
# launch helpers (tile configs, grids and loop bounds: attention_plan.py)
# --------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype, interpret: bool = False) -> str:
    # fp32 inputs are computed exactly in fp32 (no silent TF32); 16-bit inputs use tensor cores.
    if interpret and dtype == torch.bfloat16:
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"


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
def problem(q, k, v, kind: int, params) -> Problem:
    B, H, Nq, D = q.shape
    arch = plan.DEFAULT_ARCH
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        arch = major * 10 + minor
    return Problem(B, H, Nq, k.shape[2], D, v.shape[3], q.dtype, int(kind),
                   tuple(int(x) for x in params), arch)


_TABLES: dict = {}


def _table(launch: plan.Launch, device) -> torch.Tensor:
    """The launch's per-program table on ``device`` (cached: one host-to-device copy per plan)."""
    key = (launch.table.tobytes(), str(device))
    t = _TABLES.get(key)
    if t is None:
        if len(_TABLES) > 512:
            _TABLES.clear()
        t = _TABLES[key] = torch.from_numpy(launch.table.astype("int32")).to(device)
    return t


def _launch(kernel, launch: plan.Launch, *args, **kwargs):
    kernel[launch.grid](_table(launch, args[0].device), launch.tiles, *args, **launch.cfg, **kwargs)


def _split_workspace(launch: plan.Launch, p: Problem, width: int, device):
    """fp32 ``[B*H, slots, Ng, width]`` and ``[B*H, slots, Ng]`` for the key splits of global
    tiles (1-element placeholders when the launch has none)."""
    slots = plan.n_slots(launch.table)
    if not slots:
        return _empty((1,), torch.float32, device), _empty((1,), torch.float32, device), 1
    ng = p.Nq - p.n_seg
    return (_empty((p.heads, slots, ng, width), torch.float32, device),
            _empty((p.heads, slots, ng), torch.float32, device), slots)


def _global_rows(t: torch.Tensor, p: Problem) -> torch.Tensor:
    """The global rows ``[B*H, Ng, ...]`` of a contiguous ``[B, H, Nq, ...]`` tensor (a view)."""
    return t.view(p.heads, p.Nq, *t.shape[3:])[:, p.n_seg:]


def attention_forward(q, k, v, kind: int, params, scale: float, split_min_iters=None):
    """Returns ``(out [B, H, Nq, Dv] contiguous, lse [B, H, Nq] float32, base-2)``.

    ``split_min_iters``: threshold of the key splits of global tiles (default
    ``attention_plan.SPLIT_MIN_ITERS``; tests lower it)."""
    B, H, Nq, D = q.shape
    Nv, DV = k.shape[2], v.shape[3]
    out = _empty((B, H, Nq, DV), q.dtype, q.device)
    lse = _empty((B, H, Nq), torch.float32, q.device)
    if B * H == 0:
        return out, lse
    block_d, block_dv = block_dims(D, DV)
    p = problem(q, k, v, kind, params)
    for la in plan.forward_plan(p, **_split_arg(split_min_iters)):
        if la.name == "fwd":
            ows, lws, nsplit = _split_workspace(la, p, DV, q.device)
            _launch(_attn_fwd_kernel, la,
                    q, k, v, out, lse, ows, lws, nsplit, *_strides(q), *_strides(k),
                    *_strides(v), *_strides(out), H, Nq, Nv, qk_scale=scale * LOG2E, D=D, DV=DV,
                    BLOCK_D=block_d, BLOCK_DV=block_dv,
                    PRECISION=_precision(q.dtype, q.device.type == "cpu"),
                    **_mask_scalars(kind, params))
        else:  # fwd_merge: combine the key splits with their log-sum-exps (fixed order)
            _merge_splits(ows, lws, _global_rows(out, p), _global_rows(lse, p))
    return out, lse


def _merge_splits(ows, lws, out, lse):
    """Write into ``out [B*H, Ng, Dv]`` and ``lse [B*H, Ng]`` the key splits' fp32 partial
    outputs ``ows [B*H, S, Ng, Dv]`` weighted by their base-2 log-sum-exps ``lws [B*H, S, Ng]``.

    A row whose scores are all -inf (-inf in the inputs) has every split at -inf: as in the
    kernels, the max is taken as 0 there, so each weight is 2^-inf = 0, the output 0 and the
    LSE log2(0) = -inf, as SDPA (not exp2(-inf - -inf) = NaN)."""
    m = lws.amax(1, keepdim=True)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp2(lws - m_safe)
    denom = w.sum(1)
    denom_safe = torch.where(denom == 0.0, 1.0, denom)
    out.copy_((ows * (w / denom_safe[:, None])[..., None]).sum(1))
    lse.copy_(m_safe[:, 0] + torch.log2(denom))


def _split_arg(split_min_iters):
    return {} if split_min_iters is None else dict(split_min_iters=split_min_iters)


def attention_backward(do, q, k, v, out, lse, kind: int, params, scale: float,
                       split_min_iters=None):
    """Returns ``(dq, dk, dv)``, contiguous, in the dtype of the inputs."""
    B, H, Nq, D = q.shape
    Nv, DV = k.shape[2], v.shape[3]
    dq = _empty((B, H, Nq, D), q.dtype, q.device)
    dk = _empty((B, H, Nv, D), k.dtype, q.device)
    dv = _empty((B, H, Nv, DV), v.dtype, q.device)
    if B * H == 0:
        return dq, dk, dv
    block_d, block_dv = block_dims(D, DV)
    p = problem(q, k, v, kind, params)
    # delta: written by the delta kernel (fp32) or the dQ kernel's first pass (16-bit; the
    # delta-only launch plus a reduction for split global tiles), read by dQ's split programs
    # and the dK/dV kernel (same stream, so ordered)
    delta = _empty((B, H, Nq), torch.float32, q.device)
    common = dict(qk_scale=scale * LOG2E, sm_scale=scale, D=D, DV=DV, BLOCK_D=block_d,
                  BLOCK_DV=block_dv, PRECISION=_precision(q.dtype, q.device.type == "cpu"),
                  **_mask_scalars(kind, params))
    qkv_do = (q, k, v, do, lse, delta, dq)
    for la in plan.backward_plan(p, **_split_arg(split_min_iters)):
        if la.name == "delta":
            _launch(_attn_bwd_delta_kernel, la, out, do, delta, *_strides(out), *_strides(do),
                    H, Nq, DV=DV, BLOCK_DV=block_dv)
        elif la.name in ("dq_delta", "dq"):
            dqws, dws, nsplit = _split_workspace(la, p, D, q.device)
            _launch(_attn_bwd_dq_kernel, la, *qkv_do, dqws, dws, nsplit, *_strides(q),
                    *_strides(k), *_strides(v), *_strides(do), *_strides(dq), H, Nq, Nv,
                    DELTA_PASS=la.extra["delta_pass"], DELTA_ONLY=la.name == "dq_delta",
                    **common)
        elif la.name == "delta_reduce":
            _global_rows(delta, p).copy_(dws.sum(1))
        elif la.name == "dq_reduce":
            _global_rows(dq, p).copy_(dqws.sum(1))
        else:
            _launch(_attn_bwd_dkdv_kernel, la,
                    q, k, v, do, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v),
                    *_strides(do), *_strides(dk), *_strides(dv), H, Nq, Nv, **common)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (read by pargo_kernels.aot)
# --------------------------------------------------------------------------------------------
def aot_specs(arch: int = 90):
    """Yield ``(kernel, pointer_types, constexprs, options, label)`` for every launch the
    launchers can make on ``sm_<arch>``: each mask kind x dtype x head-dim bucket the dispatcher
    accepts there (``attention_plan.arch_refusal``)."""
    for dtype, ty in _TL_DTYPE.items():
        if plan.arch_refusal(divmod(arch, 10), dtype):
            continue
        ptrs = dict(SCHED="i32", Q=ty, K=ty, V=ty, O=ty, DO=ty, DQ=ty, DK=ty, DV_=ty, LSE="fp32",
                    DELTA="fp32", OWS="fp32", LWS="fp32", DQWS="fp32", DWS="fp32")
        for block_d in (16, 32, 64, 128, 256):
            if plan.arch_refusal(divmod(arch, 10), dtype, block_d):
                continue
            if dtype == torch.float32:
                yield (_attn_bwd_delta_kernel, ptrs,
                       dict(DV=block_d, BLOCK_M=delta_block_m(block_d), BLOCK_DV=block_d),
                       dict(num_warps=4, num_stages=1), f"{ty} d={block_d}")
            for kind, kname in ((KIND_PG1D, "pg1d"), (KIND_PG2D, "pg2d"), (KIND_BAND, "band"),
                                (KIND_PARGO_SELF, "pgself")):
                for kernel, which in ((_attn_fwd_kernel, "fwd"), (_attn_bwd_dq_kernel, "dq"),
                                      (_attn_bwd_dkdv_kernel, "dkdv")):
                    cfg = tile_config(which, block_d, dtype, arch)
                    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                    constexprs = dict(D=block_d, DV=block_d, KIND=kind, BLOCK_D=block_d,
                                      BLOCK_DV=block_d, PRECISION=_precision(dtype), **cfg)
                    if which == "dq":
                        constexprs["DELTA_PASS"] = dtype != torch.float32
                        constexprs["DELTA_ONLY"] = False
                    label = (f"{kname} {ty} d={block_d} M={cfg['BLOCK_M']} N={cfg['BLOCK_N']} "
                             f"w={options['num_warps']} s={options['num_stages']}")
                    yield kernel, ptrs, constexprs, options, label
                    if which == "dq" and dtype != torch.float32 and kind != KIND_BAND:
                        # 16-bit split global tiles: the dq_delta launch (attention_plan)
                        yield (kernel, ptrs, {**constexprs, "DELTA_ONLY": True}, options,
                               f"{label} delta-only")
