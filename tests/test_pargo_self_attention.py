"""ParGo's whole self-attention in one op (``pargo_self_attention``, mask kind
``KIND_PARGO_SELF``) against the float64 oracle, forward and every gradient.

Partial rows ``[0, Np)`` see a band of partial keys, global rows ``[Np, N)`` the global keys.
The cases put ``Np`` inside a key tile (so key tiles straddle the boundary in dK/dV and query
windows end mid-tile), cover ``Np = 0`` (full attention), ``Np = N`` (pure band), windows wider
than ``Np`` and ``window=None`` (the released code's static mask). Outputs are NaN-poisoned
(the fixture of tests/test_attention.py) so an unwritten element fails.
"""
import pytest
import torch

import pargo_kernels as pk
from pargo_kernels.masks import KIND_PARGO_SELF, ParGoSelfMask
from pargo_kernels.ops import attention_triton
from pargo_kernels.testing import assert_close, randn
from test_attention import _check, poison_outputs  # noqa: F401 (autouse NaN poison)
from test_attention_cuda import _WHY as CUDA_WHY

BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "reference"]


def _op(mask, scale=None):
    window = None if mask.left is None else (mask.left, mask.right)
    return lambda q, k, v, be: pk.pargo_self_attention(q, k, v, mask.n_partial, window,
                                                       scale=scale, backend=be)


CASES = {
    # id: (N, n_partial, window)
    "straddle-37-of-70-asym-3-7": (70, 37, (3, 7)),
    "released-static-none": (70, 45, None),
    "np0-full-attention": (45, 0, None),
    "np0-window-ignored": (33, 0, (2, 1)),
    "npN-pure-band": (50, 50, (4, 2)),
    "wider-than-np": (60, 21, (30, 1000)),
    "self-only-0-0": (40, 33, (0, 0)),
    "one-global": (40, 39, (5, 0)),
    "cascade-l1-144+16": (160, 144, pk.cascade_windows(144, 6)[0]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(case, backend, device):
    n, np_, window = CASES[case]
    mask = ParGoSelfMask(n, np_, *(window or (None, None)))
    _check(_op(mask), mask, 2, 2, 32, 32, torch.float32, device, backend)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["d80-strided", "dv-differs"])
def test_dtypes_head_dims_and_strides(variant, dtype, device):
    if variant == "d80-strided":  # [B, N, H, D].transpose(1, 2) views
        mask, D, Dv, layout = ParGoSelfMask(70, 41, 6, 3), 80, 80, "bnhd"
    else:
        mask, D, Dv, layout = ParGoSelfMask(48, 29), 16, 48, "bhnd"
    _check(_op(mask), mask, 1, 2, D, Dv, dtype, device, "triton", layout)


@pytest.mark.triton
def test_custom_scale(device):
    mask = ParGoSelfMask(30, 20, 2, 2)
    _check(_op(mask, 0.3), mask, 1, 2, 32, 32, torch.float32, device, "triton", scale=0.3)


@pytest.mark.triton
def test_equals_band_plus_full_attention(device):
    """The one-launch op is the two-launch composition it replaces (band among partials, full
    attention among globals, concatenated)."""
    q, k, v = (randn((2, 2, 50, 32), torch.float32, device, requires_grad=False)
               for _ in range(3))
    one = pk.pargo_self_attention(q, k, v, 38, (5, 0), backend="triton")
    part = pk.band_attention(q[:, :, :38], k[:, :, :38], v[:, :, :38], (5, 0), backend="triton")
    glob = pk.band_attention(q[:, :, 38:], k[:, :, 38:], v[:, :, 38:], (11, 11), backend="triton")
    assert_close("one launch vs two", one, torch.cat([part, glob], 2).double(), torch.float32)


def test_masks_validate_and_render():
    m = ParGoSelfMask(7, 5, 1, 0)
    assert m.kind == KIND_PARGO_SELF and m.params == (5, 1, 0, 0, 0)
    assert ParGoSelfMask(7, 5).params == (5, 4, 4, 0, 0)  # None: every partial key
    assert ParGoSelfMask(7, 5, 100, 9).params == (5, 4, 4, 0, 0)  # clipped
    assert ParGoSelfMask(7, 0).params == (0, 0, 0, 0, 0)
    dense = m.materialize()
    assert dense[:5, 5:].sum() == 0 and dense[5:, :5].sum() == 0  # nothing crosses
    assert dense[5:, 5:].all() and dense.diagonal().all()
    assert torch.equal(dense[:5, :5], pk.BandMask(5, 1, 0).materialize())


def _recording(monkeypatch):
    """Wrap the three attention kernels to record the compile-time (constexpr) arguments of
    every launch; under the interpreter nothing is compiled, so this is what a GPU would
    specialise on (besides the do_not_specialize'd ints)."""
    seen = []
    no_spec = {"P0", "P1", "P2", "P3", "P4"}

    class Rec:
        def __init__(self, name):
            self.name, self.kern = name, getattr(attention_triton, name)

        def __getitem__(self, grid):
            def launch(*args, **kw):
                consts = {k: v for k, v in kw.items() if k not in no_spec and "scale" not in k}
                seen.append((self.name, tuple(sorted(consts.items()))))
                return self.kern[grid](*args, **kw)
            return launch

    for name in ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"):
        monkeypatch.setattr(attention_triton, name, Rec(name))
    return seen


@pytest.mark.triton
def test_window_is_runtime_no_recompilation(device, monkeypatch):
    """A new window per layer (and a new n_partial) compiles nothing new: the window reaches the
    kernels only through P0..P2, which are do_not_specialize'd, so every launch's compile-time
    arguments are identical across windows."""
    for kern in (attention_triton._attn_fwd_kernel, attention_triton._attn_bwd_dq_kernel,
                 attention_triton._attn_bwd_dkdv_kernel):
        no_spec = getattr(kern, "do_not_specialize", None) or kern.kwargs["do_not_specialize"]
        assert {"P0", "P1", "P2", "Nq", "Nv", "H"} <= set(no_spec)
    seen = _recording(monkeypatch)
    x = randn((1, 1, 40, 16), torch.float32, device)
    for np_, window in [(32, (3, 0)), (32, (15, 0)), (30, (31, 31)), (32, None), (25, (2, 9))]:
        pk.pargo_self_attention(x, x, x, np_, window, backend="triton").sum().backward()
    assert len(seen) == 15
    assert len(set(seen)) == 3, set(seen)  # one specialisation per kernel


@pytest.mark.triton
def test_opcheck(device):
    mask = ParGoSelfMask(21, 13, 4, 2)
    q, k = (randn((2, 2, 21, 16), torch.float32, device) for _ in range(2))
    v = randn((2, 2, 21, 24), torch.float32, device)
    args = (q, k, v, mask.kind, list(mask.params), 0.25, "triton")
    torch.library.opcheck(torch.ops.pargo.masked_attention_fwd.default, args)
    out, lse = torch.ops.pargo.masked_attention_fwd(*args)
    torch.library.opcheck(torch.ops.pargo.masked_attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, *args[3:]))


class TwoLayerSelfAttention(torch.nn.Module):
    """Two ParGo self-attention layers with different (cascaded) windows."""

    def __init__(self, n, n_partial, width, heads, windows):
        super().__init__()
        self.n_partial, self.heads, self.windows = n_partial, heads, windows
        self.queries = torch.nn.Parameter(torch.randn(n, width))
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in windows)

    def forward(self, batch: int):
        x = self.queries.expand(batch, -1, -1)
        for qkv, window in zip(self.qkv, self.windows):
            b, n, c = x.shape
            q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                       for t in qkv(x).chunk(3, dim=-1))
            out = pk.pargo_self_attention(q, k, v, self.n_partial, window, backend="triton")
            x = x + out.transpose(1, 2).reshape(b, n, c)
        return x


@pytest.mark.triton
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    model = TwoLayerSelfAttention(20, 14, 32, 2, [(3, 0), None]).to(device)
    eager = model(2)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(2)
    out.square().sum().backward()
    assert_close("compiled out", out, eager, torch.float32)
    for (name, p), g in zip(model.named_parameters(), eager_grads):
        assert_close(f"compiled grad {name}", p.grad, g, torch.float32)


BAD = [
    # (n_partial, window, exception, message)
    (11, None, ValueError, r"n_partial \(11\) must be <= the number of tokens N \(10\)"),
    (-1, None, ValueError, "n_partial must be >= 0"),
    (True, None, TypeError, "n_partial must be an int"),
    (4.0, None, TypeError, "n_partial must be an int"),
    (4, (1,), TypeError, "window must be None or a pair"),
    (4, 3, TypeError, "window must be None or a pair"),
    (4, (1, None), TypeError, "window must be None or a pair of ints"),
    (4, (-1, 0), ValueError, r"window\[0\] \(left\) must be >= 0"),
    (4, (0, -2), ValueError, r"window\[1\] \(right\) must be >= 0"),
    (4, (0, 1.5), TypeError, r"window\[1\] \(right\) must be an int"),
]


@pytest.mark.parametrize("n_partial, window, exc, msg", BAD)
def test_bad_arguments_name_the_argument(n_partial, window, exc, msg):
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(exc, match=msg):
        pk.pargo_self_attention(x, x, x, n_partial, window)


def test_bad_tensors_name_the_argument():
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="self-attention: k has 12 tokens but q has 10"):
        pk.pargo_self_attention(x, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), 4)
    with pytest.raises(ValueError, match="v must have 4 dimensions"):
        pk.pargo_self_attention(x, x, x[0], 4)
    with pytest.raises(TypeError, match="k has dtype torch.float16"):
        pk.pargo_self_attention(x, x.half(), x, 4)
    with pytest.raises(TypeError, match="scale must be a real number"):
        pk.pargo_self_attention(x, x, x, 4, scale="1")
    with pytest.raises(ValueError, match="backend"):
        pk.pargo_self_attention(x, x, x, 4, backend="nope")


@pytest.mark.skipif(bool(CUDA_WHY), reason=CUDA_WHY or "runs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_backend_matches_oracle(case, head_dim, dtype):
    n, np_, window = CASES[case]
    mask = ParGoSelfMask(n, np_, *(window or (None, None)))
    _check(_op(mask), mask, 2, 2, head_dim, head_dim, dtype, "cuda", "cuda", "bnhd")
