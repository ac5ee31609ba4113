"""Plans of packed (varlen) batches: validated per-sequence metadata and tile schedule.

A packed batch concatenates the tokens of ``n_seq`` sequences (``[total, ...]``) and describes
them by int offsets ``cu_seqlens [n_seq + 1]`` (FlashAttention's varlen layout). A plan is
built once per batch on the host from the offsets and grids (FlashInfer's plan/run split) and
holds, for every sequence, one row of int32 metadata (offsets, lengths, mask parameters and the
cumulative number of tiles for every tile size a kernel may use): O(#sequences), copied to the
device once. A kernel program finds its sequence by a binary search over the cumulative tile
counts, so tiles are scheduled over the concatenation (``sum_i ceil(N_i / BLOCK)`` programs,
never ``n_seq x max_i ceil(N_i / BLOCK)``) and a program touches only its own sequence.

Running a plan needs no host-device synchronisation: every number a launcher needs on the host
(totals, tile counts, loop bounds) sits in a CPU copy of the metadata. A plan holds tensors
only (and a constant ``kind``), so ``torch.compile`` traces it without specialising on the
lengths. Building one from a CUDA ``cu_seqlens`` tensor copies that tensor to the host (one
synchronisation); lists of ints and CPU tensors cost none.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ._validate import check_int
from .masks import KIND_BAND, KIND_PG1D, KIND_PG2D, BandMask, PartialGlobalMask

# Tile sizes a kernel may be launched with; the plan carries the schedule for each.
TILE_SIZES = (16, 32, 64, 128)
KIND_POOL = -1  # plan of a pooling op (no attention mask)

# Columns of an attention plan's metadata rows.
A_Q_START, A_K_START, A_NQ, A_NV, A_P0 = 0, 1, 2, 3, 4  # P0..P4: columns 4..8
A_NSPLIT, A_CHUNK, A_GSTART = 9, 10, 11  # key splits of the global tiles (see below)
A_QTILES = 12  # cumulative query programs, one column per TILE_SIZES entry
A_KTILES = A_QTILES + len(TILE_SIZES)  # cumulative key tiles
A_STILES = A_KTILES + len(TILE_SIZES)  # cumulative key-split programs (16-bit delta launch)
A_FIELDS = A_STILES + len(TILE_SIZES)

# Key splits of global query tiles (issue 13's flash-decoding split, as the fixed-shape path's
# ``attention_plan.query_entries``). A global query tile loops over every key of its sequence,
# so one 48x48 image's global tile would run 36 key tiles of 64 while most programs of the
# batch run a few. Rule, chosen on the host from the whole batch: let ``Nv*`` be the longest
# key sequence among the sequences that have global rows and more than ``split_keys`` keys;
# if there is one, every such sequence splits each of its global tiles into the same number
# ``S = ceil(Nv* / split_keys)`` of programs, program ``s`` visiting keys
# ``[s * c_i, min((s + 1) * c_i, Nv_i))`` with ``c_i = ceil(Nv_i / S)`` rounded up to
# ``SPLIT_ALIGN`` (a chunk may come out empty: it contributes nothing to the merge), so no
# global program visits more than ``split_keys`` keys (plus alignment). Each split writes an
# fp32 partial (output and log-sum-exp; dQ: partial dQ and, for 16-bit, partial delta) to a
# workspace ``[H, S, G, ...]`` over the ``G`` global rows of split sequences (``A_GSTART``: the
# sequence's first row there; the last plan row holds ``G``), merged afterwards in slot order by
# the fixed-shape path's reduction (deterministic, no atomics). ``S`` is one number for the
# batch so that the merge is one dense reduction.
SPLIT_KEYS = 768  # a multiple of every BLOCK_N: 12 key tiles of 64 (tests lower it)
SPLIT_ALIGN = 16  # the smallest BLOCK_N of any tile configuration

# Columns of a pooling plan's metadata rows; the last row holds the totals.
P_IN_START, P_OUT_START, P_HIN, P_WIN, P_HOUT, P_WOUT = range(6)
P_FIELDS = 6


@dataclass(frozen=True, eq=False)
class VarlenPlan:
    """Metadata of one packed batch; build with :func:`plan_partial_global`,
    :func:`plan_band` or :func:`plan_pool`, pass as ``plan=`` to the varlen ops.

    ``meta`` (int32, on the device) and ``meta_host`` (int64, CPU) hold the same
    ``[n_seq + 1, F]`` table; the last row holds the totals (offsets one past the end,
    cumulative tile counts). ``extra`` (CPU int64) holds the host-side loop bounds. The tokens
    ``in_token`` / ``out_token`` are empty ``[0, total]`` tensors that carry the input and output
    lengths as *shapes*, so that fake (meta) implementations know output sizes under
    ``torch.compile`` without reading a tensor. ``cu_seqlens_out`` (pooling: CPU int32) gives
    the output offsets. ``windows`` (band plans): the rows' ``P0, P1`` hold per-sequence
    windows (:func:`plan_band` ``windows=``), so the call passes no window.
    """

    kind: int
    meta: torch.Tensor
    meta_host: torch.Tensor
    extra: torch.Tensor
    in_token: torch.Tensor
    out_token: torch.Tensor
    cu_seqlens_out: Optional[torch.Tensor] = None
    windows: bool = False

    @property
    def n_seq(self) -> int:
        return self.meta_host.shape[0] - 1

    @property
    def n_split(self) -> int:
        """Key splits ``S`` of every split global tile (1: no split; attention plans)."""
        return int(self.extra[2])

    @property
    def split_rows(self) -> int:
        """Global rows of the split sequences (rows of the split workspaces)."""
        return int(self.extra[3])

    def total(self, column: int) -> int:
        return int(self.meta_host[-1, column])

    def tiles(self, column: int, block: int) -> int:
        """Programs of a launch with tiles of ``block`` rows (query tiles: ``A_QTILES``)."""
        if block not in TILE_SIZES:
            raise ValueError(f"tile size {block} is not planned (plans carry {TILE_SIZES})")
        return self.total(column + TILE_SIZES.index(block))

    def check_length(self, name: str, n: int, column: int, offsets: str) -> None:
        """ValueError unless a tensor's ``n`` tokens match the total of the offsets column."""
        if n != self.total(column):
            raise ValueError(f"{name} has {n} tokens but {offsets}[-1] = {self.total(column)}")

    def check_lengths(self, n_q: int, n_k: int) -> None:
        """An attention plan against its ``q`` and ``k`` lengths; messages name the offsets
        argument of the op (``cu_seqlens`` for a band, ``cu_seqlens_q`` / ``_k`` otherwise)."""
        band = self.kind == KIND_BAND
        self.check_length("q", n_q, A_Q_START, "cu_seqlens" if band else "cu_seqlens_q")
        self.check_length("k", n_k, A_K_START, "cu_seqlens" if band else "cu_seqlens_k")

    def search_steps(self) -> int:
        """Iterations of the kernels' binary search over the sequences."""
        return math.ceil(math.log2(max(self.n_seq, 1)))


# --------------------------------------------------------------------------------------------
# validation of the per-batch arguments (every message names the argument and the sequence)
# --------------------------------------------------------------------------------------------
def _ints(name: str, value) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.device.type == "meta":  # no values to read (the plan is built on the host)
            raise ValueError(f"{name} is on the meta device, which holds no values: pass a "
                             "list of ints or a CPU or CUDA int tensor")
        return [int(v) for v in value.reshape(-1).tolist()]  # CUDA tensor: one copy to host
    if isinstance(value, (list, tuple)):
        return [check_int(f"{name}[{i}]", v) for i, v in enumerate(value)]
    raise TypeError(f"{name} must be a list of ints or an integer tensor, got "
                    f"{type(value).__name__}")


def check_cu_seqlens(name: str, cu, total: Optional[int] = None,
                     min_len: int = 0) -> list[int]:
    """Offsets as a list of ints: ``[0, ..., total]``, non-decreasing, at least one sequence."""
    if isinstance(cu, torch.Tensor) and cu.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n_seq + 1], got shape {tuple(cu.shape)}")
    vals = _ints(name, cu)
    if len(vals) < 2:
        raise ValueError(f"{name} must hold n_seq + 1 >= 2 offsets, got {vals}")
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    for i in range(len(vals) - 1):
        if vals[i + 1] < vals[i]:
            raise ValueError(f"{name} must be non-decreasing: sequence {i} ends at {vals[i + 1]} "
                             f"before it starts at {vals[i]}")
        if vals[i + 1] - vals[i] < min_len:
            raise ValueError(f"{name}: sequence {i} has {vals[i + 1] - vals[i]} tokens, at least "
                             f"{min_len} needed")
    if vals[-1] >= 2**31:
        raise ValueError(f"{name}[-1] = {vals[-1]} tokens exceeds 2**31 - 1")
    if total is not None and vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} does not match the tensor's {total} tokens")
    return vals


def check_grids(name: str, grids, n_seq: int, allow_single: bool = False) -> list[tuple[int, int]]:
    """``[n_seq, 2]`` positive grids (list of pairs or int tensor); with ``allow_single`` a
    single pair ``(rows, cols)`` stands for every sequence."""
    if isinstance(grids, torch.Tensor):
        flat = _ints(name, grids)  # checks the dtype
        if allow_single and tuple(grids.shape) == (2,):
            grids = [tuple(flat)] * n_seq
        elif grids.dim() != 2 or grids.shape[1] != 2:
            raise ValueError(f"{name} must be [n_seq, 2], got shape {tuple(grids.shape)}")
        else:
            grids = [tuple(flat[2 * i: 2 * i + 2]) for i in range(len(flat) // 2)]
    elif not isinstance(grids, (list, tuple)):
        raise TypeError(f"{name} must be a list of (rows, cols) pairs or an int tensor "
                        f"[n_seq, 2], got {type(grids).__name__}")
    elif allow_single and len(grids) == 2 and all(isinstance(g, numbers.Integral) for g in grids):
        grids = [tuple(grids)] * n_seq
    if len(grids) != n_seq:
        raise ValueError(f"{name} has {len(grids)} grids but cu_seqlens has {n_seq} sequences")
    out = []
    for i, g in enumerate(grids):
        if not isinstance(g, (list, tuple)) or len(g) != 2:
            raise TypeError(f"{name}[{i}] must be a pair (rows, cols), got {g!r}")
        r, c = check_int(f"{name}[{i}][0]", g[0]), check_int(f"{name}[{i}][1]", g[1])
        if r <= 0 or c <= 0:
            raise ValueError(f"{name}[{i}] (sequence {i}) must be positive, got {(r, c)}")
        out.append((r, c))
    return out


def check_windows(name: str, windows, n_seq: int) -> list[tuple[int, int]]:
    """Per-sequence band windows ``[n_seq, 2]`` (list of ``(left, right)`` pairs or int tensor),
    non-negative ints, as a list of ``(left, right)`` tuples."""
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2 or windows.shape[1] != 2:
            raise ValueError(f"{name} must be [n_seq, 2] (left, right per sequence), got shape "
                             f"{tuple(windows.shape)}")
        flat = _ints(name, windows)  # checks the dtype; a CUDA tensor: one copy to host
        windows = [tuple(flat[2 * i: 2 * i + 2]) for i in range(len(flat) // 2)]
    elif not isinstance(windows, (list, tuple)):
        raise TypeError(f"{name} must be a pair (left, right), a list of pairs or an int tensor "
                        f"[n_seq, 2], got {type(windows).__name__}")
    if len(windows) != n_seq:
        raise ValueError(f"{name} has {len(windows)} windows but cu_seqlens has {n_seq} "
                         "sequences")
    out = []
    for i, w in enumerate(windows):
        if not isinstance(w, (list, tuple)) or len(w) != 2:
            raise TypeError(f"{name}[{i}] must be a pair (left, right) of non-negative ints, got "
                            f"{w!r}")
        out.append((check_int(f"{name}[{i}][0] (left of sequence {i})", w[0], 0),
                     check_int(f"{name}[{i}][1] (right of sequence {i})", w[1], 0)))
    return out


def _per_seq_ints(name: str, value, n_seq: int) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)] * n_seq
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return _ints(name, value) * n_seq  # dtype and device checked (no float truncated)
    vals = _ints(name, value)
    if len(vals) != n_seq:
        raise ValueError(f"{name} has {len(vals)} entries but there are {n_seq} sequences")
    return vals


def _to_device(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    # host copies are built on the CPU whatever torch.set_default_device says (a CUDA default
    # would put them on the GPU, and pin_memory() refuses a GPU tensor)
    host = torch.tensor(rows, dtype=torch.int64, device="cpu")
    meta = host.to(torch.int32)
    device = torch.device(device)
    if device.type == "cuda":  # pinned + non_blocking: an asynchronous copy, no sync
        meta = meta.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        meta = meta.to(device)
    return meta, host


def _token(n: int, device) -> torch.Tensor:
    return torch.empty((0, n), dtype=torch.int8, device=device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _cumulative(counts: list[int]) -> list[int]:
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out + [acc]


# --------------------------------------------------------------------------------------------
# plan builders
# --------------------------------------------------------------------------------------------
def key_splits(nq: list[int], nv: list[int], n_partial: list[int],
               split_keys: int) -> tuple[int, list[int], list[int]]:
    """``(S, splits, chunks)`` of the rule above: ``splits[i]`` is ``S`` for a split sequence,
    else 1; ``chunks[i]`` its keys per split (``Nv_i`` when not split)."""
    long = [b for a, b, p in zip(nq, nv, n_partial) if a > p and b > split_keys]
    if not long:
        return 1, [1] * len(nq), list(nv)
    n_split = _cdiv(max(long), split_keys)
    split = [a > p and b > split_keys for a, b, p in zip(nq, nv, n_partial)]
    chunks = [_cdiv(_cdiv(b, n_split), SPLIT_ALIGN) * SPLIT_ALIGN if s else b
              for b, s in zip(nv, split)]
    return n_split, [n_split if s else 1 for s in split], chunks


def _attention_plan(kind: int, cu_q: list[int], cu_k: list[int], params: list[tuple],
                    device, split_keys: Optional[int] = None) -> VarlenPlan:
    n_seq = len(cu_q) - 1
    nq = [cu_q[i + 1] - cu_q[i] for i in range(n_seq)]
    nv = [cu_k[i + 1] - cu_k[i] for i in range(n_seq)]
    n_part = [n if kind == KIND_BAND else p[0] for n, p in zip(nq, params)]
    split_keys = SPLIT_KEYS if split_keys is None else split_keys
    if isinstance(split_keys, bool) or not isinstance(split_keys, numbers.Integral) \
            or split_keys < 1:
        raise ValueError(f"split_keys must be a positive int, got {split_keys!r}")
    n_split, splits, chunks = key_splits(nq, nv, n_part, split_keys)
    gstart = _cumulative([n - p if s > 1 else 0 for n, p, s in zip(nq, n_part, splits)])
    qtiles, ktiles, stiles = [], [], []
    for block in TILE_SIZES:
        # partial tiles, then global tiles x their key splits (no tile mixes the two kinds)
        gt = [-(-(n - p) // block) * s for n, p, s in zip(nq, n_part, splits)]
        qtiles.append(_cumulative([-(-p // block) + g for p, g in zip(n_part, gt)]))
        ktiles.append(_cumulative([-(-n // block) for n in nv]))
        stiles.append(_cumulative([g if s > 1 else 0 for g, s in zip(gt, splits)]))
    rows = []
    for i in range(n_seq + 1):
        last = i == n_seq
        p = (0, 0, 0, 0, 0) if last else params[i]
        rows.append([cu_q[i], cu_k[i], 0 if last else nq[i], 0 if last else nv[i], *p,
                     1 if last else splits[i], 0 if last else chunks[i], gstart[i]]
                    + [t[i] for t in qtiles] + [t[i] for t in ktiles] + [t[i] for t in stiles])
    meta, host = _to_device(rows, device)
    # host-side bounds: longest Nq, Nv; the batch's split count S; global rows of split sequences
    extra = torch.tensor([max(nq), max(nv), n_split, gstart[-1]], dtype=torch.int64, device="cpu")
    return VarlenPlan(kind, meta, host, extra, _token(cu_k[-1], device), _token(cu_q[-1], device))


def plan_partial_global(cu_seqlens_q, cu_seqlens_k, n_partial, *, visual_grids=None,
                        partial_grids=None, device="cpu",
                        split_keys: Optional[int] = None) -> VarlenPlan:
    """Plan of :func:`~pargo_kernels.partial_global_attention_varlen` (arguments as there);
    ``device`` is where the kernels run (the metadata is copied there once, asynchronously);
    ``split_keys``: most keys a global-tile program visits before its tile is split over
    programs (default ``SPLIT_KEYS``; the rule is in this module's ``SPLIT_KEYS`` comment)."""
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, min_len=1)
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, min_len=1)
    n_seq = len(cu_q) - 1
    if len(cu_k) - 1 != n_seq:
        raise ValueError(f"cu_seqlens_k has {len(cu_k) - 1} sequences but cu_seqlens_q has "
                         f"{n_seq}")
    nps = _per_seq_ints("n_partial", n_partial, n_seq)
    if (visual_grids is None) != (partial_grids is None):
        raise ValueError("visual_grids and partial_grids must be given together (2-D windows) "
                         "or both left None (1-D windows)")
    vgs = check_grids("visual_grids", visual_grids, n_seq) if visual_grids is not None else None
    pgs = check_grids("partial_grids", partial_grids, n_seq) if partial_grids is not None else None
    params = []
    for i in range(n_seq):
        try:  # the fixed-shape mask validates one sequence; re-raised with its index
            mask = PartialGlobalMask(cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i], nps[i],
                                     vgs[i] if vgs else None, pgs[i] if pgs else None)
        except (ValueError, TypeError) as e:
            raise type(e)(f"sequence {i}: {e}") from None
        params.append(tuple(mask.params))
    return _attention_plan(KIND_PG1D if vgs is None else KIND_PG2D, cu_q, cu_k, params, device,
                           split_keys)


def plan_band(cu_seqlens, *, windows=None, device="cpu") -> VarlenPlan:
    """Plan of :func:`~pargo_kernels.band_attention_varlen`. ``windows=None``: the window is a
    per-call pair shared by all sequences, so one plan serves every layer of a cascade.
    ``windows``: one ``(left, right)`` per sequence (list of pairs or int tensor ``[n_seq, 2]``;
    a CUDA tensor is copied to the host once), held in the rows' ``P0, P1`` (clipped to the
    sequence): the kernels read sequence ``i``'s own band, and the call passes no window."""
    cu = check_cu_seqlens("cu_seqlens", cu_seqlens, min_len=1)
    n_seq = len(cu) - 1
    if windows is None:
        return _attention_plan(KIND_BAND, cu, cu, [(0, 0, 0, 0, 0)] * n_seq, device)
    params = [BandMask(cu[i + 1] - cu[i], *w).params  # clipped to the sequence (int32)
              for i, w in enumerate(check_windows("windows", windows, n_seq))]
    return dataclasses.replace(_attention_plan(KIND_BAND, cu, cu, params, device), windows=True)


def band_window(row: list, window) -> tuple[int, int]:
    """The band of a plan row: the per-call ``window`` or the row's per-sequence ``P0, P1`` (the
    other is ``(0, 0)``), as the kernels combine them (their maximum), before clipping."""
    return max(int(window[0]), row[A_P0]), max(int(window[1]), row[A_P0 + 1])


def plan_pool(cu_seqlens, in_grids, out_grids, *, device="cpu") -> VarlenPlan:
    """Plan of the varlen pooling ops (arguments as in
    :func:`~pargo_kernels.adaptive_avg_pool_tokens_varlen`)."""
    from .ops.pool_triton import max_span  # pure Python; imports triton only for its cdiv

    cu = check_cu_seqlens("cu_seqlens", cu_seqlens)
    n_seq = len(cu) - 1
    ins = check_grids("in_grids", in_grids, n_seq)
    outs = check_grids("out_grids", out_grids, n_seq, allow_single=True)
    cu_out = [0]
    for i, ((hi, wi), (ho, wo)) in enumerate(zip(ins, outs)):
        if hi * wi != cu[i + 1] - cu[i]:
            raise ValueError(f"in_grids[{i}] = {(hi, wi)} has {hi * wi} cells but sequence {i} "
                             f"of cu_seqlens has {cu[i + 1] - cu[i]} tokens")
        cu_out.append(cu_out[-1] + ho * wo)
    if cu_out[-1] >= 2**31:
        raise ValueError(f"the pooled batch has {cu_out[-1]} tokens, more than 2**31 - 1")
    rows = [[cu[i], cu_out[i], *ins[i], *outs[i]] for i in range(n_seq)]
    rows.append([cu[-1], cu_out[-1], 1, 1, 1, 1])
    meta, host = _to_device(rows, device)
    # loop bounds: largest window (forward) and largest inverse window (backward), per axis
    extra = torch.tensor([max(max_span(hi, ho) for (hi, _), (ho, _) in zip(ins, outs)),
                          max(max_span(wi, wo) for (_, wi), (_, wo) in zip(ins, outs)),
                          max(max_span(ho, hi) for (hi, _), (ho, _) in zip(ins, outs)),
                          max(max_span(wo, wi) for (_, wi), (_, wo) in zip(ins, outs))],
                         dtype=torch.int64, device="cpu")
    return VarlenPlan(KIND_POOL, meta, host, extra, _token(cu[-1], device),
                      _token(cu_out[-1], device), torch.tensor(cu_out, dtype=torch.int32,
                                                               device="cpu"))


__all__ = ["VarlenPlan", "plan_partial_global", "plan_band", "plan_pool", "TILE_SIZES"]
