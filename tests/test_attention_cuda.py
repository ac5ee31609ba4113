"""The hand-written CUDA attention kernels (csrc/attention_*.cu, ``backend="cuda"``) against the
float64 oracle, forward and all gradients: the oracle cases of tests/test_attention.py, run on
fp16 and bf16 with the head dims the kernels are built for (64, 128).

GPU-only: skipped, with the reason, when there is no CUDA device, the extension
``pargo_kernels._C`` is not built (``PARGO_BUILD_CUDA=1 pip install --no-build-isolation
--no-deps -e .``) or the device is older than sm_80. The CPU-side refusals of the dispatcher are
tested in tests/test_masks_and_errors.py.
"""
import pytest
import torch

import pargo_kernels as pk
from pargo_kernels import _cuda
from pargo_kernels.masks import BandMask, PartialGlobalMask
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import assert_close, randn, run_with_grads
from test_attention import BAND_CASES, PG_CASES, _check


def _skip_reason() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    why = _cuda.cuda_extension_reasons([torch.empty(0, device="cuda")])
    if why:
        return "; ".join(why)
    if torch.cuda.get_device_capability() < (8, 0):
        return "the CUDA attention kernels need sm_80 or newer"
    return ""


_WHY = _skip_reason()
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "runs")

DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def poison_allocator():
    """Best-effort NaN poison: the extension allocates with at::empty, which reuses the caching
    allocator's freed blocks, so fill blocks of the sizes the tests use with NaN and free them
    first; an element a kernel fails to write then most likely reads back as NaN."""
    blocks = [torch.full((n,), float("nan"), device=DEVICE, dtype=torch.float32)
              for n in [2**16] * 8 + [2**20] * 4 + [2**24] * 2]
    del blocks
    yield


def _pg(mask):
    def op(q, k, v, be):
        return pk.partial_global_attention(q, k, v, mask.n_partial, visual_grid=mask.visual_grid,
                                           partial_grid=mask.partial_grid, backend=be)
    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(PG_CASES))
def test_partial_global_cuda_matches_oracle(case, dtype):
    nq, nv, np_, vgrid, pgrid = PG_CASES[case]
    mask = PartialGlobalMask(nq, nv, np_, vgrid, pgrid)
    B, H = (1, 2) if nq * nv > 50_000 else (2, 3)
    _check(_pg(mask), mask, B, H, 64, 64, dtype, DEVICE, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(BAND_CASES))
def test_band_cuda_matches_oracle(case, dtype):
    n, window = BAND_CASES[case]
    mask = BandMask(n, *window)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, window, backend=be), mask, 2, 2, 64,
           64, dtype, DEVICE, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["paper-288+16x576", "np-not-dividing-nv", "np0-plain-cross",
                                  "ng0-block-diagonal", "2d-uneven-5x7-3x2",
                                  "2d-overlap-4x4-3x5"])
def test_head_dim_128(case, dtype):
    nq, nv, np_, vgrid, pgrid = PG_CASES[case]
    mask = PartialGlobalMask(nq, nv, np_, vgrid, pgrid)
    _check(_pg(mask), mask, 1, 2, 128, 128, dtype, DEVICE, "cuda")
    band = BandMask(77, 3, 7)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, (3, 7), backend=be), band, 1, 2, 128,
           128, dtype, DEVICE, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [64, 128])
def test_noncontiguous_layouts(D, dtype):
    """[B, N, H, D] views (16-byte vector loads still possible) on every mask kind."""
    for mask in (PartialGlobalMask(40, 97, 31), PartialGlobalMask(16, 35, 12, (5, 7), (4, 3))):
        _check(_pg(mask), mask, 1, 2, D, D, dtype, DEVICE, "cuda", layout="bnhd")
    band = BandMask(70, 5, 2)
    _check(lambda q, k, v, be: pk.band_attention(q, k, v, (5, 2), backend=be), band, 1, 2, D, D,
           dtype, DEVICE, "cuda", layout="bnhd")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_head_dim_and_misaligned_inputs(dtype):
    """Column stride != 1 and a base pointer off the 16-byte grid: the scalar load path."""
    mask = PartialGlobalMask(21, 40, 17)
    B, H, D = 1, 2, 64

    def strided(n):  # [B, H, D, N] transposed: stride 1 along N, stride N along D
        return torch.randn(B, H, D, n, device=DEVICE).to(dtype).transpose(2, 3)

    def misaligned(n):  # one element into a larger buffer
        return torch.randn(B * H * n * D + 1, device=DEVICE).to(dtype)[1:].view(B, H, n, D)

    for make in (strided, misaligned):
        q, k, v = (make(n).requires_grad_() for n in (21, 40, 40))
        grad = torch.randn(B, H, 21, D, device=DEVICE).to(dtype)
        out, grads = run_with_grads(lambda a, b, c: _pg(mask)(a, b, c, "cuda"), (q, k, v), grad)
        ref, ref_grads = run_with_grads(
            lambda a, b, c: masked_attention(a, b, c, mask.materialize(DEVICE), D ** -0.5),
            (q, k, v), grad, torch.float64)
        assert_close("out", out, ref, dtype)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(name, g, r, dtype)


def test_custom_scale():
    mask = PartialGlobalMask(12, 30, 10)
    _check(lambda q, k, v, be: pk.partial_global_attention(q, k, v, 10, scale=0.3, backend=be),
           mask, 1, 2, 64, 64, torch.bfloat16, DEVICE, "cuda", scale=0.3)


def test_batch_heads_above_grid_limit():
    """B * H on the grid's x axis: more than 65,535 (batch, head) pairs."""
    mask = PartialGlobalMask(6, 8, 4)
    _check(_pg(mask), mask, 65_537, 1, 64, 64, torch.float16, DEVICE, "cuda")


def test_paper_shape_full_batch():
    mask = PartialGlobalMask(304, 576, 288)
    for dtype in DTYPES:
        _check(_pg(mask), mask, 256, 8, 64, 64, dtype, DEVICE, "cuda")


@pytest.mark.gpu(reason="compares with the compiled Triton kernels on the same CUDA tensors")
def test_cuda_agrees_with_triton():
    """Same statistics (base-2 lse) and outputs as the Triton backend, to rounding."""
    mask = PartialGlobalMask(150, 333, 144, None, None)
    q, k, v = (randn((2, 3, n, 64), torch.bfloat16, DEVICE, requires_grad=False)
               for n in (150, 333, 333))
    op = torch.ops.pargo.masked_attention_fwd
    out_c, lse_c = op(q, k, v, mask.kind, list(mask.params), 0.125, "cuda")
    out_t, lse_t = op(q, k, v, mask.kind, list(mask.params), 0.125, "triton")
    assert torch.allclose(lse_c, lse_t, atol=1e-3, rtol=1e-3)
    assert_close("out", out_c, out_t.double(), torch.bfloat16)


def test_gpu_refusals_name_the_reason():
    q = torch.randn(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="fp32 uses the Triton backend"):
        pk.partial_global_attention(q, q, q, 4, backend="cuda")
    q = torch.randn(1, 2, 8, 80, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 80 is not supported"):
        pk.band_attention(q, q, q, (1, 1), backend="cuda")
    q = torch.randn(1, 2, 8, 64, device=DEVICE, dtype=torch.float16)
    v = torch.randn(1, 2, 8, 128, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="Dv = 128 differs"):
        pk.partial_global_attention(q, q, v, 4, backend="cuda")

