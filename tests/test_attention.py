"""Partial-global and banded attention against the float64 oracle, forward and all gradients.

The "triton" backend runs the real kernels (under the Triton interpreter on a CPU-only machine,
on the GPU otherwise); the "reference" backend is the dense-mask eager path. Every case draws
fresh random inputs; outputs are allocated NaN-filled so an unwritten element fails.
"""
import dataclasses

import pytest
import torch

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask
from pargo_kernels.ops import attention_triton
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import (assert_close, attention_grad_roundoff, randn, rel_error,
                                   run_with_grads)

# "reference-dispatch" runs the oracle's own code (in the inputs' dtype, through the public
# function): it checks dispatch and dtype handling, not the masks, which have their own
# definition tests in tests/test_masks_and_errors.py.
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("reference", id="reference-dispatch")]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(attention_triton, "_empty", nan_empty)


def _check(op, mask, B, H, D, Dv, dtype, device, backend, layout="bhnd", scale=None):
    """Run ``op`` on fresh inputs and compare output and dq, dk, dv with the fp64 oracle."""
    q = randn((B, H, mask.n_query, D), dtype, device, layout)
    k = randn((B, H, mask.n_key, D), dtype, device, layout)
    v = randn((B, H, mask.n_key, Dv), dtype, device, layout)
    grad = torch.randn(B, H, mask.n_query, Dv, device=device).to(dtype)
    out, grads = run_with_grads(lambda a, b, c: op(a, b, c, backend), (q, k, v), grad)
    ref_scale = D ** -0.5 if scale is None else scale
    dense = mask.materialize(device)
    ref, ref_grads = run_with_grads(lambda a, b, c: masked_attention(a, b, c, dense, ref_scale),
                                    (q, k, v), grad, torch.float64)
    assert out.dtype == dtype and out.shape == (B, H, mask.n_query, Dv)
    assert_close("out", out, ref, dtype)
    # dq and dk cancel where a row sees one key (window (0, 0): the exact dq is 0) or keys of
    # equal score: allowed their calibrated fp32 round-off there, as the fuzz does (one CI draw
    # of self-only-0-0 had |dq| = 3.4e-6 against exact 0, above REL_TOL * SCALE_FLOOR = 2e-6).
    roundoff = attention_grad_roundoff(*(x.detach().double() for x in (q, k, v, grad)), dense,
                                       ref_scale)
    for name, g, r, bound in zip(("dq", "dk", "dv"), grads, ref_grads, roundoff):
        assert g.dtype == dtype
        assert_close(name, g, r, dtype, roundoff=bound)


PG_CASES = {
    # id: (Nq, Nv, n_partial, visual_grid, partial_grid)
    "paper-288+16x576": (304, 576, 288, None, None),
    "np-not-dividing-nv": (20, 37, 13, None, None),
    "multi-tile-150+70x333": (220, 333, 150, None, None),
    "np0-plain-cross": (9, 37, 0, None, None),
    "ng0-block-diagonal": (13, 37, 13, None, None),
    "np-equals-nv": (21, 19, 19, None, None),
    "2d-divisible-6x6-3x3": (13, 36, 9, (6, 6), (3, 3)),
    "2d-uneven-5x7-3x2": (9, 35, 6, (5, 7), (3, 2)),
    "2d-24x24-12x12": (150, 576, 144, (24, 24), (12, 12)),
    "2d-overlap-4x4-3x5": (17, 16, 15, (4, 4), (3, 5)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PG_CASES))
def test_partial_global_matches_oracle(case, backend, device):
    nq, nv, np_, vgrid, pgrid = PG_CASES[case]
    mask = PartialGlobalMask(nq, nv, np_, vgrid, pgrid)
    B, H = (1, 2) if nq * nv > 50_000 else (2, 3)

    def op(q, k, v, be):
        return pk.partial_global_attention(q, k, v, np_, visual_grid=vgrid, partial_grid=pgrid,
                                           backend=be)
    _check(op, mask, B, H, 64 if case.startswith("paper") else 32, 32, torch.float32, device,
           backend)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["paper", "d80-noncontig", "dv-differs", "2d-noncontig"])
def test_partial_global_dtypes_and_layouts(variant, dtype, device):
    if variant == "paper":
        mask, D, Dv, layout = PartialGlobalMask(304, 576, 288), 64, 64, "bhnd"
    elif variant == "d80-noncontig":
        mask, D, Dv, layout = PartialGlobalMask(40, 97, 31), 80, 80, "bnhd"
    elif variant == "dv-differs":
        mask, D, Dv, layout = PartialGlobalMask(24, 50, 20), 16, 96, "bhnd"
    else:
        mask, D, Dv, layout = PartialGlobalMask(16, 35, 12, (5, 7), (4, 3)), 48, 48, "bnhd"

    def op(q, k, v, be):
        return pk.partial_global_attention(q, k, v, mask.n_partial, visual_grid=mask.visual_grid,
                                           partial_grid=mask.partial_grid, backend=be)
    _check(op, mask, 1, 2, D, Dv, dtype, device, "triton", layout)


# 2-D windows over several partial-query tiles with an uneven visual/partial ratio (adaptive
# windows that overlap): the key range of each query tile and the query rows of each key tile
# (attention_plan.query_entries / key_entries) must hold every row's window. Tiles
# (attention_plan.tile_config, the same under the interpreter and on sm_80..sm_90 for these):
# head dim 16, 16-bit forward and dQ 64 query rows, dK/dV 32 rows x 64 keys; fp32 32 rows.
PG2D_MULTI_TILE = {
    # id: (Nq, Nv, n_partial, visual_grid, partial_grid)
    "paper-24x24-18x16": (304, 576, 288, (24, 24), (18, 16)),  # the paper's 2-D ParGo
    "tile-ends-mid-row-13x14-9x10": (93, 182, 90, (13, 14), (9, 10)),
}


@pytest.mark.triton
@pytest.mark.parametrize("case,dtype", [
    ("paper-24x24-18x16", torch.float16), ("paper-24x24-18x16", torch.bfloat16),
    ("tile-ends-mid-row-13x14-9x10", torch.float16),
    ("tile-ends-mid-row-13x14-9x10", torch.bfloat16),
    ("tile-ends-mid-row-13x14-9x10", torch.float32)], ids=lambda x: str(x).replace("torch.", ""))
def test_2d_windows_over_several_query_tiles(case, dtype, device):
    """Forward and every gradient against the float64 oracle, at shapes whose partial rows fill
    more than one query tile of every pass, with grid rows that span tile boundaries (paper:
    4.5 forward tiles of 4 grid rows; 13x14 -> 9x10: tiles end inside a grid row)."""
    nq, nv, np_, vgrid, pgrid = PG2D_MULTI_TILE[case]
    mask = PartialGlobalMask(nq, nv, np_, vgrid, pgrid)
    from pargo_kernels.ops import attention_plan as plan
    q = torch.empty(1, 1, nq, 16, dtype=dtype, device=device)
    p = attention_triton.problem(q, q.new_empty(1, 1, nv, 16), q.new_empty(1, 1, nv, 16),
                                 mask.kind, mask.params)
    for launch in plan.forward_plan(p) + plan.backward_plan(p):
        if launch.name in ("fwd", "dq"):  # more than one partial tile
            assert (launch.table[:, 4] == 0).sum() >= 2, (launch.name, launch.cfg)
    if case.startswith("tile-ends"):
        assert any(m0 % pgrid[1] for m0 in range(0, np_, plan.tile_config(
            "fwd", 16, dtype, p.arch)["BLOCK_M"]))

    def op(q, k, v, be):
        return pk.partial_global_attention(q, k, v, np_, visual_grid=vgrid, partial_grid=pgrid,
                                           backend=be)
    _check(op, mask, 1, 1, 16, 16, dtype, device, "triton")


BAND_CASES = {
    # id: (N, window)
    "self-only-0-0": (50, (0, 0)),
    "causal-full": (50, (49, 0)),
    "asymmetric-3-7": (77, (3, 7)),
    "wider-than-n": (45, (60, 1000)),
    "multi-tile-right-only": (150, (0, 40)),
    "cascade-l1-288": (288, (47, 0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAND_CASES))
def test_band_matches_oracle(case, backend, device):
    n, window = BAND_CASES[case]
    mask = BandMask(n, *window)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, window, backend=be), mask, 2, 2, 32, 32,
           torch.float32, device, backend)


def lower_split_threshold(monkeypatch) -> list:
    """Make the launch plans split global tiles over their keys at any length
    (``split_min_iters=1``); returns the list the names of the planned launches go to, so that
    a test can check that its shapes did split (a ``fwd_merge`` / ``dq_reduce`` launch)."""
    from pargo_kernels.ops import attention_plan as plan
    names = []
    for fn in ("forward_plan", "backward_plan"):
        real = getattr(plan, fn)

        def lowered(p, _real=real, **kw):
            launches = _real(p, split_min_iters=1)
            names.extend(la.name for la in launches)
            return launches
        monkeypatch.setattr(plan, fn, lowered)
    return names


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["1d", "2d", "pgself"])
def test_global_rows_split_over_keys(variant, dtype, device, monkeypatch):
    """Global tiles split over their keys (flash-decoding style, merged with the log-sum-exp;
    dQ partials reduced), forward and every gradient: the split threshold is lowered so that
    these small shapes split, and the plan is checked to have split. ParGo self-attention's
    global rows split their keys [Np, N) only (Np = 41: the splits start mid-tile)."""
    splits = lower_split_threshold(monkeypatch)
    if variant == "pgself":
        mask = ParGoSelfMask(250, 41, 2, 1)

        def op(q, k, v, be):
            return pk.pargo_self_attention(q, k, v, 41, (2, 1), backend=be)
    else:
        if variant == "1d":
            mask = PartialGlobalMask(150, 140, 140)
        else:
            mask = PartialGlobalMask(259, 512, 256, (8, 64), (8, 32))

        def op(q, k, v, be):
            return pk.partial_global_attention(q, k, v, mask.n_partial,
                                               visual_grid=mask.visual_grid,
                                               partial_grid=mask.partial_grid, backend=be)
    _check(op, mask, 1, 2, 32, 32, dtype, device, "triton")
    assert "fwd_merge" in splits and "dq_reduce" in splits
    assert ("dq_delta" in splits) == (dtype != torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["d80-noncontig", "symmetric-cascade"])
def test_band_dtypes_and_layouts(variant, dtype, device):
    if variant == "d80-noncontig":
        n, window, D, layout = 70, (5, 2), 80, "bnhd"
    else:
        n, window, D, layout = 96, pk.cascade_windows(96, 6, "symmetric")[2], 64, "bhnd"
    mask = BandMask(n, *window)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, window, backend=be), mask, 1, 2, D, D,
           dtype, device, "triton", layout)


@pytest.mark.triton
def test_custom_scale(device):
    mask = PartialGlobalMask(12, 30, 10)
    _check(lambda q, k, v, be: pk.partial_global_attention(q, k, v, 10, scale=0.3, backend=be),
           mask, 1, 2, 32, 32, torch.float32, device, "triton", scale=0.3)


@pytest.mark.triton
def test_tolerance_discriminates_a_wrong_window(device):
    """The comparison can fail: the kernel's output checked against the oracle of a mask shifted
    by one partial query must exceed the tolerance by far."""
    q, k, v = (randn((1, 2, n, 32), torch.float32, device, requires_grad=False)
               for n in (20, 37, 37))
    out = pk.partial_global_attention(q, k, v, 13, backend="triton")
    right = masked_attention(q.double(), k.double(), v.double(),
                             PartialGlobalMask(20, 37, 13).materialize(device), 32 ** -0.5)
    wrong = masked_attention(q.double(), k.double(), v.double(),
                             PartialGlobalMask(20, 37, 12).materialize(device), 32 ** -0.5)
    assert rel_error(out, right) < 1e-4
    assert rel_error(out, wrong) > 100 * 2e-5


@pytest.mark.triton
def test_unwritten_output_is_caught(device, monkeypatch):
    """If the kernel skipped rows, the NaN poison would surface: simulate it by shrinking the grid."""
    q, k, v = (randn((1, 1, n, 16), torch.float32, device, requires_grad=False)
               for n in (20, 37, 37))
    real = attention_triton.plan.forward_plan

    def one_tile_short(*a, **kw):
        return [dataclasses.replace(la, table=la.table[:-1]) for la in real(*a, **kw)]
    monkeypatch.setattr(attention_triton.plan, "forward_plan", one_tile_short)
    out = pk.partial_global_attention(q, k, v, 13, backend="triton")
    assert torch.isnan(out).any()
    ref = masked_attention(q, k, v, PartialGlobalMask(20, 37, 13).materialize(device), 0.25)
    assert rel_error(out, ref) == float("inf")


@pytest.mark.gpu(reason="B*H > 65,535 programs run serially in the interpreter")
def test_batch_heads_above_grid_limit():
    mask = PartialGlobalMask(6, 8, 4)
    _check(lambda q, k, v, be: pk.partial_global_attention(q, k, v, 4, backend=be), mask,
           65_537, 1, 16, 16, torch.float16, "cuda", "triton")


@pytest.mark.gpu(reason="the paper's full batch")
def test_paper_shape_full_batch_on_gpu():
    mask = PartialGlobalMask(304, 576, 288)
    for dtype in (torch.bfloat16, torch.float16):
        _check(lambda q, k, v, be: pk.partial_global_attention(q, k, v, 288, backend=be), mask,
               256, 8, 64, 64, dtype, "cuda", "triton")


@pytest.mark.triton
@pytest.mark.parametrize("head_dim", [16, 96, 256])
def test_head_dim_range(head_dim, device):
    """Both ends of the supported head dims (16..256) and a non-power of two, both ops."""
    mask = PartialGlobalMask(21, 40, 17)
    _check(lambda q, k, v, be: pk.partial_global_attention(q, k, v, 17, backend=be), mask, 1, 2,
           head_dim, head_dim, torch.float16, device, "triton")
    band = BandMask(40, 6, 3)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, (6, 3), backend=be), band, 1, 2,
           head_dim, head_dim, torch.bfloat16, device, "triton")
