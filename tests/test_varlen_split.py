"""Key splits of the packed (varlen) partial-global attention's global tiles (issue 13's
flash-decoding split, the rule in ``pargo_kernels.varlen_plan.SPLIT_KEYS``).

The split threshold is lowered (``varlen_plan.SPLIT_KEYS`` patched, or ``split_keys=`` given to
the plan) so that tiny interpreter shapes split: output and every gradient against the
per-sequence float64 oracle of tests/test_varlen.py (NaN-filled outputs and workspaces there),
fp32 / fp16 / bf16, batches with Ng = 0, Np = 0, a single key tile and chunks that come out
empty; the plan's rule itself (chunks cover every key once, in order; no split program visits
more than ``split_keys`` keys plus alignment); all -inf rows through the merge; and the work
model's balance of the bench_varlen.py batch, read from the plan the kernels run.
"""
import os
import random
import sys

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pargo_kernels as pk
from pargo_kernels import varlen_plan
from pargo_kernels.masks import PartialGlobalMask
from test_edge_semantics import _check_minus_inf_rows
from test_varlen import DTYPE_IDS, DTYPES, _attention_case, _pg1d_seq, _pg2d_seq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
SPLIT = 16  # keys per split program on the interpreter shapes (the smallest BLOCK_N)


@pytest.fixture
def splits(monkeypatch):
    """Lower the split threshold; returns the plans built, so a test can check they split."""
    plans = []
    real = varlen_plan._attention_plan

    def spy(*args, **kw):
        plans.append(real(*args, **kw))
        return plans[-1]
    monkeypatch.setattr(varlen_plan, "SPLIT_KEYS", SPLIT)
    monkeypatch.setattr(varlen_plan, "_attention_plan", spy)
    return plans


def _long_pg1d():
    """A sequence whose globals must split: Nv in (2, 4] x SPLIT keys, 1-5 globals."""
    nv = random.randint(2 * SPLIT + 1, 4 * SPLIT)
    np_ = random.randint(0, min(nv, 20))
    return np_ + random.randint(1, 5), nv, np_


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["pg1d", "pg2d"])
def test_split_global_tiles_match_oracle(mode, dtype, device, splits):
    """A random batch whose long sequences split (and short ones, Np = 0, Ng = 0 and a single
    key tile do not): out, dq, dk, dv against the float64 oracle."""
    if mode == "pg1d":
        seqs = [_long_pg1d(), _pg1d_seq("np0"), _pg1d_seq("ng0"), _pg1d_seq(None)]
        seqs.append((random.randint(1, 4), random.randint(1, SPLIT), 0))  # one key tile, Np = 0
    else:  # 2-D: (Nq, Nv, Np, visual grid, partial grid); 7x7 .. 11x13 grids split
        hv, wv = random.choice((7, 11)), random.choice((7, 13))
        hp, wp = random.randint(1, hv), random.randint(1, wv)
        seqs = [(hp * wp + random.randint(1, 4), hv * wv, hp * wp, (hv, wv), (hp, wp)),
                _pg2d_seq("1x1"), _pg2d_seq("ng0"), _pg2d_seq(None)]
    random.shuffle(seqs)
    _attention_case(seqs, mode, dtype, device, strided=dtype != torch.float32)
    assert splits and all(p.n_split > 1 for p in splits), "the batch did not split"


@pytest.mark.triton
def test_split_single_sequence_and_no_partial_rows(device, splits):
    """One sequence, Np = 0 (every query global, so every query tile splits), fp16."""
    nv = random.randint(3 * SPLIT, 5 * SPLIT)
    _attention_case([(random.randint(1, 9), nv, 0)], "pg1d", torch.float16, device,
                    strided=False)
    assert splits[-1].n_split == -(-nv // SPLIT)


@pytest.mark.parametrize("nv,split_keys", [([37, 5, 300, 64, 129, 1], 64), ([1], 1),
                                           ([2304, 576, 256, 513], 512), ([40, 40], 64)])
def test_plan_split_rule(nv, split_keys):
    """The plan's rule on the host: the key chunks of a split sequence cover ``[0, Nv)`` once,
    in slot order, each at most ``split_keys`` keys plus alignment; one split count for the
    batch; only sequences with globals and more than ``split_keys`` keys split; the
    cumulative program counts hold the split programs, and the workspace rows add up."""
    n_seq = len(nv)
    n_part = [random.randint(0, n) for n in nv]
    nq = [p + random.randint(0 if i % 2 and p else 1, 4) for i, p in enumerate(n_part)]  # Ng=0 too
    cu_q, cu_k = [0], [0]
    for a, b in zip(nq, nv):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    plan = varlen_plan.plan_partial_global(cu_q, cu_k, n_part, split_keys=split_keys)
    rows = plan.meta_host.tolist()
    want_split = [a > p and b > split_keys for a, b, p in zip(nq, nv, n_part)]
    assert (plan.n_split > 1) == any(want_split)
    if any(want_split):
        assert plan.n_split == -(-max(b for b, w in zip(nv, want_split) if w) // split_keys)
    g_rows = 0
    for i in range(n_seq):
        r = rows[i]
        nsplit, chunk = r[varlen_plan.A_NSPLIT], r[varlen_plan.A_CHUNK]
        assert nsplit == (plan.n_split if want_split[i] else 1)
        assert r[varlen_plan.A_GSTART] == g_rows
        if want_split[i]:
            ranges = [(s * chunk, min((s + 1) * chunk, nv[i])) for s in range(nsplit)]
            covered = [j for a, b in ranges for j in range(a, b)]
            assert covered == list(range(nv[i]))  # every key once, in slot order
            assert chunk <= split_keys + varlen_plan.SPLIT_ALIGN
            g_rows += nq[i] - n_part[i]
        for j, block in enumerate(varlen_plan.TILE_SIZES):
            programs = rows[i + 1][varlen_plan.A_QTILES + j] - r[varlen_plan.A_QTILES + j]
            gtiles = -(-(nq[i] - n_part[i]) // block)
            assert programs == -(-n_part[i] // block) + gtiles * nsplit
            split_programs = rows[i + 1][varlen_plan.A_STILES + j] - r[varlen_plan.A_STILES + j]
            assert split_programs == (gtiles * nsplit if nsplit > 1 else 0)
    assert plan.split_rows == g_rows == rows[-1][varlen_plan.A_GSTART]
    with pytest.raises(ValueError, match="split_keys"):
        varlen_plan.plan_partial_global(cu_q, cu_k, n_part, split_keys=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grids", [None, ((5, 8), (2, 3))], ids=["pg1d", "pg2d"])
def test_varlen_split_row_with_all_scores_minus_inf_is_zero_as_sdpa(grids, dtype, device):
    """A packed batch of two sequences (the fixed-shape edge test's B = 2) whose global tiles
    split: a row with every score -inf gives output 0, dq 0 and LSE -inf through the merge."""
    np_ = 6
    mask = PartialGlobalMask(9, 40, np_, *(grids or (None, None)))

    def call(q, k, v, backend):  # [2, H, N, D] <-> packed [2N, H, D]
        b, h = q.shape[:2]
        packed = [t.transpose(1, 2).reshape(-1, h, t.shape[-1]) for t in (q, k, v)]
        kw = dict(visual_grids=[grids[0]] * 2, partial_grids=[grids[1]] * 2) if grids else {}
        plan = varlen_plan.plan_partial_global([0, 9, 18], [0, 40, 80], np_, split_keys=SPLIT,
                                               device=q.device, **kw)
        assert plan.n_split == 3
        out = pk.partial_global_attention_varlen(*packed, backend=backend, plan=plan)
        return out.reshape(b, -1, h, out.shape[-1]).transpose(1, 2)
    _check_minus_inf_rows((mask, call), "triton", dtype, device)


def test_model_balance_of_the_dynres_batch():
    """The work model of bench_varlen.py's batch (bf16, H=8, D=64) read from the plan the
    kernels run: every kernel launch's longest program within 4x the mean (issue 13's target);
    without splits (the plan before them) the forward was 8.3x."""
    import work_model as wm  # benchmarks/, on sys.path above
    import work_model_varlen as wmv
    key = ("partial_global_varlen", "dynres")
    for split_keys, bound in ((None, 4.0), (wmv.NO_SPLIT, None)):
        vplan = wmv.dynres_cases(split_keys=split_keys)[key][0]
        for which in ("fwd", "bwd"):
            for la in wmv.varlen_launches(vplan, which, 8, 64, 64, torch.bfloat16):
                if "seqs" not in la:
                    continue
                iters = [wm.entry_iters(la["launch"], e) for *_, t in la["seqs"] for e in t]
                ratio = max(iters) / (sum(iters) / len(iters))
                if bound:
                    assert ratio <= bound, (la["launch"].name, max(iters), ratio)
                elif which == "fwd":
                    assert ratio > 8 and max(iters) == 36


@st.composite
def _split_batches(draw):
    """Key lengths, partial counts and query lengths of a batch, and a split threshold: key
    counts mostly no multiple of the threshold, of the split count or of SPLIT_ALIGN."""
    split_keys = draw(st.sampled_from([1, 16, 24, 32, 64, 100, 768]))
    nv = draw(st.lists(st.integers(1, 12 * split_keys + 40), min_size=1, max_size=6))
    n_part = [draw(st.integers(0, min(n, 50))) for n in nv]
    nq = [p + draw(st.integers(0 if p else 1, 5)) for p in n_part]
    return nv, n_part, nq, split_keys


@settings(max_examples=150, deadline=None, database=None, print_blob=True)
@given(case=_split_batches())
@example(case=([96, 49], [3, 5], [5, 6], 32))  # 49 keys in S = 3 chunks of ceil(49 / 3) -> 32
@example(case=([2304, 1537, 576], [288, 144, 288], [304, 160, 304], 768))  # video + images
def test_plan_split_chunks_cover_every_key_once(case):
    """Over drawn batches: every split sequence's chunks ``[s c, min((s + 1) c, Nv))`` (the
    kernels' ``_query_tile``) cover its keys exactly once in slot order, whatever the
    remainder of ``Nv`` by the split count or the alignment; ``c`` is a multiple of
    SPLIT_ALIGN; the split count is the batch's ``ceil(Nv* / split_keys)``; unsplit
    sequences visit all their keys in one program."""
    nv, n_part, nq, split_keys = case
    plan = varlen_plan.plan_partial_global(_cum(nq), _cum(nv), n_part, split_keys=split_keys)
    long = [b for a, b, p in zip(nq, nv, n_part) if a > p and b > split_keys]
    assert plan.n_split == (-(-max(long) // split_keys) if long else 1)
    for i, row in enumerate(plan.meta_host[:-1].tolist()):
        nsplit, chunk = row[varlen_plan.A_NSPLIT], row[varlen_plan.A_CHUNK]
        if nsplit == 1:
            assert chunk == nv[i] and not (nq[i] > n_part[i] and nv[i] > split_keys)
            continue
        assert nsplit == plan.n_split and chunk % varlen_plan.SPLIT_ALIGN == 0
        seen = np.zeros(nv[i], np.int64)
        for s in range(nsplit):
            seen[s * chunk:min((s + 1) * chunk, nv[i])] += 1
        assert (seen == 1).all(), (i, nv[i], nsplit, chunk)


def _cum(lens):
    return [0, *np.cumsum(lens).tolist()]


@pytest.mark.triton
@pytest.mark.parametrize("mode,dtype", [("pg1d", torch.float32), ("pg2d", torch.bfloat16)],
                         ids=["pg1d-fp32", "pg2d-bf16"])
def test_split_keys_not_a_multiple_of_the_chunk(mode, dtype, device, monkeypatch):
    """The oracle (forward, every gradient) where the split rule's chunks do not divide the key
    counts: split_keys = 32, a 96-key sequence sets S = 3, so a 49-key sequence splits into
    chunks of ceil(49 / 3) -> 32 keys: [0, 32), [32, 49) and an empty third."""
    monkeypatch.setattr(varlen_plan, "SPLIT_KEYS", 32)
    if mode == "pg1d":
        seqs = [(random.randint(4, 9), 96, 3), (random.randint(6, 10), 49, 5)]
    else:  # 8x12 -> 3x4 and 7x7 -> 3x2 with 1-3 globals each
        seqs = [(12 + random.randint(1, 3), 96, 12, (8, 12), (3, 4)),
                (6 + random.randint(1, 3), 49, 6, (7, 7), (3, 2))]
    plans = []
    real = varlen_plan._attention_plan
    monkeypatch.setattr(varlen_plan, "_attention_plan",
                        lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    _attention_case(seqs, mode, dtype, device, strided=dtype != torch.float32)
    rows = plans[-1].meta_host.tolist()
    assert plans[-1].n_split == 3 and rows[1][varlen_plan.A_CHUNK] == 32
