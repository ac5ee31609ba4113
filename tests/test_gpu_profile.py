"""The GPU test profile: every op x dtype x mask kind x pass x backend against the float64
oracle, with as few distinct Triton compiles as that allows.

What ``benchmarks/gpu_run.sh`` runs on a lent GPU before any benchmark (the whole suite compiles
far more Triton specializations than one call has time for; ``benchmarks/gpu_plan.py`` counts
them): the fixed-shape attention ops (partial-global with 1-D and 2-D windows, with key splits
of the global tiles, band, ParGo self-attention), pooling, pooling + projection (default path
and fused), and the four varlen ops; fp32, fp16 and bf16; forward and every input gradient;
the Triton backend and, where the CUDA extension has the op, the CUDA backend.

Fewest compiles: one head dim (64) and one channel count (64) everywhere, so a kind and a dtype
compile one set of kernels (D / DV / BLOCK_D and the channel tile are constexprs), contiguous
or ``[B, N, H, D]``-transposed inputs whose strides all divide by 16 (one stride
specialization); shapes then vary freely between cases at no compile cost. dtypes share no
kernel, so each dtype is its own set (``gpu_run.sh`` runs them as parallel processes:
``-k "triton and fp32"`` and so on).

Every case draws fresh random inputs; outputs and workspaces of the Triton launchers are
NaN-filled, so an unwritten element fails. Each case computes everything first and compares
after (``check`` returns the comparisons), so ``gpu_plan.py`` can run the same calls with the
kernels replaced by launch recorders.

On a CPU-only machine the Triton cases run under the interpreter (``TRITON_INTERPRET=1``; they
skip with the reason otherwise) and the CUDA cases skip; on a CUDA machine every tensor is a
CUDA tensor.
"""
from __future__ import annotations

import contextlib
import functools
import random

import pytest
import torch

import pargo_kernels as pk
from pargo_kernels import _backend, _cuda
from pargo_kernels.masks import BandMask, ParGoSelfMask, PartialGlobalMask
from pargo_kernels.pooling import pool_project_reference, pool_tokens_reference
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
D = 64  # head dim of every attention case (q, k and v)
C = 64  # channels of every pooling case
NF = 48  # projection width (F.linear / the fused GEMM's N; not a constexpr)
H = 2

# --------------------------------------------------------------------------------------------
# cases: (op, arguments); shapes are multi-tile (64-row query and key tiles) and uneven
# --------------------------------------------------------------------------------------------
# (op, mask on a GPU, mask on the CPU (the interpreter: a few programs), layout); the masks of a
# case have the same kind, so both sizes need the same compiles
ATTENTION = {
    # Np does not divide Nv; 16 (CPU: 7) globals; [B, H, N, D] inputs
    "pg1d": ("pg", PartialGlobalMask(100, 150, 84), PartialGlobalMask(20, 37, 13), "bhnd"),
    # global tiles split over their keys (flash-decoding path: merge, dQ reduce, 16-bit
    # delta-only launch), the split threshold lowered for this case: Np = Nv, so a partial tile
    # spans ~1 key tile and the global tiles' keys are split
    "pg1d-split": ("pg", PartialGlobalMask(216, 200, 200), PartialGlobalMask(134, 130, 130),
                   "bhnd"),
    # 2-D windows, overlapping (visual 9x11 / partial 4x5; CPU 5x7 / 3x2); [B, N, H, D] views
    "pg2d": ("pg", PartialGlobalMask(26, 99, 20, (9, 11), (4, 5)),
             PartialGlobalMask(9, 35, 6, (5, 7), (3, 2)), "bnhd"),
    "band": ("band", BandMask(130, 7, 20), BandMask(40, 3, 7), "bhnd"),
    # Np inside a key tile, asymmetric band among the partials; [B, N, H, D] views
    "pgself": ("pgself", ParGoSelfMask(110, 75, 5, 3), ParGoSelfMask(40, 27, 2, 1), "bnhd"),
}
POOL_GRIDS = ((9, 11), (4, 5))  # overlapping windows (9/4, 11/5 not integers)
POOLING = {"pool": None, "pool-project": False, "pool-project-fused": True}  # -> fused
VARLEN = ("pg1d-varlen", "pg2d-varlen", "band-varlen", "pool-varlen", "pool-project-varlen")
# the CUDA extension: attention (fp16 / bf16, D 64 / 128, every kind; no key splits) and the
# pooling kernel (also under adaptive_avg_pool_project's default path); no varlen kernels
CUDA_CASES = {"pg1d": ("fp16", "bf16"), "pg2d": ("fp16", "bf16"), "band": ("fp16", "bf16"),
              "pgself": ("fp16", "bf16"), "pool": tuple(DTYPES), "pool-project": tuple(DTYPES)}


def all_cases(backend: str) -> list[tuple[str, str]]:
    """``(case, dtype name)`` pairs the profile runs on ``backend``."""
    if backend == "cuda":
        return [(c, d) for c, ds in CUDA_CASES.items() for d in ds]
    return [(c, d) for c in (*ATTENTION, *POOLING, *VARLEN) for d in DTYPES]


# --------------------------------------------------------------------------------------------
# helpers: poisoned outputs, the lowered split threshold, fresh inputs
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def poisoned_outputs():
    """Every output and workspace the Triton launchers allocate is NaN-filled."""
    from pargo_kernels.ops import attention_triton, pool_triton, varlen_pool_triton, varlen_triton

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    with contextlib.ExitStack() as stack:
        for mod in (attention_triton, pool_triton, varlen_triton, varlen_pool_triton):
            stack.enter_context(_patched(mod, "_empty", nan_empty))
        yield


def _poison_cuda_allocator(device):
    """Best effort for the CUDA extension (it allocates with at::empty from the caching
    allocator): NaN-fill blocks of the sizes used here and free them first."""
    if device == "cuda":
        blocks = [torch.full((n,), float("nan"), device=device) for n in [2**16] * 8 + [2**20] * 4]
        del blocks


@contextlib.contextmanager
def split_every_global_tile(launch_names: list):
    """The fixed-shape plans split global tiles over their keys at any length
    (``split_min_iters=1``); the planned launch names go to ``launch_names``."""
    from pargo_kernels.ops import attention_plan as plan
    with contextlib.ExitStack() as stack:
        for fn in ("forward_plan", "backward_plan"):
            real = getattr(plan, fn)

            def lowered(p, _real=real, **kw):
                launches = _real(p, split_min_iters=1)
                launch_names.extend(la.name for la in launches)
                return launches
            stack.enter_context(_patched(plan, fn, lowered))
        yield


def _randn(shape, dtype, device, layout="plain"):
    """Fresh N(0, 1) leaf; ``layout="bnhd"``: the ``[B, N, H, D].transpose(1, 2)`` view."""
    if layout == "bnhd":
        b, h, n, d = shape
        t = torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2)
    else:
        t = torch.randn(*shape, device=device).to(dtype)
    return t.requires_grad_(True)


def _grads(fn, inputs, grad, as_dtype=None):
    """``fn`` on fresh leaves of ``inputs`` (cast to ``as_dtype``), backward with ``grad``:
    ``(out, [grads])``."""
    leaves = [t.detach().to(as_dtype or t.dtype).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


def _offsets(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------
def _attention(case, dtype, device, backend, small):
    op, big_mask, small_mask, layout = ATTENTION[case]
    mask = small_mask if small else big_mask
    B, h = (1, 1) if small else (2, H)
    q = _randn((B, h, mask.n_query, D), dtype, device, layout)
    k = _randn((B, h, mask.n_key, D), dtype, device, layout)
    v = _randn((B, h, mask.n_key, D), dtype, device, layout)
    grad = torch.randn(B, h, mask.n_query, D, device=device).to(dtype)

    def ours(q_, k_, v_):
        if op == "pg":
            return pk.partial_global_attention(q_, k_, v_, mask.n_partial,
                                               visual_grid=mask.visual_grid,
                                               partial_grid=mask.partial_grid, backend=backend)
        if op == "band":
            return pk.band_attention(q_, k_, v_, (mask.left, mask.right), backend=backend)
        return pk.pargo_self_attention(q_, k_, v_, mask.n_partial, (mask.left, mask.right),
                                       backend=backend)

    names = []
    with contextlib.ExitStack() as stack:
        if case.endswith("-split"):
            stack.enter_context(split_every_global_tile(names))
        out, grads = _grads(ours, (q, k, v), grad)
    if case.endswith("-split"):  # the case tests the split path only if the plans split
        assert "fwd_merge" in names and "dq_reduce" in names, names
        assert ("dq_delta" in names) == (dtype != torch.float32), names
    dense = mask.materialize(device)
    ref, ref_grads = _grads(lambda a, b, c: masked_attention(a, b, c, dense, D ** -0.5),
                            (q, k, v), grad, torch.float64)
    return [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads))


def _pooling(case, dtype, device, backend, small):
    fused = POOLING[case]
    in_grid, out_grid = POOL_GRIDS
    B = 1 if small else 2
    x = _randn((B, in_grid[0] * in_grid[1], C), dtype, device)
    if fused is None:
        grad = torch.randn(B, out_grid[0] * out_grid[1], C, device=device).to(dtype)
        out, grads = _grads(lambda a: pk.adaptive_avg_pool_tokens(
            a, in_grid, out_grid, backend=backend), (x,), grad)
        ref, ref_grads = _grads(lambda a: pool_tokens_reference(a, in_grid, out_grid), (x,),
                                grad, torch.float64)
        return [("out", out, ref), ("dx", grads[0], ref_grads[0])]
    w = (torch.randn(NF, C, device=device) * C ** -0.5).to(dtype).requires_grad_(True)
    bias = _randn((NF,), dtype, device)
    grad = torch.randn(B, out_grid[0] * out_grid[1], NF, device=device).to(dtype)
    out, grads = _grads(lambda a, w_, b_: pk.adaptive_avg_pool_project(
        a, w_, b_, in_grid=in_grid, out_grid=out_grid, backend=backend, fused=fused),
        (x, w, bias), grad)
    ref, ref_grads = _grads(lambda a, w_, b_: pool_project_reference(a, w_, b_, in_grid,
                                                                     out_grid),
                            (x, w, bias), grad, torch.float64)
    return [("out", out, ref)] + list(zip(("dx", "dweight", "dbias"), grads, ref_grads))


def _varlen_masks(case, small):
    """Per-sequence masks of a packed batch with corner cases: a 1-token sequence, Np = 0,
    Ng = 0, Np not dividing Nv, 2-D windows of mixed grids (1x1 too), per-sequence bands;
    partial-global: sequences long enough that their global tiles split over keys (with the
    ``split_keys`` of ``_varlen_attention``)."""
    if case == "band-varlen":
        lens = ([random.randint(10, 40), 1, random.randint(3, 20)] if small else
                [random.randint(40, 90), 1, random.randint(65, 130), random.randint(2, 30)])
        return [BandMask(n, random.randint(0, 9), random.randint(0, 9)) for n in lens]
    if case == "pg1d-varlen":
        nv = 23 if small else 161
        np_ = random.choice([n for n in range(5, 12 if small else 41) if nv % n])
        masks = [PartialGlobalMask(random.randint(1, 9), random.choice((13, 61)), 0),  # Np = 0
                 PartialGlobalMask(11 if small else 37, 11 if small else 37,
                                   11 if small else 37),                             # Ng = 0
                 PartialGlobalMask(np_ + 7, nv, np_)]                       # Np not dividing
        # splits with split_keys=32 (CPU) / 64: keys many times a partial tile's span
        long = (PartialGlobalMask(70, 70, 66) if small else
                PartialGlobalMask(84, random.randint(260, 320), 70))
        return masks + [long]
    grids = ([((5, 7), (3, 2)), ((1, 1), (1, 1)), ((4, 6), (4, 5))] if small else
             [((7, 9), (3, 4)), ((1, 1), (1, 1)), ((11, 6), (5, 5)), ((4, 13), (4, 2))])
    return [PartialGlobalMask(hp * wp + g, hv * wv, hp * wp, (hv, wv), (hp, wp))
            for ((hv, wv), (hp, wp)), g in zip(grids, [random.randint(0, 5), 0, 3, 2])]


def _varlen_attention(case, dtype, device, small):
    masks = _varlen_masks(case, small)
    nq, nv = [m.n_query for m in masks], [m.n_key for m in masks]
    cu_q, cu_k = _offsets(nq), _offsets(nv)
    h = 1 if small else H
    q = _randn((sum(nq), h, D), dtype, device)
    k = _randn((sum(nv), h, D), dtype, device)
    v = _randn((sum(nv), h, D), dtype, device)
    grad = torch.randn(sum(nq), h, D, device=device).to(dtype)

    if case == "band-varlen":
        windows = [(m.left, m.right) for m in masks]

        def ours(q_, k_, v_):
            return pk.band_attention_varlen(q_, k_, v_, cu_q, windows, backend="triton")
    else:
        kw = {}
        if case == "pg2d-varlen":
            kw = dict(visual_grids=[m.visual_grid for m in masks],
                      partial_grids=[m.partial_grid for m in masks])
        # the global tiles of the sequences with more keys than this split over their keys
        # (the dynamic-resolution benchmark's batch splits: 2-D windows, Nv up to 2304)
        split = (32 if small else 64) if case == "pg1d-varlen" else (16 if small else 64)
        plan = pk.plan_partial_global(cu_q, cu_k, [m.n_partial for m in masks], device=device,
                                      split_keys=split, **kw)
        assert plan.n_split > 1, "a long sequence must split its global tiles"

        def ours(q_, k_, v_):
            return pk.partial_global_attention_varlen(q_, k_, v_, backend="triton", plan=plan)

    def oracle(q_, k_, v_):  # the dense-mask reference on every sequence's slices
        outs = []
        for i, m in enumerate(masks):
            sl = [t[a:b].transpose(0, 1)[None] for t, a, b in (
                (q_, cu_q[i], cu_q[i + 1]), (k_, cu_k[i], cu_k[i + 1]), (v_, cu_k[i], cu_k[i + 1]))]
            o = masked_attention(*sl, m.materialize(device), D ** -0.5)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, 0)
    out, grads = _grads(ours, (q, k, v), grad)
    ref, ref_grads = _grads(oracle, (q, k, v), grad, torch.float64)
    return [("out", out, ref)] + list(zip(("dq", "dk", "dv"), grads, ref_grads))


def _varlen_pooling(case, dtype, device, small):
    in_grids = [(9, 11), (1, 1), (5, 7), (12, 4)][: 3 if small else 4]
    out_grids = [(4, 5), (1, 1), (3, 2), (5, 4)][: len(in_grids)]
    lens = [h * w for h, w in in_grids]
    cu = _offsets(lens)
    x = _randn((sum(lens), C), dtype, device)
    n_out = sum(h * w for h, w in out_grids)

    def per_image(fn):
        def run(x_, *proj):
            return torch.cat([fn(x_[cu[i]:cu[i + 1]][None], *proj, ig, og)[0]
                              for i, (ig, og) in enumerate(zip(in_grids, out_grids))], 0)
        return run
    if case == "pool-varlen":
        grad = torch.randn(n_out, C, device=device).to(dtype)
        out, grads = _grads(lambda a: pk.adaptive_avg_pool_tokens_varlen(
            a, cu, in_grids, out_grids, backend="triton")[0], (x,), grad)
        ref, ref_grads = _grads(per_image(pool_tokens_reference), (x,), grad, torch.float64)
        return [("out", out, ref), ("dx", grads[0], ref_grads[0])]
    w = (torch.randn(NF, C, device=device) * C ** -0.5).to(dtype).requires_grad_(True)
    bias = _randn((NF,), dtype, device)
    grad = torch.randn(n_out, NF, device=device).to(dtype)
    out, grads = _grads(lambda a, w_, b_: pk.adaptive_avg_pool_project_varlen(
        a, w_, b_, cu, in_grids, out_grids, backend="triton")[0], (x, w, bias), grad)
    ref, ref_grads = _grads(per_image(pool_project_reference), (x, w, bias), grad, torch.float64)
    return [("out", out, ref)] + list(zip(("dx", "dweight", "dbias"), grads, ref_grads))


def check(case: str, dtype_name: str, backend: str, device: str = DEVICE,
          small: bool | None = None) -> list:
    """Run one case (forward and backward, NaN-poisoned outputs) and its float64 oracle;
    returns ``[(name, actual, expected), ...]``, compared by the caller. ``small`` (default: on
    the CPU): fewer heads, tokens and tiles, the same kernels and specializations."""
    dtype = DTYPES[dtype_name]
    small = device == "cpu" if small is None else small
    _poison_cuda_allocator(device if backend == "cuda" else "cpu")
    with poisoned_outputs():
        if case in ATTENTION:
            return _attention(case, dtype, device, backend, small)
        if case in POOLING:
            return _pooling(case, dtype, device, backend, small)
        assert backend == "triton", "the CUDA extension has no varlen kernels"
        if case.startswith("pool"):
            return _varlen_pooling(case, dtype, device, small)
        return _varlen_attention(case, dtype, device, small)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def skip_reason(backend: str) -> str:
    """Why ``backend`` cannot run here ('' if it can). Asked inside the test, not at
    collection: the Triton processes of gpu_run.sh start while the CUDA extension is still
    being built, and must not load it half-written."""
    if backend == "triton":
        return "; ".join(_backend.triton_device_reasons([torch.empty(0, device=DEVICE)]))
    why = _cuda.cuda_extension_reasons([torch.empty(0, device=DEVICE)])
    if not why and torch.cuda.get_device_capability() < (8, 0):
        why.append("the CUDA attention kernels need sm_80 or newer")
    return "; ".join(why)


PARAMS = [pytest.param(c, d, be, id=f"{c}-{d}-{be}")
          for be in ("triton", "cuda") for c, d in all_cases(be)]


@pytest.mark.parametrize("case, dtype_name, backend", PARAMS)
def test_profile(case, dtype_name, backend):
    if skip_reason(backend):
        pytest.skip(skip_reason(backend))
    results = check(case, dtype_name, backend)
    dtype = DTYPES[dtype_name]
    for name, actual, expected in results:
        assert actual.dtype == dtype, (name, actual.dtype)
        assert actual.device.type == DEVICE, (name, actual.device)
        assert_close(f"{case} {name}", actual, expected, dtype)
