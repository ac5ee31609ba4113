"""Every public op and plan gives the same result whatever ``torch.set_default_device`` says.

A user who sets the default device (commonly to CUDA) and passes tensors of another device, or
of that one, must get the same outputs and gradients: nothing in the library may allocate on
the default device instead of the inputs' (a varlen plan's host tables on a CUDA default
device made ``pin_memory()`` fail). Each case runs forward and backward once with the default
device untouched, then again under another default device, on the same inputs; results must be
bitwise equal (the ops are deterministic) and on the same devices. On a CPU-only machine the
other default is ``meta`` (any allocation that follows it fails or yields meta tensors); on a
GPU machine also ``cuda`` and ``cpu``.
"""
import os

import pytest
import torch

import pargo_kernels as pk
from pargo_kernels.testing import triton_test_device

DEVICE = triton_test_device()  # the conftest's `device`
DEFAULTS = ["meta"] + (["cuda"] if torch.cuda.is_available() else []) + \
    (["cpu"] if DEVICE != "cpu" else [])
H, D = 2, 16


@pytest.fixture
def set_default_device():
    """``torch.set_default_device``, undone after the test whatever happens."""
    before = torch.get_default_device()
    yield torch.set_default_device
    torch.set_default_device(None if before == torch.device("cpu") else before)


def _r(*shape, device):
    return torch.randn(*shape, device=device)


# Each case: make(device) -> (inputs, run(backend, *inputs) -> tensor or tuple). Lists of ints
# (offsets, grids) are built inside ``run``, so the plans are built under the default device.
def _pg1d(dev):
    return [_r(1, H, n, D, device=dev) for n in (9, 13, 13)], \
        lambda be, q, k, v: pk.partial_global_attention(q, k, v, 6, backend=be)


def _pg2d(dev):
    return [_r(2, H, n, D, device=dev) for n in (8, 20, 20)], \
        lambda be, q, k, v: pk.partial_global_attention(q, k, v, 6, visual_grid=(4, 5),
                                                        partial_grid=(2, 3), backend=be)


def _band(dev):
    return [_r(1, H, 11, D, device=dev) for _ in range(3)], \
        lambda be, q, k, v: pk.band_attention(q, k, v, (2, 1), backend=be)


def _pgself(dev):
    return [_r(1, H, 13, D, device=dev) for _ in range(3)], \
        lambda be, q, k, v: pk.pargo_self_attention(q, k, v, 8, (2, 1), backend=be)


def _cascade(dev):
    windows = pk.cascade_windows(9, 3, "symmetric")
    return [_r(1, H, 9, D, device=dev) for _ in range(3)], \
        lambda be, q, k, v: pk.band_attention(q, k, v, windows[1], backend=be)


def _pool(dev):
    return [_r(2, 35, 8, device=dev)], \
        lambda be, x: pk.adaptive_avg_pool_tokens(x, (5, 7), (3, 2), backend=be)


def _pool_project(fused):
    def make(dev):
        return [_r(2, 35, 8, device=dev), _r(6, 8, device=dev), _r(6, device=dev)], \
            lambda be, x, w, b: pk.adaptive_avg_pool_project(
                x, w, b, in_grid=(5, 7), out_grid=(3, 2), backend=be, fused=fused)
    return make


def _pg_varlen(with_plan, two_d=False, split_keys=None):
    def make(dev):
        if two_d:  # visual grids 4x5 and 2x3, partial grids 2x3 and 1x1, 2 and 1 global rows
            cu_q, cu_k, n_p = [0, 8, 10], [0, 20, 26], [6, 1]
            grids = dict(visual_grids=[(4, 5), (2, 3)], partial_grids=[(2, 3), (1, 1)])
        else:
            cu_q, cu_k, n_p, grids = [0, 3, 8], [0, 7, 12], [2, 0], {}
        inputs = [_r(cu_q[-1], H, D, device=dev), _r(cu_k[-1], H, D, device=dev),
                  _r(cu_k[-1], H, 24, device=dev)]

        def run(be, q, k, v):
            if not with_plan:
                return pk.partial_global_attention_varlen(q, k, v, cu_q, cu_k, n_p, backend=be,
                                                          **grids)
            plan = pk.plan_partial_global(cu_q, cu_k, n_p, device=q.device,
                                          split_keys=split_keys, **grids)
            if split_keys is not None:
                assert plan.n_split > 1  # the split schedule is what this case covers
            return pk.partial_global_attention_varlen(q, k, v, backend=be, plan=plan)
        return inputs, run
    return make


def _band_varlen(how):
    def make(dev):
        cu = [0, 4, 9]
        inputs = [_r(9, H, D, device=dev) for _ in range(3)]

        def run(be, q, k, v):
            if how == "shared":
                return pk.band_attention_varlen(q, k, v, cu, (1, 1), backend=be)
            if how == "windows":  # per-sequence windows as an int tensor
                return pk.band_attention_varlen(q, k, v, cu, torch.tensor([[1, 0], [0, 3]],
                                                                          device="cpu"),
                                                backend=be)
            plan = pk.plan_band(cu, windows=[(2, 0), (1, 2)], device=q.device)
            return pk.band_attention_varlen(q, k, v, backend=be, plan=plan)
        return inputs, run
    return make


def _pool_varlen(project, with_plan):
    def make(dev):
        cu, ins, outs = [0, 6, 15], [(2, 3), (3, 3)], (2, 2)
        inputs = [_r(15, 8, device=dev)] + ([_r(5, 8, device=dev), _r(5, device=dev)]
                                            if project else [])

        def run(be, x, *wb):
            kw = dict(plan=pk.plan_pool(cu, ins, outs, device=x.device)) if with_plan else \
                dict(cu_seqlens=cu, in_grids=ins, out_grids=outs)
            if project:
                return pk.adaptive_avg_pool_project_varlen(x, *wb, backend=be, **kw)
            return pk.adaptive_avg_pool_tokens_varlen(x, backend=be, **kw)
        return inputs, run
    return make


CASES = {
    "partial_global_1d": _pg1d, "partial_global_2d": _pg2d, "band": _band,
    "pargo_self": _pgself, "cascade_windows": _cascade, "pool_tokens": _pool,
    "pool_project": _pool_project(None), "pool_project_fused": _pool_project(True),
    "partial_global_varlen": _pg_varlen(False),
    "partial_global_varlen_plan": _pg_varlen(True),
    "partial_global_varlen_2d_split_plan": _pg_varlen(True, two_d=True, split_keys=16),
    "band_varlen": _band_varlen("shared"), "band_varlen_windows": _band_varlen("windows"),
    "band_varlen_plan": _band_varlen("plan"),
    "pool_tokens_varlen": _pool_varlen(False, False),
    "pool_tokens_varlen_plan": _pool_varlen(False, True),
    "pool_project_varlen": _pool_varlen(True, False),
    "pool_project_varlen_plan": _pool_varlen(True, True),
}
TRITON_ONLY = {"pool_project_fused"}  # fused=True is a Triton kernel


def _forward_backward(run, backend, inputs, grad=None):
    """Outputs (as a list) and the input gradients; ``grad``: the output gradient (drawn on the
    first run, reused on the second)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = run(backend, *leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grad is None:
        grad = torch.randn_like(outs[0])
    outs[0].backward(grad)
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], \
        [t.grad for t in leaves], grad


@pytest.mark.parametrize("default", DEFAULTS)
@pytest.mark.parametrize("case, backend", [
    pytest.param(case, "triton", marks=pytest.mark.triton, id=f"{case}-triton") for case in CASES
] + [pytest.param(case, "reference", id=f"{case}-reference") for case in CASES
     if case not in TRITON_ONLY])
def test_ops_do_not_depend_on_the_default_device(case, backend, default, device,
                                                  set_default_device):
    inputs, run = CASES[case](device)
    outs, grads, grad = _forward_backward(run, backend, inputs)
    set_default_device(default)
    got_outs, got_grads, _ = _forward_backward(run, backend, inputs, grad)
    set_default_device(None)
    for name, got, want in [*(("out", g, w) for g, w in zip(got_outs, outs)),
                            *((f"grad of input {i}", g, w)
                              for i, (g, w) in enumerate(zip(got_grads, grads)))]:
        if not isinstance(want, torch.Tensor):
            assert got == want, name
            continue
        assert got is not None and got.device == want.device, \
            f"{name}: on {None if got is None else got.device} under default {default}, " \
            f"on {want.device} without"
        assert torch.equal(got, want), f"{name} differs under default device {default}"


@pytest.mark.parametrize("default", DEFAULTS)
def test_plans_do_not_depend_on_the_default_device(default, device, set_default_device):
    """Every tensor of a plan: the device tables on the plan's device, the host tables
    (``meta_host``, ``extra``, pooling's ``cu_seqlens_out``) on the CPU, equal values."""
    def build():
        return [pk.plan_partial_global([0, 3, 8], [0, 7, 12], [2, 0], device=device),
                pk.plan_partial_global([0, 8, 10], [0, 20, 26], [6, 1], device=device,
                                       visual_grids=[(4, 5), (2, 3)],
                                       partial_grids=[(2, 3), (1, 1)], split_keys=16),
                pk.plan_band(torch.tensor([0, 4, 9], device="cpu"), device=device),
                pk.plan_band([0, 4, 9], windows=[(2, 0), (1, 2)], device=device),
                pk.plan_pool([0, 6, 15], [(2, 3), (3, 3)], (2, 2), device=device)]
    want = build()
    set_default_device(default)
    got = build()
    set_default_device(None)
    for g, w in zip(got, want):
        for field in ("meta", "meta_host", "extra", "in_token", "out_token", "cu_seqlens_out"):
            a, b = getattr(g, field), getattr(w, field)
            if b is None:
                assert a is None, field
                continue
            assert a.device == b.device and a.dtype == b.dtype and torch.equal(a, b), field
        assert w.meta.device.type == torch.device(device).type
        assert w.meta_host.device.type == w.extra.device.type == "cpu"
        assert (g.kind, g.windows) == (w.kind, w.windows)


@pytest.mark.triton
@pytest.mark.parametrize("default", DEFAULTS)
def test_varlen_launchers_do_not_depend_on_the_default_device(default, device,
                                                              set_default_device):
    """The varlen attention launchers called directly, as the benchmarks and work models do
    (inside the registered ops torch's default device does not apply): fp32 forward and
    backward (the backward's delta schedule is a table they build)."""
    from pargo_kernels.ops import varlen_triton
    plan = pk.plan_partial_global([0, 3, 8], [0, 7, 12], [2, 0], device=device)
    q, k, v = (_r(n, H, D, device=device) for n in (8, 12, 12))
    do = _r(8, H, D, device=device)

    def run():
        out, lse = varlen_triton.varlen_forward(q, k, v, plan, plan.kind, (0, 0), 0.25)
        return [out, lse, *varlen_triton.varlen_backward(do, q, k, v, out, lse, plan, plan.kind,
                                                         (0, 0), 0.25)]
    want = run()
    set_default_device(default)
    got = run()
    set_default_device(None)
    for g, w in zip(got, want):
        assert g.device == w.device and torch.equal(g, w)


# Tensor factories that take a device (and otherwise follow torch's default device).
FACTORIES = {"tensor", "as_tensor", "arange", "range", "linspace", "logspace", "zeros", "ones",
             "empty", "full", "eye", "rand", "randn", "randint", "randperm", "empty_strided",
             "tril_indices", "triu_indices", "scalar_tensor"}


def default_device_allocations(source: str) -> list[int]:
    """Lines of ``source`` calling a ``torch.<factory>`` without ``device=``; calls inside
    ``nn.Parameter(...)`` are allowed (module parameters follow the default device, as
    ``nn.Linear``'s do: ``with torch.device("meta")`` builds a model without memory)."""
    import ast
    tree = ast.parse(source)
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) == "Parameter":
            allowed |= {id(n) for n in ast.walk(node)}
    return sorted(node.lineno for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and id(node) not in allowed
                  and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                  and not any(kw.arg == "device" for kw in node.keywords))


# benchmarks/gpu_plan.py replaces torch's factories and layers by shape-only stand-ins on the
# CPU (it plans a GPU run without one): its factory calls are the stand-ins' own
_SCAN_EXEMPT = {os.path.join("benchmarks", "gpu_plan.py")}


def test_library_allocates_nothing_on_the_default_device():
    """pargo_kernels/, models/ (projectors, MLLM data / trainer / LLaVA interop, the digits
    study) and benchmarks/ give every tensor factory its device: a collator's batch, a sampler's
    permutation or a study's data do not land on a CUDA default device."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for top in ("pargo_kernels", "models", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and os.path.relpath(path, root) not in _SCAN_EXEMPT:
                    with open(path) as f:
                        offenders += [f"{os.path.relpath(path, root)}:{line}"
                                      for line in default_device_allocations(f.read())]
    assert not offenders, f"tensor factories without device= (default device): {offenders}"


@pytest.mark.parametrize("source, lines", [
    ("x = torch.tensor(rows, dtype=torch.int64)", [1]),
    ("x = torch.zeros(3, device=d)", []),
    ("p = nn.Parameter(torch.empty(1, 4))", []),
    ("p = torch.nn.Parameter(torch.zeros(2))\ny = torch.arange(5)", [2]),
    ("t = torch.from_numpy(a)", []),
])
def test_default_device_allocation_detector(source, lines):
    assert default_device_allocations(source) == lines


@pytest.mark.parametrize("default", DEFAULTS)
@pytest.mark.parametrize("cfg_id", ["pargo-2d-official", "pargo-1d-cascade-causal", "qformer",
                                    "deco", "cabstractor"])
def test_projectors_do_not_depend_on_the_default_device(cfg_id, default, device,
                                                        set_default_device):
    """The projectors' kernel path (models/projectors/), one image batch and a packed batch of
    mixed grids (the plans built inside), built with the default device untouched: output, the
    input's and every parameter's gradient bitwise equal under another default device. On
    pargo_kernels' reference backend: the Triton kernels' own independence is the ops test's
    (under the interpreter these projectors cost ~1 min)."""
    from test_projectors_packed import BASE, CONFIGS, MIXED, _perturbed
    name, cfg = CONFIGS[cfg_id]
    proj = _perturbed(name, cfg, torch.float32, backend="reference").to(device)
    fixed = torch.randn(2, BASE[0] * BASE[1], 8, device=device)
    packed = torch.randn(sum(r * c for r, c in MIXED), 8, device=device)

    def run():
        results = []
        for x, kw in ((fixed, {}), (packed, dict(visual_grids=MIXED))):
            x = x.detach().clone().requires_grad_(True)
            proj.zero_grad(set_to_none=True)
            y = proj(x, impl="kernels", **kw)
            y = y[0] if isinstance(y, tuple) else y
            y.square().sum().backward()
            results += [y.detach(), x.grad] + [p.grad for p in proj.parameters()]
        return results
    want = run()
    set_default_device(default)
    got = run()
    set_default_device(None)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.device == w.device and torch.equal(g, w), f"result {i} under default {default}"


@pytest.mark.parametrize("default", DEFAULTS)
def test_collator_and_sampler_do_not_depend_on_the_default_device(default, set_default_device):
    """The MLLM trainer's CPU-side pieces: the collator's batch (fixed and native-size images)
    and the modality-grouped order are the same CPU tensors / indices under another default
    device (a batch on ``meta`` has no values; a sampler drawing there fails)."""
    from models.mllm.data import Collator
    from models.mllm.trainer import modality_grouped_indices
    lens = torch.randint(3, 9, (3,), device="cpu").tolist()

    def items(native):
        out = []
        for n in lens:
            ids = torch.randint(5, 100, (n,), device="cpu").tolist()
            it = {"input_ids": ids, "labels": [-100] + ids[1:]}
            if native:
                it.update(pixel_values=[torch.randn(3, 4, 6, device="cpu")],
                          visual_grids=[(2, 3)])
            else:
                it["pixel_values"] = torch.randn(3, 4, 4, device="cpu")
            out.append(it)
        return out

    seed = int(torch.randint(0, 10 ** 6, (), device="cpu"))
    lengths = [n if i % 3 else -n for i, n in enumerate(torch.randint(
        1, 50, (23,), device="cpu").tolist())]
    batches = [items(False), items(True)]
    ref = [Collator(0, side)(b) for b in batches for side in ("right", "left")]
    ref_order = modality_grouped_indices(lengths, 4, torch.Generator().manual_seed(seed))
    set_default_device(default)
    got = [Collator(0, side)(b) for b in batches for side in ("right", "left")]
    assert modality_grouped_indices(
        lengths, 4, torch.Generator(device="cpu").manual_seed(seed)) == ref_order
    for r, g in zip(ref, got):
        assert set(r) == set(g)
        for k, v in r.items():
            if isinstance(v, torch.Tensor):
                assert g[k].device.type == "cpu" and torch.equal(g[k], v), k
