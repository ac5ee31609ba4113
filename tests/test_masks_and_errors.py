"""Mask semantics checked against independent constructions, and input validation."""
import pytest
import torch
import torch.nn.functional as F

import pargo_kernels as pk
from pargo_kernels.masks import BandMask, PartialGlobalMask, ascii_mask


def official_pargo_mask(n_partial: int, n_global: int, n_visual: int) -> torch.Tensor:
    """The official code's construction (0/-inf additive, here as bool): partial query i sees
    chunk i of ``arange(Nv).reshape(Np, Nv // Np)``; global queries see everything."""
    index = torch.arange(n_visual).reshape(n_partial, n_visual // n_partial)
    mask = torch.zeros(n_partial + n_global, n_visual, dtype=torch.bool)
    for i in range(n_partial):
        mask[i, index[i]] = True
    mask[n_partial:] = True
    return mask


@pytest.mark.parametrize("np_, ng, nv", [(288, 16, 576), (4, 2, 8), (16, 0, 64), (1, 3, 5)])
def test_1d_mask_equals_official_construction(np_, ng, nv):
    assert torch.equal(PartialGlobalMask(np_ + ng, nv, np_).materialize(),
                       official_pargo_mask(np_, ng, nv))


@pytest.mark.parametrize("vgrid, pgrid", [((6, 6), (3, 3)), ((5, 7), (3, 2)), ((27, 27), (12, 12)),
                                          ((24, 24), (7, 7)), ((4, 4), (3, 5)), ((3, 3), (3, 3))])
def test_2d_windows_are_adaptive_avg_pool_windows(vgrid, pgrid):
    """Partial query (r, c) sees key (y, x) iff adaptive_avg_pool2d's output (r, c) reads (y, x):
    pooling the one-hot image of each key tells which outputs read it."""
    (hv, wv), (hp, wp) = vgrid, pgrid
    onehots = torch.eye(hv * wv, dtype=torch.float64).reshape(hv * wv, 1, hv, wv)
    reads = F.adaptive_avg_pool2d(onehots, (hp, wp)).reshape(hv * wv, hp * wp) > 0  # [Nv, Np]
    mask = PartialGlobalMask(hp * wp + 2, hv * wv, hp * wp, vgrid, pgrid).materialize()
    assert torch.equal(mask[: hp * wp], reads.T)
    assert mask[hp * wp:].all()


def test_band_mask_definition():
    n, left, right = 9, 2, 3
    expected = torch.tensor([[i - left <= j <= i + right for j in range(n)] for i in range(n)])
    assert torch.equal(BandMask(n, left, right).materialize(), expected)
    assert BandMask(5, 100, 100).materialize().all()
    assert BandMask(5, 100, 0).params[:2] == (4, 0)


def test_every_row_sees_a_key():
    for mask in (PartialGlobalMask(40, 40, 40), PartialGlobalMask(9, 35, 6, (5, 7), (3, 2)),
                 BandMask(7, 0, 0)):
        assert mask.materialize().any(dim=1).all()


def test_ascii_picture():
    assert ascii_mask(PartialGlobalMask(3, 4, 2).materialize()) == "##..\n..##\n####"


def test_cascade_windows():
    assert pk.cascade_windows(288, 6) == [(48 * l - 1, 0) for l in range(1, 7)]
    assert [a + b + 1 for a, b in pk.cascade_windows(288, 6, "symmetric")] == \
        [48 * l for l in range(1, 7)]
    assert pk.cascade_windows(288, 6, "symmetric")[0] == (24, 23)
    # ceil rounding: the last layer always sees everything, the first at least itself
    assert pk.cascade_windows(10, 4) == [(2, 0), (4, 0), (7, 0), (9, 0)]
    assert pk.cascade_windows(3, 5) == [(0, 0), (1, 0), (1, 0), (2, 0), (2, 0)]
    with pytest.raises(ValueError, match="mode"):
        pk.cascade_windows(8, 2, "wide")
    with pytest.raises(ValueError, match="n_layers"):
        pk.cascade_windows(8, 0)


def _qkv(nq=6, nv=8, d=16, **kw):
    q = torch.randn(2, 3, nq, d, **kw)
    return q, torch.randn(2, 3, nv, d, **kw), torch.randn(2, 3, nv, d, **kw)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(n_partial=7), ValueError, "n_partial .* Nq"),
    (dict(n_partial=-1), ValueError, "n_partial must be >= 0"),
    (dict(n_partial=2.0), TypeError, "n_partial must be an int"),
    (dict(n_partial=True), TypeError, "n_partial must be an int"),
    (dict(n_partial=4, visual_grid=(2, 4)), ValueError, "given together"),
    (dict(n_partial=4, visual_grid=(2, 3), partial_grid=(2, 2)), ValueError, "visual_grid 2x3"),
    (dict(n_partial=4, visual_grid=(2, 4), partial_grid=(1, 3)), ValueError, "partial_grid 1x3"),
    (dict(n_partial=4, visual_grid=(-2, -4), partial_grid=(2, 2)), ValueError, "positive"),
    (dict(n_partial=4, visual_grid=8, partial_grid=(2, 2)), TypeError, "pair"),
    (dict(n_partial=2, scale="x"), TypeError, "scale"),
    (dict(n_partial=2, backend="fast"), ValueError, "backend must be one of"),
    (dict(n_partial=2, backend="cuda"), ValueError, "backend 'cuda' cannot serve"),
])
def test_partial_global_argument_errors(kwargs, exc, pattern):
    q, k, v = _qkv()
    with pytest.raises(exc, match=pattern):
        pk.partial_global_attention(q, k, v, **kwargs)


def test_n_partial_above_nv_is_rejected():
    q, k, v = _qkv(nq=12, nv=8)
    with pytest.raises(ValueError, match=r"n_partial \(9\) must be <= the number of keys"):
        pk.partial_global_attention(q, k, v, 9)


def test_tensor_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        pk.partial_global_attention(q.numpy(), k, v, 2)
    with pytest.raises(TypeError, match="k must be a floating tensor"):
        pk.partial_global_attention(q, k.long(), v, 2)
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        pk.partial_global_attention(q, k, v.half(), 2)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        pk.partial_global_attention(q[0], k, v, 2)
    with pytest.raises(ValueError, match="batch and head"):
        pk.partial_global_attention(q, k[:1], v[:1], 2)
    with pytest.raises(ValueError, match="k head dim 8 must equal q head dim 16"):
        pk.partial_global_attention(q, k[..., :8], v, 2)
    with pytest.raises(ValueError, match="v has 7 tokens but k has 8"):
        pk.partial_global_attention(q, k, v[:, :, :7], 2)
    with pytest.raises(ValueError, match="at least one token"):
        pk.partial_global_attention(q[:, :, :0], k, v, 0)


def test_band_errors():
    q, k, v = _qkv(nq=8)
    with pytest.raises(ValueError, match=r"window\[0\] \(left\) must be >= 0"):
        pk.band_attention(q, k, v, (-1, 0))
    with pytest.raises(TypeError, match=r"window\[1\] \(right\) must be an int"):
        pk.band_attention(q, k, v, (1, 0.5))
    with pytest.raises(TypeError, match="window must be a pair"):
        pk.band_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="self-attention"):
        pk.band_attention(q[:, :, :5], k, v, (1, 1))


def test_triton_backend_refusals_name_the_reason():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 is not supported"):
        pk.partial_global_attention(q, k, v, 2, backend="triton")
    q, k, v = _qkv(nq=8, d=300)
    with pytest.raises(ValueError, match="exceed 256"):
        pk.band_attention(q, k, v, (1, 1), backend="triton")


def test_backend_pinned_by_environment(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("PARGO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve"):
        pk.partial_global_attention(q, k, v, 2)
    monkeypatch.setenv("PARGO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PARGO_BACKEND must be one of"):
        pk.partial_global_attention(q, k, v, 2)
    monkeypatch.setenv("PARGO_BACKEND", "reference")
    out = pk.partial_global_attention(q, k, v, 2)
    assert out.shape == (2, 3, 6, 16)


def test_cuda_backend_refusals_name_the_reason():
    """backend="cuda" explains every reason it cannot serve a call (here: CPU tensors, the
    extension not built on a CPU-only machine, and the input's own limits)."""
    from pargo_kernels import _cuda
    q, k, v = _qkv(d=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA kernels need CUDA tensors, got device cpu"):
        pk.partial_global_attention(q, k, v, 2, backend="cuda")
    if _cuda.cuda_extension_reasons():
        with pytest.raises(ValueError, match=r"pargo_kernels\._C"):
            pk.partial_global_attention(q, k, v, 2, backend="cuda")
    q, k, v = _qkv(d=64)
    with pytest.raises(ValueError, match="fp32 uses the Triton backend"):
        pk.partial_global_attention(q, k, v, 2, backend="cuda")
    q, k, v = _qkv(nq=8, d=80, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"head dim 80 is not supported .*64, 128"):
        pk.band_attention(q, k, v, (1, 1), backend="cuda")
    q, k, v = _qkv(d=64, dtype=torch.float16)
    with pytest.raises(ValueError, match="Dv = 32 differs from D = 64"):
        pk.partial_global_attention(q, k, v[..., :32], 2, backend="cuda")
    with pytest.raises(ValueError, match="float64 is not supported"):
        pk.partial_global_attention(q.double(), k.double(), v.double(), 2, backend="cuda")


def test_auto_does_not_prefer_cuda_until_measured():
    """Issue 5, requirement 3: ``auto`` picks cuda over triton only once committed benchmark
    results show it faster; none are committed yet, so Triton comes first on CUDA tensors."""
    from pargo_kernels import attention
    pref = attention._AUTO_PREFERENCE_CUDA_TENSORS
    assert pref.index("triton") < pref.index("cuda")


@pytest.mark.parametrize("np_, nv", [(13, 37), (150, 333), (1, 5), (7, 8), (5, 5), (31, 97)])
def test_1d_windows_by_definition(np_, nv):
    """The 1-D mask builder against its definition written as a plain loop (DESIGN.md §1): partial
    query i sees keys [floor(i*Nv/Np), floor((i+1)*Nv/Np)). Also what the definition implies:
    the windows tile the keys in order, each of floor(Nv/Np) or ceil(Nv/Np) keys."""
    mask = PartialGlobalMask(np_ + 3, nv, np_).materialize()
    for i in range(np_):
        lo, hi = (i * nv) // np_, ((i + 1) * nv) // np_
        assert mask[i].tolist() == [lo <= j < hi for j in range(nv)], f"partial query {i}"
    assert mask[np_:].all()
    owner = mask[:np_].int().argmax(0)
    assert (mask[:np_].sum(0) == 1).all() and (owner.diff() >= 0).all()
    assert set(mask[:np_].sum(1).tolist()) <= {nv // np_, -(-nv // np_)}


@pytest.mark.parametrize("name", ["visual_grid", "partial_grid"])
def test_grid_type_error_names_the_grid(name):
    """Regression (found by tests/test_fuzz.py): a grid that is not a pair was reported as
    'grids must be a pair', without saying which."""
    q, k, v = _qkv(nq=6, nv=12)
    grids = dict(visual_grid=(3, 4), partial_grid=(2, 2))
    grids[name] = 8
    with pytest.raises(TypeError, match=f"^{name} must be a pair"):
        pk.partial_global_attention(q, k, v, 4, **grids)
