"""Launch plans of the block-sparse attention kernels: grids, tile configs and loop bounds.

One plan per launch, computed on the host from the mask scalars, used by the launchers in
``attention_triton.py`` (the per-program loop bounds go to the kernels as a small int32 table)
and by ``benchmarks/work_model.py`` (FLOPs, bytes, iterations), so the model reads the very
schedule the kernels run. Pure Python + numpy: no GPU, no Triton compile needed.

A launch is a 1-D grid of ``heads * tiles`` programs; program ``pid`` serves head
``bh = pid // tiles`` and table entry ``pid % tiles`` (entries of one head are adjacent in
launch order, so the head's K/V are reused from L2, as in FlashAttention). Entries:

* query programs (forward, dQ): ``(m0, row_end, n_lo, n_hi, is_global, slot)``: rows
  ``[m0, min(m0 + BLOCK_M, row_end))``, key loop ``range(n_lo, n_hi, BLOCK_N)``; ``slot >= 0``
  marks one key split of a global tile whose fp32 partial result goes to workspace slot ``slot``
  (merged afterwards with the log-sum-exp, deterministically), ``-1`` a tile that owns its rows;
* key programs (dK/dV): ``(n0, q_lo, q_hi, g_lo, g_hi, 0)``: keys ``[n0, n0 + BLOCK_N)``, query
  loops ``range(q_lo, q_hi, BLOCK_M)`` (rows of the first segment whose windows can reach the
  tile, exact) and ``range(g_lo, g_hi, BLOCK_M)`` (global rows, which see every key; ParGo self:
  every key of ``[Np, N)``, so key tiles inside ``[0, Np)`` get none).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

KIND_PG1D, KIND_PG2D, KIND_BAND, KIND_PARGO_SELF = 0, 1, 2, 3
ENTRY = 6  # ints per table entry
MAX_GRID = 2**31 - 1  # CUDA grid x limit; the only grid axis the kernels use

# A global tile is split over its keys when it would run more than twice as many key tiles as
# the longest partial tile (and at least this many): the split programs then balance the launch
# (issue 13: video-length key sequences). The launchers take it as a parameter (tests lower it).
SPLIT_MIN_ITERS = 64


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def block_dims(d: int, dv: int) -> tuple[int, int]:
    return max(16, next_pow2(d)), max(16, next_pow2(dv))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, input class and padded head dim. Chosen
# as the largest tiles that compile without a register spill on sm_80 and sm_90 (checked by
# `python -m pargo_kernels.aot`; d=256 dQ and fp32 dK/dV shrank when the kernels got 64-bit
# offsets and key splits). fp32 inputs run exact-fp32 FMA dots, which need small tiles;
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
                  256: (16, 32, 8, 1)},
        "fp32": {16: (32, 32, 8, 1), 32: (32, 32, 4, 1), 64: (32, 32, 4, 1), 128: (16, 32, 4, 1),
                 256: (16, 32, 8, 1)},
    },
    "dkdv": {
        "16bit": {16: (32, 64, 4, 2), 32: (32, 64, 4, 2), 64: (32, 64, 4, 2), 128: (32, 64, 8, 1),
                  256: (16, 32, 8, 1)},
        "fp32": {16: (32, 32, 4, 1), 32: (32, 32, 4, 1), 64: (32, 32, 8, 1), 128: (16, 32, 8, 1),
                 256: (16, 16, 4, 1)},
    },
}


# Oldest GPU the Triton kernels are checked for (`python -m pargo_kernels.aot --arch 75 ...`), and
# the oldest with the tensor-core path the 16-bit kernels need: Triton 3.6 emits mma.sync for
# fp16/bf16 tl.dot from sm_80 on; on sm_75 it falls back to FMA dots that spill registers.
MIN_CAPABILITY = (7, 5)
MIN_CAPABILITY_16BIT = (8, 0)


# Largest head dim per architecture where the tables below fit the shared memory (sm_75: 64 KB
# a block; the fp32 d=256 dQ and dK/dV tiles need 96 and 65 KB).
MAX_HEAD_DIM_BY_ARCH = {75: 128}


def arch_refusal(capability: tuple[int, int], dtype: torch.dtype, head_dim: int = 0) -> str:
    """Why the Triton attention kernels refuse ``dtype`` (and a head dim, the larger of D and
    Dv) on a GPU of ``capability`` ('' if they do not)."""
    name = f"sm_{capability[0]}{capability[1]}"
    if tuple(capability) < MIN_CAPABILITY:
        return (f"the Triton attention kernels are built and checked for sm_75 and newer; this "
                f"GPU is {name}")
    limit = MAX_HEAD_DIM_BY_ARCH.get(capability[0] * 10 + capability[1])
    if limit and head_dim > limit:
        return (f"head dim {head_dim} on {name}: the kernels' tiles need more than its 64 KB of "
                f"shared memory above head dim {limit}")
    if dtype != torch.float32 and tuple(capability) < MIN_CAPABILITY_16BIT:
        dt = str(dtype).replace("torch.", "")
        why = ("bfloat16 needs sm_80+" if dtype == torch.bfloat16 else
               "Triton has no tensor-core path for float16 below sm_80 (its FMA fallback "
               "spills registers)")
        return f"{dt} attention on {name}: {why}; use float32 inputs or backend='reference'"
    return ""


# Where the table above spills or exceeds the shared memory on an architecture (found by
# `python -m pargo_kernels.aot --arch 75 86 89 80 90`; sm_86/89 have 99 KB of shared memory).
# fp32 d=128 dK/dV: 8 warps spill on sm_80 (2-D windows), 4 warps spill on sm_90. fp32 d=64 dQ
# on sm_75/80: 32x32 tiles spill with 4 warps (2-D windows) and with 8 (ParGo self), 32x16 not.
_DKDV_FP32_128 = {("dkdv", "fp32", 128): (16, 32, 4, 1)}
_SM80 = {**_DKDV_FP32_128, ("dq", "fp32", 16): (32, 16, 4, 1), ("dq", "fp32", 64): (32, 16, 4, 1),
         ("fwd", "fp32", 64): (32, 32, 4, 1)}
_SM86 = {**_DKDV_FP32_128, ("fwd", "fp32", 256): (16, 16, 8, 1)}
_ARCH_CONFIGS = {75: _SM80, 80: _SM80, 86: _SM86, 89: _SM86}
DEFAULT_ARCH = 90  # the interpreter and the work model (H100)


def tile_config(kernel: str, block_d: int, dtype: torch.dtype, arch: int = DEFAULT_ARCH) -> dict:
    """Launch configuration of ``kernel`` ("fwd", "dq", "dkdv") for a padded head dim on
    ``sm_<arch>``."""
    cls = "fp32" if dtype == torch.float32 else "16bit"
    m, n, warps, stages = _ARCH_CONFIGS.get(arch, {}).get((kernel, cls, block_d),
                                                          _CONFIGS[kernel][cls][block_d])
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def delta_block_m(block_dv: int) -> int:
    return max(16, min(128, 4096 // block_dv))


@dataclass(frozen=True)
class Problem:
    """Everything a plan depends on: shapes, dtype and the mask as ``(kind, params)``."""
    B: int
    H: int
    Nq: int
    Nv: int
    D: int
    Dv: int
    dtype: torch.dtype
    kind: int
    params: tuple
    arch: int = DEFAULT_ARCH  # compute capability as major * 10 + minor: picks the tile table

    @property
    def heads(self) -> int:
        return self.B * self.H

    @property
    def n_seg(self) -> int:
        """Rows of the first segment: partial rows, or every row of a band."""
        return self.Nq if self.kind == KIND_BAND else int(self.params[0])


@dataclass
class Launch:
    """One kernel launch: ``grid`` programs, ``heads`` x ``len(table)``, tile config ``cfg``."""
    name: str
    heads: int
    cfg: dict
    table: np.ndarray  # [tiles, ENTRY] int64 (sent to the kernel as int32)
    extra: dict = field(default_factory=dict)

    @property
    def tiles(self) -> int:
        return len(self.table)

    @property
    def grid(self) -> tuple[int]:
        return (check_grid(self.name, self.heads, self.tiles),)

    def programs(self):
        """``(bh, entry)`` of every program in launch order (``program_coords`` of 0, 1, ...)."""
        for bh in range(self.heads):
            for t in range(self.tiles):
                yield bh, t


def check_grid(name: str, heads: int, tiles: int) -> int:
    """Programs of a 1-D launch over ``heads`` x ``tiles``; a clear error past CUDA's limit."""
    n = heads * tiles
    if n > MAX_GRID:
        raise ValueError(f"attention {name} launch needs B*H*tiles = {heads}*{tiles} = {n} "
                         f"programs, more than the grid limit {MAX_GRID}; split the batch")
    return n


def program_coords(pid: int, tiles: int) -> tuple[int, int]:
    """``(bh, entry)`` of program ``pid``: what the kernels compute from ``tl.program_id(0)``."""
    return pid // tiles, pid % tiles


# --------------------------------------------------------------------------------------------
# windows of the first segment, on the host (numpy int64: no overflow)
# --------------------------------------------------------------------------------------------
def row_windows(p: Problem, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat key interval ``[lo, hi)`` of first-segment rows (2-D: the band of key rows)."""
    rows = rows.astype(np.int64)
    P = [int(x) for x in p.params]
    if p.kind == KIND_BAND:
        return np.maximum(rows - P[0], 0), np.minimum(rows + P[1] + 1, p.Nv)
    if p.kind == KIND_PARGO_SELF:  # (n_partial, left, right): a band inside [0, Np)
        return np.maximum(rows - P[1], 0), np.minimum(rows + P[2] + 1, P[0])
    if p.kind == KIND_PG1D:
        n_p = max(P[0], 1)
        return rows * p.Nv // n_p, (rows + 1) * p.Nv // n_p
    r = rows // P[4]
    return (r * P[1]) // P[3] * P[2], ((r + 1) * P[1] + P[3] - 1) // P[3] * P[2]


def global_key_start(p: Problem) -> int:
    """First key the global rows see: 0, or ``Np`` for ParGo self-attention (keys ``[Np, N)``)."""
    return p.n_seg if p.kind == KIND_PARGO_SELF else 0


def query_entries(p: Problem, block_m: int, block_n: int, split_min_iters: int) -> np.ndarray:
    """Forward / dQ programs of one head: global tiles (split over keys when long) first, so the
    longest programs do not run last, then the first-segment tiles."""
    n_seg = p.n_seg
    seg = []
    for m0 in range(0, n_seg, block_m):
        row_end = n_seg
        lo, hi = row_windows(p, np.array([m0, min(m0 + block_m, n_seg) - 1]))
        seg.append((m0, row_end, int(lo[0]), int(hi[1]), 0, -1))
    glob = []
    if p.kind != KIND_BAND and p.Nq > n_seg:
        k0 = global_key_start(p)
        iters = cdiv(p.Nv - k0, block_n)
        longest = max((cdiv(e[3] - e[2], block_n) for e in seg), default=0)
        chunk = max(longest, split_min_iters, 1)
        splits = 1 if iters <= 2 * chunk else cdiv(iters, chunk)
        per = cdiv(iters, splits) * block_n
        for m0 in range(n_seg, p.Nq, block_m):
            if splits == 1:
                glob.append((m0, p.Nq, k0, p.Nv, 1, -1))
            else:
                glob += [(m0, p.Nq, k0 + s * per, min(k0 + (s + 1) * per, p.Nv), 1, s)
                         for s in range(cdiv(p.Nv - k0, per))]
    return np.array(glob + seg, dtype=np.int64).reshape(-1, ENTRY)


def key_entries(p: Problem, block_m: int, block_n: int) -> np.ndarray:
    """dK/dV programs of one head: key tile, exact first-segment rows reaching it, global rows."""
    n_seg = p.n_seg
    n0 = np.arange(0, p.Nv, block_n, dtype=np.int64)
    n_last = np.minimum(n0 + block_n, p.Nv) - 1
    if n_seg:
        lo, hi = row_windows(p, np.arange(n_seg))  # both non-decreasing in the row
        q_lo = np.searchsorted(hi, n0, side="right")
        q_hi = np.searchsorted(lo, n_last, side="right")
        q_hi = np.maximum(q_hi, q_lo)
    else:
        q_lo = q_hi = np.zeros_like(n0)
    g_lo = np.full_like(n0, n_seg if p.kind != KIND_BAND else 0)
    g_hi = np.full_like(n0, p.Nq if p.kind != KIND_BAND else 0)
    g_hi = np.where(n_last >= global_key_start(p), g_hi, g_lo)  # ParGo self: only keys [Np, N)
    return np.stack([n0, q_lo, q_hi, g_lo, g_hi, np.zeros_like(n0)], 1)


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------
def _cfg(kernel: str, p: Problem) -> dict:
    block_d, block_dv = block_dims(p.D, p.Dv)
    return tile_config(kernel, max(block_d, block_dv), p.dtype, p.arch)


def n_slots(table: np.ndarray) -> int:
    return int(table[:, 5].max()) + 1 if len(table) else 0


@functools.lru_cache(maxsize=256)
def forward_plan(p: Problem, split_min_iters: int = SPLIT_MIN_ITERS) -> list[Launch]:
    cfg = _cfg("fwd", p)
    table = query_entries(p, cfg["BLOCK_M"], cfg["BLOCK_N"], split_min_iters)
    launches = [Launch("fwd", p.heads, cfg, table)]
    if n_slots(table):  # the key splits' partial outputs, merged with their log-sum-exps
        launches.append(_reduction("fwd_merge", p, table))
    return launches


def _reduction(name: str, p: Problem, table: np.ndarray) -> Launch:
    """A host-side (torch) deterministic reduction over the key splits of the global rows."""
    return Launch(name, p.heads, {}, np.zeros((0, ENTRY), np.int64),
                  dict(slots=n_slots(table), rows=p.Nq - p.n_seg))


@functools.lru_cache(maxsize=256)
def backward_plan(p: Problem, split_min_iters: int = SPLIT_MIN_ITERS) -> list[Launch]:
    """In order: [delta (fp32 inputs)], [dq_delta + delta_reduce (16-bit, split global tiles)],
    dq, [dq_reduce (split global tiles)], dkdv."""
    launches = []
    delta_pass = p.dtype != torch.float32
    if not delta_pass:
        _, block_dv = block_dims(p.D, p.Dv)
        bm = delta_block_m(block_dv)
        table = np.array([(m0, p.Nq, 0, 0, 0, -1) for m0 in range(0, p.Nq, bm)], np.int64)
        launches.append(Launch("delta", p.heads, dict(BLOCK_M=bm, num_warps=4, num_stages=1),
                               table.reshape(-1, ENTRY)))
    cfg = _cfg("dq", p)
    table = query_entries(p, cfg["BLOCK_M"], cfg["BLOCK_N"], split_min_iters)
    split = table[table[:, 5] >= 0]
    if delta_pass and len(split):
        launches.append(Launch("dq_delta", p.heads, cfg, split, dict(delta_pass=True)))
        launches.append(_reduction("delta_reduce", p, table))
    launches.append(Launch("dq", p.heads, cfg, table, dict(delta_pass=delta_pass)))
    if len(split):
        launches.append(_reduction("dq_reduce", p, table))
    cfg = _cfg("dkdv", p)
    launches.append(Launch("dkdv", p.heads, cfg, key_entries(p, cfg["BLOCK_M"], cfg["BLOCK_N"])))
    return launches
