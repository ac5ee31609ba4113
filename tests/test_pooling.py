"""Adaptive average pooling of tokens (+ fused projection) against the float64 oracle, forward
and all gradients (dx, dweight, dbias).

The oracle is ``F.adaptive_avg_pool2d`` (+ ``F.linear``) in float64 on the very same rounded
inputs. The "triton" backend runs the real kernels (under the Triton interpreter on a CPU-only
machine, on the GPU otherwise); "cuda" runs csrc/pool_tokens.cu when a GPU and the built
extension exist; "reference" is eager PyTorch. Every case draws fresh random inputs; outputs and
workspaces are allocated NaN-filled so an unwritten element fails.
"""
import pytest
import torch
import torch.nn.functional as F

import pargo_kernels as pk
from pargo_kernels import _cuda
from pargo_kernels.ops import pool_triton
from pargo_kernels.pooling import pool_project_reference, pool_tokens_reference
from pargo_kernels.testing import assert_close, randn, rel_error, run_with_grads

_CUDA_WHY = "; ".join(_cuda.cuda_extension_reasons(
    [torch.empty(0, device="cuda")] if torch.cuda.is_available() else [torch.empty(0)]))
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "reference",
            pytest.param("cuda", marks=pytest.mark.skipif(bool(_CUDA_WHY), reason=_CUDA_WHY))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

GRIDS = {
    # id: (in_grid, out_grid, C)
    "24-12": ((24, 24), (12, 12), 40),
    "27-12-overlap": ((27, 27), (12, 12), 72),
    "24-7": ((24, 24), (7, 7), 40),
    "5x7-3x2": ((5, 7), (3, 2), 72),
    "16-16-identity": ((16, 16), (16, 16), 40),
    "24-1": ((24, 24), (1, 1), 40),
}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(pool_triton, "_empty", nan_empty)


def _tokens(B, in_grid, C, dtype, device, contiguous=True):
    """Fresh ``[B, Hin*Win, C]``; non-contiguous: the channels-first ``[B, C, N]`` transposed."""
    n = in_grid[0] * in_grid[1]
    if contiguous:
        return randn((B, n, C), dtype, device, requires_grad=False)
    return randn((B, C, n), dtype, device, requires_grad=False).transpose(1, 2)


def _check_pool(in_grid, out_grid, C, dtype, device, backend, B=2, contiguous=True):
    x = _tokens(B, in_grid, C, dtype, device, contiguous)
    n_out = out_grid[0] * out_grid[1]
    grad = torch.randn(B, n_out, C, device=device).to(dtype)
    out, (dx,) = run_with_grads(
        lambda a: pk.adaptive_avg_pool_tokens(a, in_grid, out_grid, backend=backend), (x,), grad)
    ref, (ref_dx,) = run_with_grads(lambda a: pool_tokens_reference(a, in_grid, out_grid), (x,),
                                    grad, torch.float64)
    assert out.dtype == dtype and out.shape == (B, n_out, C)
    assert_close("out", out, ref, dtype)
    assert dx.dtype == dtype
    assert_close("dx", dx, ref_dx, dtype)


def _check_project(in_grid, out_grid, C, NF, dtype, device, backend, B=2, bias=True,
                   contiguous=True, fused=None, bias_layout="contiguous"):
    x = _tokens(B, in_grid, C, dtype, device, contiguous)
    w = randn((NF, C), dtype, device, requires_grad=False) * C ** -0.5
    inputs = [x, w] + ([_bias(NF, dtype, device, bias_layout)] if bias else [])
    n_out = out_grid[0] * out_grid[1]
    grad = torch.randn(B, n_out, NF, device=device).to(dtype)

    def ours(a, weight, *b):
        return pk.adaptive_avg_pool_project(a, weight, *b, in_grid=in_grid, out_grid=out_grid,
                                            backend=backend, fused=fused)

    def oracle(a, weight, *b):
        return pool_project_reference(a, weight, b[0] if b else None, in_grid, out_grid)
    out, grads = run_with_grads(ours, inputs, grad)
    ref, ref_grads = run_with_grads(oracle, inputs, grad, torch.float64)
    assert out.dtype == dtype and out.shape == (B, n_out, NF)
    assert_close("out", out, ref, dtype)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(name, g, r, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GRIDS))
def test_pool_tokens_matches_oracle(case, backend, device):
    in_grid, out_grid, C = GRIDS[case]
    _check_pool(in_grid, out_grid, C, torch.float32, device, backend)


def _bias(NF, dtype, device, layout):
    """Fresh bias ``[NF]``: contiguous, every other element of a ``[2*NF]`` buffer, or one value
    expanded (stride 0)."""
    if layout == "contiguous":
        return randn((NF,), dtype, device, requires_grad=False)
    if layout == "strided":
        return randn((2 * NF,), dtype, device, requires_grad=False)[::2]
    assert layout == "expanded"
    return randn((1,), dtype, device, requires_grad=False).expand(NF)


# (backend, fused): the default Triton path (pool kernel + F.linear), the fused kernel, eager
PATHS = [pytest.param("triton", None, marks=pytest.mark.triton, id="triton"),
         pytest.param("triton", True, marks=pytest.mark.triton, id="triton-fused"),
         pytest.param("reference", None, id="reference")]


@pytest.mark.parametrize("backend, fused", PATHS)
@pytest.mark.parametrize("case", list(GRIDS))
def test_pool_project_matches_oracle(case, backend, fused, device):
    in_grid, out_grid, C = GRIDS[case]
    _check_project(in_grid, out_grid, C, 48, torch.float32, device, backend, fused=fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_tokens_dtypes_noncontiguous(dtype, backend, device):
    _check_pool((27, 27), (12, 12), 72, dtype, device, backend, contiguous=False)


@pytest.mark.triton
@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pool_project_dtypes_noncontiguous(dtype, fused, device):
    _check_project((27, 27), (12, 12), 72, 40, dtype, device, "triton", contiguous=False,
                   fused=fused)


@pytest.mark.triton
@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pool_project_without_bias(dtype, fused, device):
    _check_project((5, 7), (3, 2), 40, 24, dtype, device, "triton", B=3, bias=False,
                   fused=fused)


@pytest.mark.triton
@pytest.mark.parametrize("fused", [None, True], ids=["default", "fused"])
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_pool_project_bias_strides(layout, fused, device):
    """A bias view with stride 2 or 0: forward and every gradient against float64."""
    _check_project((5, 7), (3, 2), 40, 72, torch.float32, device, "triton", B=3, fused=fused,
                   bias_layout=layout)


def _pool_matrix(in_grid, out_grid):
    """``[Nout, Nin]`` float64 pooling weights: the reference applied to the identity."""
    n = in_grid[0] * in_grid[1]
    return pool_tokens_reference(torch.eye(n, dtype=torch.float64)[None], in_grid, out_grid)[0]


ZERO_SIZES = {"B=0": (0, 24, 16), "C=0": (2, 0, 16), "NF=0": (2, 24, 0)}


@pytest.mark.parametrize("backend, fused", PATHS[:2])
@pytest.mark.parametrize("case", list(ZERO_SIZES))
def test_zero_sizes(case, backend, fused, device):
    """Empty batch / channels / out-features: the right (possibly empty) outputs and grads.
    The oracle is a float64 einsum with the pooling matrix (F.adaptive_avg_pool2d's backward
    rejects C=0); with C=0 the output is the bias and dbias is still sum(dY)."""
    B, C, NF = ZERO_SIZES[case]
    in_grid, out_grid = (3, 4), (2, 2)
    pm = _pool_matrix(in_grid, out_grid).to(device)
    x = randn((B, 12, C), torch.float32, device, requires_grad=False)
    w = randn((NF, C), torch.float32, device, requires_grad=False)
    b = randn((NF,), torch.float32, device, requires_grad=False)
    grad = torch.randn(B, 4, NF, device=device)
    out, grads = run_with_grads(lambda *a: pk.adaptive_avg_pool_project(
        a[0], a[1], a[2], in_grid=in_grid, out_grid=out_grid, backend=backend, fused=fused),
        (x, w, b), grad)
    ref, ref_grads = run_with_grads(
        lambda a, wt, bs: torch.einsum("on,bnc,fc->bof", pm, a, wt) + bs, (x, w, b), grad,
        torch.float64)
    grad_pooled = torch.randn(B, 4, C, device=device)
    pooled, (dx,) = run_with_grads(
        lambda a: pk.adaptive_avg_pool_tokens(a, in_grid, out_grid, backend=backend), (x,),
        grad_pooled)
    ref_pooled, (ref_dx,) = run_with_grads(
        lambda a: torch.einsum("on,bnc->boc", pm, a), (x,), grad_pooled, torch.float64)
    for name, got, want in [("out", out, ref), ("pooled", pooled, ref_pooled),
                            ("pool dx", dx, ref_dx),
                            *zip(("dx", "dweight", "dbias"), grads, ref_grads)]:
        assert got is not None and got.shape == want.shape, name
        if want.numel():
            assert_close(name, got, want, torch.float32)


@pytest.mark.triton
def test_upsampling_grid(device):
    """Out grid larger than the in grid (every input token feeds several output cells)."""
    _check_pool((4, 5), (6, 7), 24, torch.float32, device, "triton")


@pytest.mark.triton
def test_tolerance_discriminates_a_wrong_window(device):
    """floor/floor windows (a plausible bug) instead of floor/ceil differ far above tolerance."""
    x = _tokens(2, (27, 27), 16, torch.float32, device)
    out = pk.adaptive_avg_pool_tokens(x, (27, 27), (12, 12), backend="triton")
    img = x.transpose(1, 2).reshape(2, 16, 27, 27).double()
    wrong = torch.stack([torch.stack([
        img[:, :, (i * 27) // 12:((i + 1) * 27) // 12, (j * 27) // 12:((j + 1) * 27) // 12]
        .mean((2, 3)) for j in range(12)], -1) for i in range(12)], -2).flatten(2).transpose(1, 2)
    assert rel_error(out, pool_tokens_reference(x.double(), (27, 27), (12, 12))) < 2e-5
    assert rel_error(out, wrong) > 100 * 2e-5


@pytest.mark.triton
def test_unwritten_output_is_caught(device, monkeypatch):
    """If a launcher skipped a tile, the NaN poison would surface: drop the last row tile."""
    x = _tokens(1, (24, 24), 40, torch.float32, device)
    real = pool_triton.launch_grid
    monkeypatch.setattr(pool_triton, "launch_grid", lambda *a: (real(*a)[0] - 1, real(*a)[1]))
    out = pk.adaptive_avg_pool_tokens(x, (24, 24), (12, 12), backend="triton")
    assert torch.isnan(out).any()
    assert rel_error(out, pool_tokens_reference(x, (24, 24), (12, 12))) == float("inf")


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_tile_configs(dtype, device, monkeypatch):
    """The interpreter normally gets larger tiles (see pool_config); run the GPU's tiles too."""
    pool_cfg, gemm_cfg = pool_triton.pool_config, pool_triton.gemm_config
    monkeypatch.setattr(pool_triton, "pool_config", lambda c, interpret=False: pool_cfg(c))
    monkeypatch.setattr(pool_triton, "gemm_config", lambda d, interpret=False: gemm_cfg(d))
    _check_project((5, 7), (3, 2), 40, 24, dtype, device, "triton", B=3, fused=True)
    _check_pool((9, 7), (4, 3), 24, dtype, device, "triton")


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
@pytest.mark.triton
def test_opcheck(device):
    x = _tokens(2, (5, 7), 24, torch.float32, device).requires_grad_()
    w = randn((16, 24), torch.float32, device)
    b = randn((16,), torch.float32, device)
    dy = torch.randn(2, 6, 24, device=device)
    dyp = torch.randn(2, 6, 16, device=device)
    grids = ([5, 7], [3, 2])
    torch.library.opcheck(torch.ops.pargo.pool_tokens_fwd.default, (x, *grids, "triton"))
    torch.library.opcheck(torch.ops.pargo.pool_tokens_bwd.default, (dy, *grids, "triton"))
    torch.library.opcheck(torch.ops.pargo.pool_project_fwd.default, (x, w, b, *grids, "triton"))
    torch.library.opcheck(torch.ops.pargo.pool_project_fwd.default,
                          (x, w, None, *grids, "triton"))
    torch.library.opcheck(torch.ops.pargo.pool_project_bwd.default,
                          (dyp, x.detach(), w.detach(), True, *grids, "triton"))


@pytest.mark.triton
def test_torch_compile_fullgraph(device):
    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 16)

        def forward(self, x):
            pooled = pk.adaptive_avg_pool_tokens(x, (5, 7), (3, 2), backend="triton")
            return pk.adaptive_avg_pool_project(x, self.proj.weight, self.proj.bias,
                                                in_grid=(5, 7), out_grid=(3, 2),
                                                backend="triton") + pooled.sum(-1, keepdim=True)
    model = Projector().to(device)
    x = _tokens(2, (5, 7), 24, torch.float32, device).requires_grad_()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    ref = model(x.detach())
    assert_close("compiled", out, ref, torch.float32)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# dispatch and validation
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _CUDA_WHY, reason="the CUDA extension is built and usable here")
def test_cuda_backend_refuses_with_reason():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        pk.adaptive_avg_pool_tokens(x, (2, 2), (1, 1), backend="cuda")
    with pytest.raises(ValueError, match="Triton only"):
        pk.adaptive_avg_pool_project(x, torch.randn(3, 8), in_grid=(2, 2), out_grid=(1, 1),
                                     backend="cuda", fused=True)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        pk.adaptive_avg_pool_project(x, torch.randn(3, 8), in_grid=(2, 2), out_grid=(1, 1),
                                     backend="cuda")


def test_auto_on_cpu_is_reference_and_float64_works():
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    out = pk.adaptive_avg_pool_project(x, w, in_grid=(3, 4), out_grid=(2, 2))
    assert torch.allclose(out, F.linear(pool_tokens_reference(x, (3, 4), (2, 2)), w))
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        pk.adaptive_avg_pool_tokens(x, (3, 4), (2, 2), backend="triton")


@pytest.mark.parametrize("call, exc, match", [
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 3), (2, 2)), ValueError, "in_grid"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 4), (0, 2)), ValueError, "out_grid"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 4), 2), TypeError, "out_grid"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 4.0), (2, 2)), TypeError, r"in_grid\[1\]"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 4, 1), (2, 2)), TypeError, "in_grid"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x.long(), (3, 4), (2, 2)), TypeError, "x must"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x[0], (3, 4), (2, 2)), ValueError, "x must have 3"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x.numpy(), (3, 4), (2, 2)), TypeError, "x must"),
    (lambda x, w: pk.adaptive_avg_pool_tokens(x, (3, 4), (2, 2), backend="gpu"), ValueError,
     "backend"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w[:, :4], in_grid=(3, 4), out_grid=(2, 2)),
     ValueError, "in-features"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w.double(), in_grid=(3, 4), out_grid=(2, 2)),
     TypeError, "weight has dtype"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w, w[:, 0].half(), in_grid=(3, 4),
                                               out_grid=(2, 2)), TypeError, "bias has dtype"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w, torch.zeros(4), in_grid=(3, 4),
                                               out_grid=(2, 2)), ValueError, "bias has 4"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w, w, in_grid=(3, 4), out_grid=(2, 2)),
     ValueError, "bias must have 1"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w[0], in_grid=(3, 4), out_grid=(2, 2)),
     ValueError, "weight must have 2"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w.int(), in_grid=(3, 4), out_grid=(2, 2)),
     TypeError, "weight must be a floating"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w.to("meta"), in_grid=(3, 4),
                                               out_grid=(2, 2)), ValueError, "weight is on meta"),
    (lambda x, w: pk.adaptive_avg_pool_project(x, w, in_grid=(3, 4), out_grid=(2, 2),
                                               fused=1), TypeError, "fused must be a bool"),
], ids=["tokens-vs-in-grid", "grid-not-positive", "grid-not-pair", "grid-float", "grid-3",
        "x-integer", "x-2d", "x-numpy", "bad-backend", "weight-in-features", "weight-dtype",
        "bias-dtype", "bias-size", "bias-2d", "weight-1d", "weight-integer", "weight-device",
        "fused-not-bool"])
def test_validation(call, exc, match):
    x, w = torch.randn(2, 12, 6), torch.randn(5, 6)
    with pytest.raises(exc, match=match):
        call(x, w)


@pytest.mark.gpu(reason="SigLIP's full shape")
def test_siglip_shape_on_gpu():
    for dtype in (torch.bfloat16, torch.float16):
        _check_pool((27, 27), (12, 12), 1152, dtype, "cuda", "triton", B=16)
        _check_project((27, 27), (12, 12), 1152, 512, dtype, "cuda", "triton", B=16)
        _check_project((27, 27), (12, 12), 1152, 512, dtype, "cuda", "triton", B=16,
                       fused=True)


def test_aot_specs_per_arch_leave_out_fused_kernels_below_sm80():
    """sm_75 gets only the pooling kernels (the dispatcher refuses the fused ones there)."""
    names = lambda arch: {k.fn.__name__ for k, *_ in pool_triton.aot_specs(arch)}  # noqa: E731
    assert names(75) == {"_pool_fwd_kernel", "_pool_bwd_kernel"}
    assert names(80) == names(90) == names(None) >= {"_pool_proj_fwd_kernel",
                                                     "_pool_proj_dw_kernel",
                                                     "_pool_proj_dp_kernel"}


@pytest.mark.parametrize("capability, refused", [((7, 5), True), ((8, 6), False)])
def test_fused_refused_below_sm80(capability, refused, monkeypatch):
    """The capability check of the fused kernel (GPU simulated: no GPU needed)."""
    from types import SimpleNamespace

    from pargo_kernels import _backend, pooling
    monkeypatch.setattr(_backend, "triton_device_reasons", lambda tensors: [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = SimpleNamespace(dtype=torch.float16, is_cuda=True, device="cuda:0")
    why = pooling._triton_reasons(x, fused=True)
    assert bool(why) == refused and (not why or "sm_75" in why[0])
    assert pooling._triton_reasons(x, fused=False) == []


def test_fused_grid_limit_is_a_clear_error():
    """More row x feature tiles than a 1-D grid holds: a ValueError naming the way out."""
    with pytest.raises(ValueError, match=r"exceed the 2\*\*31 - 1 programs.*fused=False"):
        pool_triton.pool_project_fwd_plan(2**20, 64, 2**20, (1, 1), (64, 64), torch.bfloat16,
                                          True)
