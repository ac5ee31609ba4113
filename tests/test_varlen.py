"""Packed (varlen) ops against a per-sequence float64 oracle: partial-global (1-D, 2-D) and band
attention, pooling and fused pooling + projection; forward and every gradient.

The oracle runs the *fixed-shape* reference on each sequence's slice in float64 (on the very
same rounded inputs), independently of the varlen code. Batches are drawn fresh every run:
1-7 sequences with mixed grids (1x1, primes, Np not dividing Nv, Np = 0, Ng = 0); outputs and
workspaces are NaN-filled before the kernels run, so an unwritten row fails. Also: plans reused
across calls, torch.compile without recompiling across batches, and validation errors.
"""
import inspect
import random

import pytest
import torch

import pargo_kernels as pk
from pargo_kernels import varlen_plan
from pargo_kernels.ops import pool_triton, varlen_pool_triton, varlen_triton
from pargo_kernels.pooling import pool_project_reference, pool_tokens_reference
from pargo_kernels.testing import assert_close
from test_edge_semantics import assert_transforms_refused

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
H, D, DV = 2, 16, 24


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    for mod in (varlen_triton, varlen_pool_triton, pool_triton):
        monkeypatch.setattr(mod, "_empty", nan_empty)


def _offsets(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def _packed(total, heads, dim, dtype, device, strided):
    """Fresh ``[total, heads, dim]``; strided: a ``[heads, total, dim]`` buffer transposed."""
    if strided:
        return torch.randn(heads, total, dim, device=device).to(dtype).transpose(0, 1)
    return torch.randn(total, heads, dim, device=device).to(dtype)


def _grads(fn, inputs, grad, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


def _check(name, actual, expected, dtype, what):
    try:
        assert_close(name, actual, expected, dtype)
    except AssertionError as e:
        raise AssertionError(f"{e}\nbatch: {what}") from None


# --------------------------------------------------------------------------------------------
# random batches
# --------------------------------------------------------------------------------------------
PRIMES = (2, 3, 5, 7, 11, 13)


def _pg1d_seq(special):
    """(Nq, Nv, Np) of one sequence; ``special`` forces a corner case."""
    nv = random.choice((1, 2, 7, 13, 23, 37, 61))
    if special == "np0":
        return random.randint(1, 9), nv, 0
    np_ = random.randint(1, min(nv, 24))
    if special == "ng0":
        return np_, nv, np_
    if special == "nondiv":  # prime Nv, Np not dividing it
        nv = random.choice((13, 23, 37, 61))
        np_ = random.choice([p for p in range(2, min(nv, 24)) if nv % p])
    return np_ + random.randint(0, 5), nv, np_


def _pg2d_seq(special):
    """(Nq, Nv, Np, visual grid, partial grid)."""
    if special == "1x1":
        hv, wv, hp, wp = 1, 1, 1, 1
    else:
        hv, wv = random.choice(PRIMES), random.choice(PRIMES + (4, 6))
        hp, wp = random.randint(1, hv), random.randint(1, wv)
    np_ = hp * wp
    ng = 0 if special == "ng0" else random.randint(0, 4)
    return np_ + ng, hv * wv, np_, (hv, wv), (hp, wp)


def _batch(make, specials, n_min=1):
    n = random.randint(max(n_min, 1), 7)
    kinds = list(specials)[:n] + [None] * max(0, n - len(specials))
    random.shuffle(kinds)
    return [make(kind) for kind in kinds]


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def _attention_case(seqs, mode, dtype, device, strided, window=None, scale=None,
                    per_seq_windows=None, dims=(D, DV)):
    """``window``: the band op's argument; ``per_seq_windows``: the pairs it stands for, one per
    sequence (None: ``window`` is one pair for all); ``dims``: the head dims of q/k and v."""
    nq = [s[0] for s in seqs]
    nv = [s[1] for s in seqs]
    q = _packed(sum(nq), H, dims[0], dtype, device, strided)
    k = _packed(sum(nv), H, dims[0], dtype, device, strided)
    v = _packed(sum(nv), H, dims[1], dtype, device, strided)
    cu_q, cu_k = _offsets(nq), _offsets(nv)
    grad = torch.randn(sum(nq), H, dims[1], device=device)

    if mode == "band":
        def packed(q_, k_, v_):
            return pk.band_attention_varlen(q_, k_, v_, cu_q, window, scale=scale,
                                            backend="triton")
    else:
        grids = {}
        if mode == "pg2d":
            grids = dict(visual_grids=[s[3] for s in seqs], partial_grids=[s[4] for s in seqs])

        def packed(q_, k_, v_):
            return pk.partial_global_attention_varlen(q_, k_, v_, cu_q, cu_k, [s[2] for s in seqs],
                                                      scale=scale, backend="triton", **grids)

    def oracle(q_, k_, v_):  # the fixed-shape reference on every sequence's slices
        outs = []
        for i, s in enumerate(seqs):
            sl = [t[a:b].transpose(0, 1)[None] for t, a, b in (
                (q_, cu_q[i], cu_q[i + 1]), (k_, cu_k[i], cu_k[i + 1]), (v_, cu_k[i], cu_k[i + 1]))]
            if mode == "band":  # the shared window, or sequence i's own
                w = window if per_seq_windows is None else per_seq_windows[i]
                o = pk.band_attention(*sl, w, scale=scale, backend="reference")
            else:
                g = dict(visual_grid=s[3], partial_grid=s[4]) if mode == "pg2d" else {}
                o = pk.partial_global_attention(*sl, s[2], scale=scale, backend="reference", **g)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    out, grads = _grads(packed, (q, k, v), grad)
    ref, ref_grads = _grads(oracle, (q, k, v), grad, torch.float64)
    what = f"{mode} seqs={seqs} window={window} {dtype}"
    assert out.dtype == dtype
    _check("out", out, ref, dtype, what)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _check(name, g, r, dtype, what)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["pg1d", "pg2d"])
def test_partial_global_varlen(mode, dtype, device):
    if mode == "pg1d":
        seqs = _batch(_pg1d_seq, ("np0", "ng0", "nondiv"))
    else:
        seqs = _batch(_pg2d_seq, ("1x1", "ng0"))
    _attention_case(seqs, mode, dtype, device, strided=dtype == torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_band_varlen(dtype, device):
    seqs = [(n, n) for n in _batch(lambda s: 1 if s else random.randint(2, 70), ("one",))]
    window = (random.randint(0, 12), random.randint(0, 5))
    _attention_case(seqs, "band", dtype, device, strided=dtype == torch.bfloat16, window=window,
                    scale=0.3)


@pytest.mark.triton
@pytest.mark.parametrize("mode,dtype,dims", [
    ("pg2d", torch.float32, (16, 24)),   # fp32 forward and dK/dV d=32: 16x32 tiles
    ("pg1d", torch.bfloat16, (64, 64)),  # 16-bit forward 64x32, dQ 32x64, dK/dV 32x32
    ("band", torch.float16, (16, 16)),   # 16-bit forward d=16: 64x32
    ("band", torch.float32, (128, 96)),  # fp32 dQ d=128: 32x16
], ids=["pg2d-fp32-d32", "pg1d-bf16-d64", "band-fp16-d16", "band-fp32-d128"])
def test_sm86_tiles_match_the_oracle(mode, dtype, dims, device, monkeypatch):
    """The launchers with sm_86's own tile table (what an RTX 30xx / A10 runs; the other tests
    run the device's: DEFAULT_ARCH's under the interpreter) against the per-sequence float64
    oracle: the tile shapes are right (under the interpreter warps and stages do not matter;
    the AOT test covers those)."""
    monkeypatch.setattr(varlen_triton, "_arch", lambda t: 86)
    used = []
    config = varlen_triton.varlen_tile_config
    monkeypatch.setattr(varlen_triton, "varlen_tile_config",
                        lambda *a: used.append(a) or config(*a))
    # plus one sequence longer than two of the largest tiles (64): several row and key tiles
    if mode == "pg1d":
        np_ = random.randint(130, 160)
        seqs = _batch(_pg1d_seq, ("np0", "nondiv")) + [
            (np_ + random.randint(1, 5), np_ + random.randint(0, 40), np_)]
    elif mode == "pg2d":
        hp, wp = random.randint(9, 11), random.randint(12, 13)
        seqs = _batch(_pg2d_seq, ("1x1",)) + [
            (hp * wp + random.randint(1, 4), 11 * 13, hp * wp, (11, 13), (hp, wp))]
    else:
        seqs = [(n, n) for n in _batch(lambda s: random.randint(1, 70), ())]
        seqs.append((random.randint(130, 160),) * 2)
    random.shuffle(seqs)
    window = (random.randint(0, 12), random.randint(0, 5)) if mode == "band" else None
    _attention_case(seqs, mode, dtype, device, strided=False, window=window, dims=dims)
    assert len(used) == 3 and {a[-1] for a in used} == {86}, used
    tile = lambda *a: (config(*a)["BLOCK_M"], config(*a)["BLOCK_N"])  # noqa: E731
    assert [a for a in used if tile(*a) != tile(*a[:-1], 90)], used  # not DEFAULT_ARCH's tiles


def _per_seq_window(n):
    """A band for a sequence of ``n`` tokens: (0, 0), wider than the sequence, asymmetric."""
    kind = random.choice(("zero", "wide", "left", "right", "any"))
    return {"zero": (0, 0), "wide": (n + random.randint(0, 10**6), n + random.randint(0, 5)),
            "left": (random.randint(1, n + 2), 0), "right": (0, random.randint(1, n + 2)),
            "any": (random.randint(0, n), random.randint(0, n))}[kind]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_band_varlen_per_sequence_windows(dtype, device):
    """Every sequence its own window (as a list of pairs or an int tensor [n_seq, 2]): each
    equals the fixed-shape band on its slice with its own window. One sequence spans several
    key tiles with a band crossing them, so dK / dV programs invert their own sequence's
    window; every band differs from its predecessor's (a neighbour's window shows)."""
    def seq(special):  # (length, window); "long": past a 64-key tile, a band crossing tiles
        if special == "long":
            return random.randint(70, 100), (random.randint(1, 20), random.randint(1, 20))
        n = 1 if special == "one" else random.randint(2, 60)
        return n, _per_seq_window(n)
    lens, windows = map(list, zip(*_batch(seq, ("one", "long"), n_min=2)))
    for i in range(1, len(lens)):  # as clipped to sequence i, its band differs from i - 1's
        n = lens[i]
        left, right = (min(w, n - 1) for w in windows[i])
        if n > 1 and (left, right) == tuple(min(w, n - 1) for w in windows[i - 1]):
            windows[i] = ((left + 1) % n, right)
    arg = torch.tensor(windows) if dtype == torch.float16 else windows
    _attention_case([(n, n) for n in lens], "band", dtype, device,
                    strided=dtype != torch.float32, window=arg, scale=0.3,
                    per_seq_windows=windows)


@pytest.mark.triton
def test_band_varlen_wide_window_stays_in_sequence(device):
    """A window wider than every sequence is full attention within each, never across."""
    seqs = [(n, n) for n in (random.randint(20, 40), 1, random.randint(20, 40))]
    _attention_case(seqs, "band", torch.float32, device, strided=False, window=(10**9, 10**9))


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["pg1d", "pg2d", "band"])
def test_reference_backend_matches_triton(mode, device):
    """backend="reference" (a loop over the fixed-shape references) equals the kernels."""
    if mode == "band":
        seqs = [(n, n) for n in (random.randint(1, 30), random.randint(1, 30))]
    else:
        seqs = _batch(_pg2d_seq if mode == "pg2d" else _pg1d_seq, ("ng0", "1x1", "np0"), n_min=3)
    nq, nv = [s[0] for s in seqs], [s[1] for s in seqs]
    q, k, v = (torch.randn(n, H, D, device=device) for n in (sum(nq), sum(nv), sum(nv)))
    if mode == "band":
        args, kw, fn = (_offsets(nq), (3, 2)), {}, pk.band_attention_varlen
    else:
        args, fn = (_offsets(nq), _offsets(nv), [s[2] for s in seqs]), \
            pk.partial_global_attention_varlen
        kw = dict(visual_grids=[s[3] for s in seqs], partial_grids=[s[4] for s in seqs]) \
            if mode == "pg2d" else {}
    _check("reference backend", fn(q, k, v, *args, backend="reference", **kw),
           fn(q, k, v, *args, backend="triton", **kw), torch.float32, seqs)


def test_reference_pooling_matches_oracle(device):
    """backend="reference" of the packed pooling (a loop over the fixed-shape reference) equals
    the per-image float64 oracle."""
    images = _pool_batch()
    cu = _offsets([a * b for (a, b), _ in images])
    x = torch.randn(cu[-1], 8, device=device)
    ins, outs = [g for g, _ in images], [g for _, g in images]
    _check("reference pooling", pk.adaptive_avg_pool_tokens_varlen(x, cu, ins, outs,
                                                                  backend="reference")[0],
           _pool_oracle(x, images), torch.float32, images)


@pytest.mark.triton
def test_plan_reuse_matches_and_builds_nothing(device, monkeypatch):
    seqs = _batch(_pg2d_seq, ("1x1",), n_min=2)
    nq, nv = [s[0] for s in seqs], [s[1] for s in seqs]
    q = torch.randn(sum(nq), H, D, device=device)
    k = torch.randn(sum(nv), H, D, device=device)
    v = torch.randn(sum(nv), H, D, device=device)
    args = (_offsets(nq), _offsets(nv), [s[2] for s in seqs])
    grids = dict(visual_grids=[s[3] for s in seqs], partial_grids=[s[4] for s in seqs])
    direct = pk.partial_global_attention_varlen(q, k, v, *args, backend="triton", **grids)
    plan = pk.plan_partial_global(*args, device=device, **grids)
    band_plan = pk.plan_band(args[0], device=device)

    def no_build(*a, **kw):
        raise AssertionError("a plan was rebuilt although one was passed")
    for name in ("plan_partial_global", "plan_band", "plan_pool"):
        monkeypatch.setattr(pk.varlen, name, no_build)
    for _ in range(2):
        out = pk.partial_global_attention_varlen(q, k, v, backend="triton", plan=plan)
        assert torch.equal(out, direct)
    for window in ((0, 0), (3, 1)):  # one band plan serves every window of a cascade
        pk.band_attention_varlen(q, q, q, window=window, backend="triton", plan=band_plan)
    monkeypatch.undo()
    windows = [(random.randint(0, 4), random.randint(0, 4)) for _ in nq]
    direct = pk.band_attention_varlen(q, q, q, args[0], windows, backend="triton")
    windowed = pk.plan_band(args[0], windows=torch.tensor(windows), device=device)
    monkeypatch.setattr(pk.varlen, "plan_band", no_build)
    for backend in ("triton", "reference"):  # the reference loop reads the plan's windows too
        out = pk.band_attention_varlen(q, q, q, backend=backend, plan=windowed)
        _check(f"per-sequence windows from a plan ({backend})", out, direct, torch.float32,
               windows)


@pytest.mark.gpu(reason="host-device syncs exist only on a GPU")
def test_plan_run_does_not_synchronise():
    plan = pk.plan_band([0, 5, 12], device="cuda")
    q = torch.randn(12, H, D, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pk.band_attention_varlen(q, q, q, window=(2, 1), plan=plan)
        pk.band_attention_varlen(q, q, q, [0, 5, 12], (2, 1))  # CPU offsets: no sync either
        windows = torch.tensor([[2, 1], [0, 4]])  # per-sequence windows: CPU data, or a plan
        pk.band_attention_varlen(q, q, q, [0, 5, 12], windows)
        pk.band_attention_varlen(q, q, q, plan=pk.plan_band([0, 5, 12], windows=windows,
                                                            device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------
def _pool_batch():
    """In and out grids of 1-7 images; always one SigLIP-like 27x27 -> 12x12 (overlapping
    windows) and one 1x1 image."""
    def image(special):
        if special == "siglip":
            return (27, 27), (12, 12)
        if special == "1x1":
            return (1, 1), random.choice(((1, 1), (2, 3)))
        return ((random.choice(PRIMES + (4, 8)), random.choice(PRIMES + (6,))),
                (random.randint(1, 6), random.randint(1, 6)))
    return _batch(image, ("siglip", "1x1"), n_min=2)


def _pool_oracle(x, images, project=None):
    outs, start = [], 0
    for gin, gout in images:
        xs = x[start:start + gin[0] * gin[1]][None]
        start += gin[0] * gin[1]
        outs.append((pool_tokens_reference(xs, gin, gout) if project is None else
                     pool_project_reference(xs, *project, gin, gout))[0])
    return torch.cat(outs)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_tokens_varlen(dtype, device):
    images = _pool_batch()
    cu = _offsets([a * b for (a, b), _ in images])
    x = torch.randn(24, cu[-1], device=device).to(dtype).t()  # channels-first buffer: strided
    grad = torch.randn(sum(a * b for _, (a, b) in images), 24, device=device)
    ins, outs = [g for g, _ in images], [g for _, g in images]

    def packed(a):
        y, cu_out = pk.adaptive_avg_pool_tokens_varlen(a, cu, ins, outs, backend="triton")
        assert cu_out.tolist() == _offsets([p * q for p, q in outs])
        return y

    out, (dx,) = _grads(packed, (x,), grad)
    ref, (ref_dx,) = _grads(lambda a: _pool_oracle(a, images), (x,), grad, torch.float64)
    _check("out", out, ref, dtype, images)
    _check("dx", dx, ref_dx, dtype, images)


@pytest.mark.triton
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.float16, False),
                                        (torch.bfloat16, True)], ids=["fp32", "fp16", "bf16"])
def test_pool_project_varlen(dtype, bias, device):
    images = _pool_batch()
    cu = _offsets([a * b for (a, b), _ in images])
    C, NF = 40, 24
    x = torch.randn(cu[-1], C, device=device).to(dtype)
    w = (torch.randn(NF, C, device=device) * C ** -0.5).to(dtype)
    inputs = [x, w] + ([torch.randn(NF, device=device).to(dtype)] if bias else [])
    grad = torch.randn(sum(a * b for _, (a, b) in images), NF, device=device)
    ins, outs = [g for g, _ in images], [g for _, g in images]

    def packed(a, weight, *b):
        return pk.adaptive_avg_pool_project_varlen(a, weight, b[0] if b else None, cu, ins, outs,
                                                   backend="triton")[0]

    out, grads = _grads(packed, inputs, grad)
    ref, ref_grads = _grads(lambda a, weight, *b: _pool_oracle(a, images, (weight, *b, None)[:2]),
                            inputs, grad, torch.float64)
    _check("out", out, ref, dtype, images)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        _check(name, g, r, dtype, images)


def _bias(n, layout, device, dtype=torch.float32):
    """``(leaf, view)``: the bias leaf and the ``[n]`` view the op gets: contiguous, every
    other element of a ``[2n]`` buffer (stride 2), or one value expanded (stride 0)."""
    if layout == "strided":
        leaf = torch.randn(2 * n, device=device).to(dtype)
        return leaf, lambda t: t[::2]
    if layout == "expanded":
        leaf = torch.randn(1, device=device).to(dtype)
        return leaf, lambda t: t.expand(n)
    return torch.randn(n, device=device).to(dtype), lambda t: t


@pytest.mark.triton
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "strided"),
                                          (torch.float32, "expanded"),
                                          (torch.bfloat16, "strided")],
                         ids=["fp32-strided", "fp32-expanded", "bf16-strided"])
def test_pool_project_varlen_bias_strides(dtype, layout, device):
    """The fused varlen pooling + projection with a bias view of stride 2 or 0 (an expanded
    scalar): output and every gradient (the bias leaf's too: summed over the features an
    expanded bias stands for) against the float64 per-image oracle."""
    images = [((5, 7), (3, 2)), ((1, 1), (2, 3)), ((4, 6), (4, 6)), ((7, 3), (2, 2))]
    random.shuffle(images)
    cu = _offsets([a * b for (a, b), _ in images])
    C, NF = 24, 20
    x = torch.randn(cu[-1], C, device=device).to(dtype)
    w = (torch.randn(NF, C, device=device) * C ** -0.5).to(dtype)
    b, view = _bias(NF, layout, device, dtype)
    grad = torch.randn(sum(a * c for _, (a, c) in images), NF, device=device)
    ins, outs = [g for g, _ in images], [g for _, g in images]

    def packed(a, weight, bias):
        return pk.adaptive_avg_pool_project_varlen(a, weight, view(bias), cu, ins, outs,
                                                   backend="triton")[0]

    out, grads = _grads(packed, (x, w, b), grad)
    ref, ref_grads = _grads(lambda a, weight, bias: _pool_oracle(a, images, (weight, view(bias))),
                            (x, w, b), grad, torch.float64)
    _check("out", out, ref, dtype, images)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        _check(name, g, r, dtype, images)


@pytest.mark.triton
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_pool_project_varlen_autocast_with_bias(amp, device):
    """Under torch.autocast the fused varlen pooling + projection casts x, weight and a
    (strided) bias to the autocast dtype, as F.linear: output in that dtype against the
    float64 oracle on the cast inputs; the fp32 leaves' gradients (bias included) through the
    casts."""
    images = [((5, 7), (3, 2)), ((3, 3), (1, 1)), ((4, 4), (2, 3))]
    cu = _offsets([a * b for (a, b), _ in images])
    C, NF = 16, 12
    x = torch.randn(cu[-1], C, device=device)
    w = torch.randn(NF, C, device=device) * C ** -0.5
    b, view = _bias(NF, "strided", device)
    grad = torch.randn(sum(a * c for _, (a, c) in images), NF, device=device)
    ins, outs = [g for g, _ in images], [g for _, g in images]

    def packed(a, weight, bias):
        with torch.autocast(device, dtype=amp):
            return pk.adaptive_avg_pool_project_varlen(a, weight, view(bias), cu, ins, outs,
                                                       backend="triton")[0]

    def oracle(a, weight, bias):  # the casts autocast makes, then float64
        a, weight, bias = (t.to(amp).double() for t in (a, weight, view(bias)))
        return _pool_oracle(a, images, (weight, bias))

    out, grads = _grads(packed, (x, w, b), grad)
    ref, ref_grads = _grads(oracle, (x, w, b), grad, torch.float32)
    assert out.dtype == amp
    assert all(g.dtype == torch.float32 for g in grads)
    _check("out", out, ref, amp, images)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        _check(name, g, r, amp, images)


@pytest.mark.triton
def test_pool_single_out_grid_and_tensor_arguments(device):
    ins = torch.tensor([[5, 7], [3, 3]])
    x = torch.randn(44, 8, device=device)
    y, cu_out = pk.adaptive_avg_pool_tokens_varlen(x, torch.tensor([0, 35, 44], dtype=torch.int32),
                                                   ins, (2, 2), backend="triton")
    assert cu_out.tolist() == [0, 4, 8]
    _check("out", y, _pool_oracle(x.double(), [((5, 7), (2, 2)), ((3, 3), (2, 2))]),
           torch.float32, "single out grid")


# --------------------------------------------------------------------------------------------
# torch.compile: one graph for batches of different lengths
# --------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_compile_does_not_recompile_across_batches(device):
    from torch._dynamo.utils import counters

    def layer(feats, w, q, pool_plan, band_plan, pg_plan):
        tokens, _ = pk.adaptive_avg_pool_project_varlen(feats, w, None, backend="triton",
                                                        plan=pool_plan)
        kv = tokens.view(-1, H, D)
        part = pk.band_attention_varlen(q, q, q, window=(2, 1), backend="triton", plan=band_plan)
        out = pk.partial_global_attention_varlen(part, kv, kv, backend="triton", plan=pg_plan)
        return out.square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    w = torch.randn(H * D, 12, device=device, requires_grad=True)
    for images in ([((5, 5), (3, 3)), ((7, 4), (2, 5))],
                   [((6, 6), (4, 4)), ((3, 3), (3, 3)), ((2, 9), (2, 3))],
                   [((9, 9), (4, 5))]):
        cu_in = _offsets([a * b for (a, b), _ in images])
        feats = torch.randn(cu_in[-1], 12, device=device)
        ins, outs = [g for g, _ in images], [g for _, g in images]
        pool_plan = pk.plan_pool(cu_in, ins, outs, device=device)
        n_partial = [p * r for p, r in outs]
        nq = [n + 2 for n in n_partial]  # 2 global queries each
        q = torch.randn(sum(nq), H, D, device=device, requires_grad=True)
        band_plan = pk.plan_band(_offsets(nq), device=device)
        pg_plan = pk.plan_partial_global(_offsets(nq), pool_plan.cu_seqlens_out, n_partial,
                                         device=device)
        loss = compiled(feats, w, q, pool_plan, band_plan, pg_plan)
        loss.backward()
        eager_q = q.detach().requires_grad_()
        eager = layer(feats, w, eager_q, pool_plan, band_plan, pg_plan)
        eager.backward()
        _check("compiled loss", loss, eager, torch.float32, images)
        _check("compiled dq", q.grad, eager_q.grad, torch.float32, images)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.triton
def test_compile_does_not_recompile_across_per_sequence_windows(device):
    """Plans with per-sequence windows (the windows are plan tensors, not constants): one graph
    for batches of different lengths, counts and windows, forward and backward."""
    from torch._dynamo.utils import counters

    def layer(q, plan):
        return pk.band_attention_varlen(q, q, q, backend="triton", plan=plan).square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for lens in ([7, 3], [5, 12, 1], [9, 2, 6, 4]):
        windows = [(random.randint(0, n), random.randint(0, n)) for n in lens]
        plan = pk.plan_band(_offsets(lens), windows=windows, device=device)
        q = torch.randn(sum(lens), H, D, device=device, requires_grad=True)
        loss = compiled(q, plan)
        loss.backward()
        eager_q = q.detach().requires_grad_()
        eager = layer(eager_q, plan)
        eager.backward()
        _check("compiled loss", loss, eager, torch.float32, windows)
        _check("compiled dq", q.grad, eager_q.grad, torch.float32, windows)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.triton
def test_opcheck_varlen_ops(device):
    plan = pk.plan_partial_global([0, 3, 8], [0, 7, 12], [2, 0], device=device)
    q, k = torch.randn(8, H, D, device=device), torch.randn(12, H, D, device=device)
    v = torch.randn(12, H, DV, device=device)
    args = (q, k, v, plan.meta, plan.meta_host, plan.extra, plan.kind, [0, 0], 0.25)
    torch.library.opcheck(torch.ops.pargo.varlen_attention_fwd.default, args)
    out, lse = torch.ops.pargo.varlen_attention_fwd(*args)
    torch.library.opcheck(torch.ops.pargo.varlen_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *args[3:]))
    pool = pk.plan_pool([0, 6, 15], [(2, 3), (3, 3)], (2, 2), device=device)
    x = torch.randn(15, 8, device=device)
    torch.library.opcheck(torch.ops.pargo.pool_tokens_varlen_fwd.default,
                          (x, pool.meta, pool.meta_host, pool.extra, pool.out_token))
    torch.library.opcheck(torch.ops.pargo.pool_tokens_varlen_bwd.default,
                          (torch.randn(8, 8, device=device), pool.meta, pool.meta_host,
                           pool.extra, pool.in_token))
    torch.library.opcheck(torch.ops.pargo.pool_project_varlen_fwd.default,
                          (x, torch.randn(4, 8, device=device), torch.randn(4, device=device),
                           pool.meta, pool.meta_host, pool.extra, pool.out_token))


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _qkv(nq, nv, device="cpu"):
    return (torch.randn(nq, H, D, device=device), torch.randn(nv, H, D, device=device),
            torch.randn(nv, H, D, device=device))


@pytest.mark.parametrize("cu_q,cu_k,n_partial,grids,match", [
    ([1, 4, 9], [0, 5, 12], 1, None, r"cu_seqlens_q\[0\] must be 0"),
    ([0, 6, 4, 9], [0, 5, 9, 12], 1, None, r"non-decreasing: sequence 1"),
    ([0, 4, 9], [0, 5, 11], 1, None, r"k has 12 tokens but cu_seqlens_k\[-1\] = 11"),
    ([0, 4, 9], [0, 5, 12], [1, 2, 3], None, r"n_partial has 3 entries .* 2 sequences"),
    ([0, 4, 9], [0, 5, 12], [1, 6], None, r"sequence 1: n_partial \(6\) must be <= .* Nq \(5\)"),
    ([0, 4, 4, 9], [0, 5, 9, 12], 0, None, r"cu_seqlens_q: sequence 1 has 0 tokens"),
    ([0, 4, 9], [0, 5, 12], [2, 2], ([(1, 5), (2, 3)], [(1, 2), (2, 1)]),
     r"sequence 1: visual_grid 2x3 = 6 tokens does not match the number of keys Nv = 7"),
    ([0, 4, 9], [0, 5, 12], [2, 2], ([(1, 5)], [(1, 2)]),
     r"visual_grids has 1 grids but cu_seqlens has 2 sequences"),
])
def test_attention_validation(cu_q, cu_k, n_partial, grids, match):
    q, k, v = _qkv(9, 12)
    kw = dict(visual_grids=grids[0], partial_grids=grids[1]) if grids else {}
    with pytest.raises(ValueError, match=match):
        pk.partial_global_attention_varlen(q, k, v, cu_q, cu_k, n_partial, backend="reference",
                                           **kw)


@pytest.mark.parametrize("window,error,match", [
    ([(1, 1)], ValueError, r"window has 1 windows but cu_seqlens has 2 sequences"),
    ([(1, 1), (0, 0), (2, 2)], ValueError, r"window has 3 windows but cu_seqlens has 2"),
    ([(1, 1), (0, -1)], ValueError, r"window\[1\]\[1\] \(right of sequence 1\) must be >= 0"),
    ([(-3, 1), (0, 0)], ValueError, r"window\[0\]\[0\] \(left of sequence 0\) must be >= 0"),
    ([(1, 1), (0.5, 2)], TypeError, r"window\[1\]\[0\] .* must be an int"),
    ([(1, 1), (True, 2)], TypeError, r"window\[1\]\[0\] .* must be an int"),
    ([(1, 1), (1, 2, 3)], TypeError, r"window\[1\] must be a pair \(left, right\)"),
    ([(1, 1), 3], TypeError, r"window\[1\] must be a pair \(left, right\)"),
    (torch.tensor([[1, 1], [2, -2]]), ValueError, r"window\[1\]\[1\] .* must be >= 0"),
    (torch.tensor([[1.0, 1.0], [2.0, 2.0]]), TypeError, r"window must be an integer tensor"),
    (torch.tensor([[1, 1, 1], [2, 2, 2]]), ValueError, r"window must be \[n_seq, 2\]"),
    (torch.tensor([1, 1]), ValueError, r"window must be \[n_seq, 2\]"),
    (None, TypeError, r"window must be a pair \(left, right\)"),
    ((1, -1), ValueError, r"window\[1\] \(right\) must be >= 0"),
])
def test_band_window_validation(window, error, match):
    """Shared and per-sequence windows: bad counts, negative or non-int entries, wrong shapes,
    refused naming window[i] (sequence i); and windows given twice (call and plan)."""
    q, k, v = _qkv(9, 9)
    with pytest.raises(error, match=match):
        pk.band_attention_varlen(q, k, v, [0, 4, 9], window, backend="reference")


def test_band_window_and_plan_validation():
    q, k, v = _qkv(9, 9)
    windowed = pk.plan_band([0, 4, 9], windows=[(1, 0), (0, 2)])
    with pytest.raises(ValueError, match=r"window must be None with a plan built with "
                                         r"per-sequence windows"):
        pk.band_attention_varlen(q, k, v, window=(1, 1), plan=windowed)
    with pytest.raises(ValueError, match=r"either plan= or the per-batch arguments.*window"):
        pk.band_attention_varlen(q, k, v, window=[(1, 1), (2, 2)], plan=pk.plan_band([0, 4, 9]))
    with pytest.raises(TypeError, match=r"window must be a pair"):
        pk.band_attention_varlen(q, k, v, plan=pk.plan_band([0, 4, 9]))
    with pytest.raises(ValueError, match=r"windows\[0\]\[1\] \(right of sequence 0\)"):
        pk.plan_band([0, 4, 9], windows=[(1, -1), (0, 2)])
    with pytest.raises(ValueError, match=r"windows has 1 windows but cu_seqlens has 2"):
        pk.plan_band([0, 4, 9], windows=[(1, 1)])


def test_pool_validation():
    x = torch.randn(15, 4)
    with pytest.raises(ValueError, match=r"in_grids\[1\] = \(2, 4\) has 8 cells but sequence 1"):
        pk.adaptive_avg_pool_tokens_varlen(x, [0, 6, 15], [(2, 3), (2, 4)], (2, 2))
    with pytest.raises(ValueError, match=r"out_grids has 3 grids but cu_seqlens has 2"):
        pk.adaptive_avg_pool_tokens_varlen(x, [0, 6, 15], [(2, 3), (3, 3)], [(1, 1)] * 3)
    with pytest.raises(ValueError, match=r"x has 15 tokens but cu_seqlens\[-1\] = 14"):
        pk.adaptive_avg_pool_tokens_varlen(x, [0, 6, 14], [(2, 3), (2, 4)], (2, 2))
    with pytest.raises(ValueError, match=r"out_grids\[0\] \(sequence 0\) must be positive"):
        pk.adaptive_avg_pool_tokens_varlen(x, [0, 6, 15], [(2, 3), (3, 3)], [(0, 1), (1, 1)])
    with pytest.raises(TypeError, match=r"cu_seqlens must be an integer tensor"):
        pk.adaptive_avg_pool_tokens_varlen(x, torch.tensor([0.0, 6.0, 15.0]), [(2, 3), (3, 3)],
                                           (1, 1))


def test_plan_and_backend_validation():
    q, k, v = _qkv(9, 9)
    plan = pk.plan_band([0, 4, 9])
    with pytest.raises(ValueError, match=r"either plan= or the per-batch arguments"):
        pk.band_attention_varlen(q, k, v, [0, 4, 9], (1, 1), plan=plan)
    with pytest.raises(TypeError, match=r"plan must be a VarlenPlan from plan_partial_global"):
        pk.partial_global_attention_varlen(q, k, v, plan=plan)
    with pytest.raises(ValueError, match=r"q has 8 tokens but cu_seqlens\[-1\] = 9"):
        pk.band_attention_varlen(q[:8], k[:8], v[:8], window=(1, 1), plan=plan)
    with pytest.raises(ValueError, match=r"no varlen kernels"):
        pk.band_attention_varlen(q, k, v, [0, 4, 9], (1, 1), backend="cuda")
    with pytest.raises(ValueError, match=r"cu_seqlens must hold n_seq \+ 1 >= 2 offsets"):
        pk.band_attention_varlen(q, k, v, [0], (1, 1))
    assert varlen_plan.VarlenPlan is pk.VarlenPlan


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["pg1d", "band"])
def test_offsets_past_int32_within_a_sequence(mode, device, sparse_buffer):
    """q, k, v, dout: views of a packed [total, 4, 1, D] layout with token stride 2^30 + 64
    elements, 2^31 elements into the buffer; sequence 1 (local rows 0..2) has local row 2 at
    2^31 + 128 elements from its start: a 32-bit local offset wraps (wrong data, not a crash).
    As tests/test_attention_plan.py::test_offsets_past_int32, for the packed ops (10 GiB of
    address space: virtual on CPU, real on a GPU)."""
    seqs = [(1, 1, 1), (3, 3, 2)]  # (Nq, Nv, Np)
    total, dtype = 4, torch.float16
    stride, base = 2**30 + 64, 2**31
    buf = sparse_buffer(base + (total - 1) * stride + 4 * D, dtype)
    views = [torch.as_strided(buf, (total, 1, D), (stride, 0, 1), base + i * D)
             for i in range(4)]
    for view in views:
        view.copy_(torch.randn(total, 1, D, device=device).to(dtype))
    q, k, v, grad = views
    cu = [0, 1, 4]
    if mode == "band":
        def packed(q_, k_, v_):
            return pk.band_attention_varlen(q_, k_, v_, cu, (0, 1), backend="triton")

        def fixed(q_, k_, v_):
            return pk.band_attention(q_, k_, v_, (0, 1), backend="reference")
    else:
        def packed(q_, k_, v_):
            return pk.partial_global_attention_varlen(q_, k_, v_, cu, cu, [1, 2],
                                                      backend="triton")

        def fixed(q_, k_, v_, np_=None):
            return pk.partial_global_attention(q_, k_, v_, np_, backend="reference")

    def oracle(q_, k_, v_):
        outs = []
        for i, (_, _, np_) in enumerate(seqs):
            sl = [t[cu[i]:cu[i + 1]].transpose(0, 1)[None] for t in (q_, k_, v_)]
            o = fixed(*sl) if mode == "band" else fixed(*sl, np_=np_)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    out, grads = _grads(packed, (q, k, v), grad.contiguous())
    ref, ref_grads = _grads(oracle, [t.contiguous() for t in (q, k, v)], grad.contiguous(),
                            torch.float64)
    _check("out", out, ref, dtype, mode)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _check(name, g, r, dtype, mode)


# --------------------------------------------------------------------------------------------
# edge semantics, autocast, torch.func: as the fixed-shape ops (tests/test_edge_semantics.py)
# --------------------------------------------------------------------------------------------
def _per_sequence(fixed, cu, *tensors):
    outs = []
    for i in range(len(cu) - 1):
        sl = [t[cu[i]:cu[i + 1]].transpose(0, 1)[None] for t in tensors]
        outs.append(fixed(i, *sl)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_with_all_scores_minus_inf_are_zero(dtype, device):
    """q[row, :, 0] = -inf, k[:, :, 0] > 0: every score of the row is -inf (a partial row of
    sequence 0, a global row of sequence 1). Output 0 and dq 0 for those rows, out / dq / dv
    equal to the fixed-shape op's on each sequence (whose semantics are SDPA's)."""
    cu, n_partial = [0, 3, 6], [2, 1]
    q, k, v = (torch.randn(6, H, D, device=device).to(dtype) for _ in range(3))
    k[..., 0] = k[..., 0].abs() + 0.5
    rows = [1, 5]
    q[rows, :, 0] = float("-inf")
    grad = torch.randn(6, H, D, device=device).to(dtype)
    got = _grads(lambda a, b, c: pk.partial_global_attention_varlen(
        a, b, c, cu, cu, n_partial, backend="triton"), (q, k, v), grad)
    ref = _grads(lambda a, b, c: _per_sequence(
        lambda i, *sl: pk.partial_global_attention(*sl, n_partial[i], backend="triton"), cu,
        a, b, c), (q, k, v), grad)
    assert torch.equal(got[0][rows], torch.zeros_like(got[0][rows]))
    assert torch.equal(got[1][0][rows], torch.zeros_like(got[1][0][rows]))
    for name, g, r in (("out", got[0], ref[0]), ("dq", got[1][0], ref[1][0]),
                       ("dv", got[1][2], ref[1][2]), ("dk[..., 1:]", got[1][1][..., 1:],
                                                       ref[1][1][..., 1:])):
        assert torch.isfinite(g).all(), name
        _check(name, g, r, dtype, "minus-inf rows")


@pytest.mark.triton
def test_autocast_and_torch_func_like_the_fixed_shape_ops(device):
    """Under torch.autocast(bfloat16) mixed fp32/fp16 inputs run in bfloat16 (attention and the
    projection; the pooling alone is not cast); jacrev and double backward on the kernel backend
    raise NotImplementedError."""
    cu = [0, 2, 5]
    q = torch.randn(5, H, D, device=device)
    k = torch.randn(5, H, D, device=device).half()
    v = torch.randn(5, H, D, device=device)
    x = torch.randn(10, 8, device=device)
    w = torch.randn(6, 8, device=device)
    pool = dict(cu_seqlens=[0, 4, 10], in_grids=[(2, 2), (2, 3)], out_grids=[(1, 1), (1, 2)])
    with torch.autocast(device, dtype=torch.bfloat16):
        out = pk.band_attention_varlen(q, k, v, cu, (1, 0), backend="triton")
        y, _ = pk.adaptive_avg_pool_project_varlen(x, w, None, **pool, backend="triton")
        p, _ = pk.adaptive_avg_pool_tokens_varlen(x, **pool, backend="triton")
    ref = pk.band_attention_varlen(*(t.bfloat16() for t in (q, k, v)), cu, (1, 0),
                                   backend="triton")
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert y.dtype == torch.bfloat16 and p.dtype == torch.float32
    calls = {
        "attention": (lambda t: pk.partial_global_attention_varlen(
            t, q, v, cu, cu, 1, backend="triton"), q),
        "pool": (lambda t: pk.adaptive_avg_pool_tokens_varlen(t, **pool, backend="triton")[0], x),
        "pool_project": (lambda t: pk.adaptive_avg_pool_project_varlen(
            t, w, None, **pool, backend="triton")[0], x),
    }
    assert_transforms_refused(calls)


_POOL_KERNELS = ("_pool_varlen_fwd_kernel", "_pool_varlen_bwd_kernel",
                 "_pool_proj_varlen_fwd_kernel", "_pool_proj_dw_kernel", "_pool_proj_dp_kernel")


def _launch_key(kernel, ty: str, constexprs: dict, options: dict):
    return kernel.fn.__name__, ty, frozenset(constexprs.items()), frozenset(options.items())


class _Recorder:
    """Stand-in for a Triton kernel: each launch appends its key (name, dtype of the first
    argument, constexprs, num_warps / num_stages) to ``launched``; ``kernel=None`` records
    nothing. Nothing executes."""

    def __init__(self, kernel, launched: list):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.kernel is None:
                return
            params = inspect.signature(self.kernel.fn).parameters.values()
            cx = {p.name for p in params if "constexpr" in str(p.annotation)}
            self.launched.append(_launch_key(
                self.kernel, pool_triton._TL_DTYPE[args[0].dtype],
                {k: v for k, v in kwargs.items() if k in cx},
                {k: kwargs[k] for k in ("num_warps", "num_stages")}))
        return launch


def test_pool_launchers_choose_only_aot_configs(monkeypatch):
    """What the varlen pooling launchers launch on a GPU of each architecture (every channel
    tile bucket, each dtype; fused forward and backward from FUSED_MIN_ARCH on) is a
    configuration `aot_specs(arch)` lists (the fused backward's GEMMs: pool_triton's), so the
    AOT run compiles exactly what runs. Kernels are replaced by recorders: nothing executes."""
    from pargo_kernels import aot
    launched = []
    for name in _POOL_KERNELS:
        monkeypatch.setattr(varlen_pool_triton, name,
                            _Recorder(getattr(varlen_pool_triton, name), launched))
    monkeypatch.setattr(varlen_pool_triton, "_interp", lambda t: False)
    plan = pk.plan_pool([0, 6, 15], [(2, 3), (3, 3)], (2, 2))
    for arch in aot.ARCHS:
        monkeypatch.setattr(varlen_pool_triton, "_arch", lambda t, arch=arch: arch)
        # varlen_pool_triton's kernels are recorders here (aot_specs reads the patched module):
        # keyed by the kernel each stands for; a compiled JITFunction's own `.kernel` is None
        specs = {_launch_key(k.kernel if isinstance(k, _Recorder) else k, ptrs["X"], cx, opts)
                 for mod in (pool_triton, varlen_pool_triton)
                 for k, ptrs, cx, opts, _ in mod.aot_specs(arch)}
        fused = arch >= pool_triton.FUSED_MIN_ARCH
        for dtype in DTYPES:
            for c in (1, 16, 17, 40, 64, 300):
                launched.clear()
                x, w = torch.randn(15, c).to(dtype), torch.randn(5, c).to(dtype)
                varlen_pool_triton.pool_varlen_forward(x, plan)
                varlen_pool_triton.pool_varlen_backward(torch.randn(8, c).to(dtype), plan)
                for bias in ((None, torch.randn(5).to(dtype)) if fused else ()):
                    varlen_pool_triton.pool_project_varlen_forward(x, w, bias, plan)
                    varlen_pool_triton.pool_project_varlen_backward(
                        torch.randn(8, 5).to(dtype), x, w, bias is not None, plan)
                assert len(launched) == (12 if fused else 2), launched  # 2 + 2 x (1 + 4)
                missing = set(launched) - specs
                assert not missing, f"sm_{arch} {dtype} C={c}: not in aot_specs: {missing}"



_ATTN_KERNELS = ("_varlen_fwd_kernel", "_varlen_bwd_dq_kernel", "_varlen_bwd_dkdv_kernel")


def test_attention_launchers_choose_only_aot_configs(monkeypatch):
    """What the varlen attention launchers launch on a GPU of each architecture (each mask kind,
    dtype and head-dim bucket the dispatcher serves there; sm_86 / sm_89 included, with their own
    tiles) is a configuration `aot_specs(arch)` lists and vice versa, so the AOT run (0 spills)
    compiles exactly what runs. Kernels are replaced by recorders: nothing executes."""
    from pargo_kernels import aot
    from pargo_kernels.ops import attention_plan, attention_triton
    launched = []
    for name in _ATTN_KERNELS:
        monkeypatch.setattr(varlen_triton, name, _Recorder(getattr(varlen_triton, name), launched))
    # the fixed-shape delta kernel (fp32 backward) is attention_triton's: not recorded here
    monkeypatch.setattr(varlen_triton, "_attn_bwd_delta_kernel", _Recorder(None, launched))
    # the GPU's precision (the interpreter's bf16 one is a CPU-only stand-in)
    monkeypatch.setattr(varlen_triton, "_precision",
                        lambda dtype, interpret=False: attention_triton._precision(dtype))
    cu, cu_long = [0, 6, 15], [0, 6, 42]
    # the last two split their global tiles over keys (16-bit: the delta-only dQ launch too)
    plans = [(pk.plan_partial_global(cu, cu, 2), (0, 0)),
             (pk.plan_partial_global(cu, cu, [2, 4], visual_grids=[(2, 3), (3, 3)],
                                     partial_grids=[(1, 2), (2, 2)]), (0, 0)),
             (pk.plan_band(cu), (1, 2)),
             (pk.plan_partial_global(cu_long, cu_long, [2, 30], split_keys=16), (0, 0)),
             (pk.plan_partial_global(cu_long, cu_long, [2, 30], visual_grids=[(2, 3), (6, 6)],
                                     partial_grids=[(1, 2), (6, 5)], split_keys=16), (0, 0))]
    assert [p.n_split > 1 for p, _ in plans] == [False] * 3 + [True] * 2
    for arch in aot.ARCHS:
        monkeypatch.setattr(varlen_triton, "_arch", lambda t, arch=arch: arch)
        specs = {_launch_key(k.kernel, ptrs["Q"], cx, opts)  # k: its Recorder
                 for k, ptrs, cx, opts, _ in varlen_triton.aot_specs(arch)}
        served, seen = 0, set()
        for dtype in DTYPES:
            for d in (16, 32, 64, 128, 256):
                if attention_plan.arch_refusal(divmod(arch, 10), dtype, d):
                    continue
                served += 1
                for plan, window in plans:
                    launched.clear()
                    total = int(plan.meta_host[-1, 0])
                    q, k, v, do = (torch.randn(total, 2, d).to(dtype) for _ in range(4))
                    out, lse = varlen_triton.varlen_forward(q, k, v, plan, plan.kind, window, 0.5)
                    varlen_triton.varlen_backward(do, q, k, v, out, lse, plan, plan.kind, window,
                                                  0.5)
                    order = list(_ATTN_KERNELS)
                    if plan.n_split > 1 and dtype != torch.float32:
                        order.insert(1, "_varlen_bwd_dq_kernel")  # the delta-only launch
                    assert [key[0] for key in launched] == order, launched
                    missing = set(launched) - specs
                    assert not missing, f"sm_{arch} {dtype} d={d}: not in aot_specs: {missing}"
                    seen |= set(launched)
        assert served == (4 if arch == 75 else 15), arch  # sm_75: fp32 up to d=128
        assert seen == specs, f"sm_{arch}: aot_specs lists configs no launch uses"
