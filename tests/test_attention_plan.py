"""Launch plans of the attention kernels (grids, loop bounds) and 64-bit address arithmetic.

* the 1-D grid: B*H > 65,535 heads (the old grid-y limit) is a plain grid, the program -> (head,
  tile) map the kernels use covers every pair once with a head's tiles adjacent, and a grid past
  CUDA's 2^31 - 1 limit is a clear error (all checked on the grid computation, no launch);
* the dK/dV inverse windows are exact (brute force) and stay exact where ``n_partial * Nv`` is
  near 2^31 (the old in-kernel ``(n_last + 1) * P0 + Nv - 1`` overflowed int32 there);
* row and key offsets ``rows * stride`` past 2^31 elements (a packed ``[B, N, 3, H, D]`` view of
  a long sequence): the kernels run on views of one sparse 8 GiB virtual buffer whose token
  stride is 2^30 + 64 elements; an int32 offset would wrap and read other rows.
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask
from pargo_kernels.ops import attention_plan as plan
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import assert_close, run_with_grads


def _problem(mask, B=1, H=1, D=64, dtype=torch.bfloat16):
    return plan.Problem(B, H, mask.n_query, mask.n_key, D, D, dtype, mask.kind, mask.params)


def test_grid_beyond_old_axis_limit_is_one_dimensional():
    p = _problem(PartialGlobalMask(304, 576, 288), B=65_537, H=1)
    for launch in plan.forward_plan(p) + plan.backward_plan(p):
        (grid,) = launch.grid
        assert grid == 65_537 * launch.tiles
        coords = [plan.program_coords(pid, launch.tiles) for pid in range(grid)]
        assert coords == list(launch.programs())  # launch order: a head's tiles adjacent
        assert len(set(coords)) == grid and coords[-1] == (65_536, launch.tiles - 1)


def test_grid_past_cuda_limit_is_a_clear_error():
    p = _problem(PartialGlobalMask(304, 576, 288), B=2**29, H=1)
    with pytest.raises(ValueError, match=r"grid limit 2147483647.*split the batch"):
        plan.forward_plan(p)[0].grid


def _brute_force_rows(mask, n0, n1):
    dense = mask.materialize()
    seg = mask.n_query if isinstance(mask, BandMask) else mask.n_partial
    hit = dense[:seg, n0:n1].any(1).nonzero().flatten()
    return (int(hit.min()), int(hit.max()) + 1) if len(hit) else None


@pytest.mark.parametrize("mask", [PartialGlobalMask(20, 37, 13), PartialGlobalMask(304, 576, 288),
                                  PartialGlobalMask(9, 35, 6, (5, 7), (3, 2)),
                                  BandMask(77, 3, 7), BandMask(40, 0, 0),
                                  ParGoSelfMask(70, 37, 3, 7), ParGoSelfMask(64, 40),
                                  ParGoSelfMask(50, 50, 4, 2), ParGoSelfMask(33, 0)],
                         ids=["pg1d", "paper", "pg2d", "band", "band-self", "pgself-straddle",
                              "pgself-none", "pgself-npN", "pgself-np0"])
def test_key_tile_rows_are_exact(mask):
    p = _problem(mask)
    table = plan.key_entries(p, 16, 16)
    dense = mask.materialize()
    for n0, q_lo, q_hi, g_lo, g_hi, _ in table:
        n1 = min(n0 + 16, mask.n_key)
        want = _brute_force_rows(mask, n0, n1)
        if isinstance(mask, PartialGlobalMask) and mask.visual_grid:  # contains the rows
            assert want is None or (q_lo <= want[0] and want[1] <= q_hi)
        elif want is None:  # ParGo self: a key tile of global keys only
            assert q_lo == q_hi
        else:
            assert (q_lo, q_hi) == want
        if isinstance(mask, BandMask):
            assert g_lo == g_hi == 0
        elif isinstance(mask, ParGoSelfMask):  # the global rows, iff they see a key of the tile
            seen = bool(dense[mask.n_partial:, n0:n1].any())
            assert (g_lo, g_hi) == (mask.n_partial, mask.n_query if seen else mask.n_partial)
        else:
            assert (g_lo, g_hi) == (mask.n_partial, mask.n_query)


@pytest.mark.parametrize("split", [64, 1])
def test_pargo_self_global_tiles_see_only_global_keys(split):
    """Global query tiles of ParGo self-attention visit the keys [Np, N) only, split or not, and
    their key splits cover [Np, N) exactly once; partial tiles stay inside [0, Np)."""
    mask = ParGoSelfMask(300, 41, 2, 1)
    table = plan.query_entries(_problem(mask), 16, 16, split)
    glob = table[table[:, 4] == 1]
    for m0 in set(glob[:, 0].tolist()):
        ranges = sorted((int(a), int(b)) for a, b in glob[glob[:, 0] == m0][:, 2:4])
        assert ranges[0][0] == 41 and ranges[-1][1] == 300
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert (len(ranges) > 1) == (split == 1)
    part = table[table[:, 4] == 0]
    assert part[:, 2].min() >= 0 and part[:, 3].max() <= 41


def test_key_tile_rows_near_int32_limit():
    """n_partial * Nv = 2,147,441,940 (just under 2^31): the last key tiles' partial rows, exact in
    Python integers, against the plan (numpy int64)."""
    np_, nv = 46_341, 46_340
    assert np_ * nv < 2**31 <= (nv + 1) * np_ + nv
    p = plan.Problem(1, 1, np_ + 1, nv, 64, 64, torch.float16, 0, (np_, 0, 0, 0, 0))
    table = plan.key_entries(p, 64, 64)
    for n0, q_lo, q_hi, *_ in table[-3:]:
        n0, n_last = int(n0), min(int(n0) + 64, nv) - 1
        rows = [i for i in range(np_ - 200, np_) if i * nv // np_ <= n_last and
                (i + 1) * nv // np_ > n0]
        assert (int(q_lo), int(q_hi)) == (rows[0], rows[-1] + 1)


@pytest.mark.triton
@pytest.mark.parametrize("mask", [PartialGlobalMask(3, 3, 2), BandMask(3, 0, 1)],
                         ids=["pg1d", "band"])
def test_offsets_past_int32(mask, device, sparse_buffer):
    """q, k, v, dout: views of a packed [1, N, 4, 1, D] layout with token stride 2^30 + 64
    elements, placed 2^31 elements into the buffer so that a wrapped int32 offset still lands
    inside it (wrong data, not a crash). 8 GiB of address space: virtual on CPU (a few pages
    used), real on a GPU."""
    n, D, dtype = mask.n_query, 16, torch.float16
    stride = 2**30 + 64  # an int32 stride; row 2's offset 2^31 + 128 is not an int32
    base = 2**31
    buf = sparse_buffer(base + (n - 1) * stride + 4 * D, dtype)  # rows touched only
    views = [torch.as_strided(buf, (1, 1, n, D), (0, 0, stride, 1), base + i * D)
             for i in range(4)]
    data = [torch.randn(1, 1, n, D, device=device).to(dtype) for _ in range(4)]
    for view, x in zip(views, data):
        view.copy_(x)
    q, k, v, grad = views
    scale = D ** -0.5

    if isinstance(mask, BandMask):
        def op(q_, k_, v_):
            return pk.band_attention(q_, k_, v_, (mask.left, mask.right), backend="triton")
    else:
        def op(q_, k_, v_):
            return pk.partial_global_attention(q_, k_, v_, mask.n_partial, backend="triton")

    # run_with_grads detaches the views (same storage and strides) as the leaves
    out, grads = run_with_grads(op, (q, k, v), grad)
    dense = mask.materialize(device)
    ref, ref_grads = run_with_grads(lambda a, b, c: masked_attention(a, b, c, dense, scale),
                                    data[:3], data[3], torch.float64)
    assert_close("out", out, ref, dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, dtype)


@pytest.mark.parametrize("capability, dtype, refused", [
    ((7, 5), torch.bfloat16, "bfloat16 attention on sm_75: bfloat16 needs sm_80+"),
    ((7, 5), torch.float16, "float16 attention on sm_75: Triton has no tensor-core path"),
    ((7, 5), torch.float32, None),
    ((7, 0), torch.float32, "checked for sm_75 and newer; this GPU is sm_70"),
    ((8, 6), torch.bfloat16, None), ((8, 9), torch.float16, None), ((9, 0), torch.bfloat16, None),
    ((7, 5), torch.float32, "head dim 200 on sm_75"),
])
def test_triton_backend_refuses_by_capability(capability, dtype, refused):
    """The capability's refusals come on top of the device's own (a CPU tensor without the
    interpreter: Triton cannot run it at all), which this test does not judge."""
    from pargo_kernels import _backend
    from pargo_kernels.attention import _triton_reasons
    q = torch.randn(1, 1, 4, 200 if refused and "head dim" in refused else 128).to(dtype)
    why = _triton_reasons(q, q, q, capability=capability)
    device_why = _backend.triton_device_reasons([q])
    assert why[:len(device_why)] == device_why
    if refused is None:
        assert why == device_why
    else:
        assert any(refused in w for w in why[len(device_why):]), why


def test_tile_table_follows_the_architecture():
    """The launcher picks tiles by compute capability (tables found by the 5-arch AOT check)."""
    for arch, warps in ((80, 4), (86, 4), (90, 8)):
        p = plan.Problem(1, 1, 20, 40, 128, 128, torch.float32, 0, (16, 0, 0, 0, 0), arch)
        (dkdv,) = [la for la in plan.backward_plan(p) if la.name == "dkdv"]
        assert dkdv.cfg["num_warps"] == warps
    assert plan.tile_config("fwd", 256, torch.float32, 86)["BLOCK_N"] == 16
    assert plan.tile_config("fwd", 256, torch.float32, 90)["BLOCK_N"] == 32


def test_launchers_choose_only_aot_configs(monkeypatch):
    """What the fixed-shape attention launchers launch on a GPU of each architecture (every
    mask kind, dtype and head-dim bucket the dispatcher serves there, with and without key
    splits of global tiles, so the 16-bit delta-only dQ launch too) is a configuration
    ``attention_triton.aot_specs(arch)`` lists, and every listed one is launched: the AOT run
    (0 spills) compiles exactly what runs. Launches are recorded, nothing executes."""
    import dataclasses
    import inspect

    from pargo_kernels import aot
    from pargo_kernels.ops import attention_triton as at

    def key(kernel, ty, constexprs, options):
        return kernel.fn.__name__, ty, frozenset(constexprs.items()), frozenset(options.items())

    launched = []

    def record(kernel, launch, *args, **kwargs):
        names = {p.name for p in inspect.signature(kernel.fn).parameters.values()
                 if "constexpr" in str(p.annotation)}
        cx = {k: v for k, v in {**launch.cfg, **kwargs}.items() if k in names}
        launched.append(key(kernel, at._TL_DTYPE[args[0].dtype], cx,
                            {k: launch.cfg[k] for k in ("num_warps", "num_stages")}))

    original_problem, original_precision = at.problem, at._precision
    monkeypatch.setattr(at, "_launch", record)
    monkeypatch.setattr(at, "_precision", lambda dtype, interpret=False: original_precision(dtype))
    # a global tile spans several key tiles, a partial one ~1: split_min_iters=1 splits them
    masks = [PartialGlobalMask(310, 300, 300), PartialGlobalMask(310, 300, 300, (20, 15), (20, 15)),
             BandMask(40, 3, 2), ParGoSelfMask(300, 30, 4, 1)]
    for arch in aot.ARCHS:
        monkeypatch.setattr(at, "problem", lambda *a, arch=arch: dataclasses.replace(
            original_problem(*a), arch=arch))
        specs = {key(k, ptrs["Q"], cx, opts) for k, ptrs, cx, opts, _ in at.aot_specs(arch)}
        seen = set()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for d in (16, 32, 64, 128, 256):
                if plan.arch_refusal(divmod(arch, 10), dtype, d):
                    continue
                for mask in masks:
                    q = torch.randn(1, 2, mask.n_query, d).to(dtype)
                    k, v = (torch.randn(1, 2, mask.n_key, d).to(dtype) for _ in range(2))
                    for split in (None, 1):  # default threshold (no split here) / split all
                        launched.clear()
                        out, lse = at.attention_forward(q, k, v, mask.kind, mask.params, 0.5,
                                                        split_min_iters=split)
                        at.attention_backward(torch.randn_like(out), q, k, v, out, lse,
                                              mask.kind, mask.params, 0.5, split_min_iters=split)
                        missing = set(launched) - specs
                        assert not missing, f"sm_{arch} {dtype} d={d}: not in aot_specs: {missing}"
                        seen |= set(launched)
        assert seen == specs, f"sm_{arch}: aot_specs lists configs no launch uses: {specs - seen}"


# --------------------------------------------------------------------------------------------
# plan coverage: every allowed (row, key) pair visited exactly once, on drawn shapes
# --------------------------------------------------------------------------------------------
@st.composite
def _planned_masks(draw):
    """A mask of every kind on a drawn shape (2-D: uneven ratios, several partial tiles; key
    counts that are no multiple of the tile or split size), a tile table's dtype, head dim and
    arch, and a key-split threshold low enough that global tiles split."""
    kind = draw(st.sampled_from(["pg1d", "pg2d", "band", "pgself"]))
    if kind == "pg2d":
        hv, wv = draw(st.integers(1, 30)), draw(st.integers(1, 30))
        hp, wp = draw(st.integers(1, 30)), draw(st.integers(1, 30))  # finer than hv, wv too
        if hp * wp > hv * wv:
            hp, wp = min(hp, hv), min(wp, wv)
        mask = PartialGlobalMask(hp * wp + draw(st.integers(0, 40)), hv * wv, hp * wp,
                                 (hv, wv), (hp, wp))
    elif kind == "pg1d":
        nv = draw(st.integers(1, 700))
        np_ = draw(st.integers(0, min(nv, 300)))
        mask = PartialGlobalMask(np_ + draw(st.integers(0 if np_ else 1, 70)), nv, np_)
    elif kind == "band":
        n = draw(st.integers(1, 400))
        mask = BandMask(n, draw(st.integers(0, n + 3)), draw(st.integers(0, n + 3)))
    else:
        n = draw(st.integers(1, 500))
        np_ = draw(st.integers(0, n))
        window = draw(st.none() | st.tuples(st.integers(0, np_ + 3), st.integers(0, np_ + 3)))
        mask = ParGoSelfMask(n, np_, *(window or (None, None)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    d = draw(st.sampled_from([16, 64, 128, 256]))
    arch = draw(st.sampled_from([80, 86, 90]))
    p = plan.Problem(1, 1, mask.n_query, mask.n_key, d, d, dtype, mask.kind, mask.params, arch)
    return p, mask, draw(st.integers(1, 6))


def _query_coverage(p, mask, launch):
    """Keys each row's programs count, as the forward / dQ kernels count them: a program loops
    over key tiles ``range(n_lo, n_hi, BLOCK_N)`` and counts key ``c`` of a tile wherever the
    row's mask allows it (keys at or past ``n_hi`` read zeros but are not masked out, so none
    may be allowed there). Returns ``[Nq, Nv]`` counts."""
    dense = mask.materialize().numpy()
    counts = np.zeros(dense.shape, np.int64)
    bm, bn = launch.cfg["BLOCK_M"], launch.cfg["BLOCK_N"]
    slots = {}
    for m0, row_end, n_lo, n_hi, is_global, slot in launch.table.tolist():
        rows = np.arange(m0, min(m0 + bm, row_end))
        assert (rows < p.n_seg).all() != bool(is_global) or not len(rows)
        slots.setdefault(m0, []).append(slot)
        assert 0 <= n_lo and n_hi <= p.Nv, (launch.name, m0, n_lo, n_hi, "keys out of range")
        if n_hi <= n_lo:
            continue
        end = min(n_lo + -(-(n_hi - n_lo) // bn) * bn, p.Nv)  # the loop's last tile, clipped
        seen = dense[rows, n_lo:end]
        assert not seen[:, n_hi - n_lo:].any(), (launch.name, m0, n_lo, n_hi, "past n_hi")
        counts[rows, n_lo:end] += seen
    for m0, s in slots.items():  # one program per tile, or key splits with distinct slots
        assert s == [-1] or sorted(s) == list(range(len(s))), (launch.name, m0, s)
    return counts


@settings(max_examples=60, deadline=None, database=None, print_blob=True)
@given(case=_planned_masks())
@example(case=(_problem(PartialGlobalMask(304, 576, 288, (24, 24), (18, 16))),
               PartialGlobalMask(304, 576, 288, (24, 24), (18, 16)), 1))
@example(case=(_problem(ParGoSelfMask(250, 41, 2, 1), dtype=torch.float32),
               ParGoSelfMask(250, 41, 2, 1), 1))
def test_plans_visit_every_allowed_pair_once(case):
    """The launch plans of every mask kind, drawn shapes, the tile tables of fp32 / 16-bit and
    several archs, with global tiles split over their keys (key counts no multiple of the
    split's chunk): each query row's programs count every key its mask allows exactly once and
    none it does not (forward, dQ, the 16-bit delta-only launch); each key tile's dK/dV program
    visits every row that sees one of its keys, first-segment rows in the first loop and
    global rows in the second (each loop computes its rows' windows as that kind)."""
    p, mask, split = case
    dense = mask.materialize().numpy()
    for launch in plan.forward_plan(p, split) + plan.backward_plan(p, split):
        if launch.name in ("fwd", "dq", "dq_delta"):
            counts = _query_coverage(p, mask, launch)
            if launch.name == "dq_delta":  # the split global tiles only
                split_rows = np.unique(np.concatenate([np.arange(m0, min(m0 + launch.cfg[
                    "BLOCK_M"], p.Nq)) for m0 in launch.table[:, 0].tolist()]))
                assert (counts[split_rows] == dense[split_rows]).all()
            else:
                assert (counts == dense).all(), launch.name
        elif launch.name == "dkdv":
            bn = launch.cfg["BLOCK_N"]
            for n0, q_lo, q_hi, g_lo, g_hi, _ in launch.table.tolist():
                assert 0 <= q_lo <= q_hi <= p.n_seg, (n0, q_lo, q_hi)
                assert g_lo == g_hi or p.n_seg <= g_lo <= g_hi <= p.Nq, (n0, g_lo, g_hi)
                visited = np.zeros(p.Nq, bool)
                visited[q_lo:q_hi] = True
                visited[g_lo:g_hi] = True
                need = dense[:, n0:n0 + bn].any(1)
                assert visited[need].all(), (n0, q_lo, q_hi, g_lo, g_hi)
