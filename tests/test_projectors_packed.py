"""Packed (variable-resolution) batches through the projectors: ``proj(x_packed,
visual_grids=[...])`` must equal running each image alone at its own grid, and bad packing must
be refused with the argument named."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.projectors import build_projector
from models.projectors.pargo import QuerySelfPattern
from pargo_kernels.masks import BandMask, PartialGlobalMask
from pargo_kernels.testing import rel_error

GRIDS = [(3, 4), (1, 1), (5, 2)]


def _packed(grids, width):
    return torch.randn(sum(r * c for r, c in grids), width, dtype=torch.float64)


@pytest.mark.parametrize("name", ["mlp2x_gelu", "linear"])
def test_tokenwise_packed_equals_each_image_alone(name):
    proj = build_projector(name, vision_width=8, llm_width=6, visual_grid=(2, 2)).double()
    x = _packed(GRIDS, 8)
    y, counts = proj(x, visual_grids=GRIDS)
    assert counts == [proj.tokens_for_grid(g) for g in GRIDS] == [12, 1, 10]
    start = 0
    for g, n in zip(GRIDS, counts):  # the same weights, built for this image's grid
        alone = build_projector(name, vision_width=8, llm_width=6, visual_grid=g).double()
        alone.load_state_dict(proj.state_dict())
        torch.testing.assert_close(y[start:start + n], alone(x[None, start:start + n])[0])
        start += n
    assert start == y.shape[0]


def test_packed_input_is_validated():
    proj = build_projector("mlp2x_gelu", vision_width=8, llm_width=6, visual_grid=(2, 2))
    x = torch.randn(12 + 1 + 10, 8)
    with pytest.raises(ValueError, match=r"packed x of shape \[22, 8\]"):
        proj(x, visual_grids=[(3, 4), (5, 2)])
    with pytest.raises(ValueError, match=r"visual_grids\[1\]"):
        proj(x, visual_grids=[(3, 4), (0, 1), (5, 2)])
    with pytest.raises(ValueError, match="at least one image"):
        proj(x, visual_grids=[])
    with pytest.raises(TypeError, match="visual_grids must be a sequence"):
        proj(x, visual_grids=5)


# ---------------------------------------------------------------------------------------------
# projectors whose output count depends on the grid: ParGo, Q-Former, DeCo, C-Abstractor
# ---------------------------------------------------------------------------------------------
BASE = (4, 4)  # the configured visual_grid
MIXED = [(3, 5), (1, 1), (4, 4), (2, 7), (3, 5), (2, 4)]  # a repeated grid, a 1x1, primes
QUERY = dict(n_layers=2, hidden=16, heads=2, intermediate=24)
CONFIGS = {  # id -> (registry name, constructor arguments)
    "pargo-2d-official": ("pargo", dict(n_partial=6, n_global=2, partial_grid=(3, 2), **QUERY)),
    "pargo-2d-cascade": ("pargo", dict(n_partial=6, n_global=2, partial_grid=(3, 2),
                                       self_attn="cascade", **QUERY)),
    "pargo-1d-cascade-causal": ("pargo", dict(n_partial=6, n_global=2, self_attn="cascade",
                                              cascade_mode="causal", **QUERY)),
    "pargo-partial-only": ("pargo", dict(n_partial=6, n_global=0, partial_grid=(3, 2),
                                         self_attn="cascade", **QUERY)),
    "qformer": ("qformer", dict(n_query=3, cross_attention_freq=2, **QUERY)),
    "deco": ("deco", dict(query_grid=(2, 2))),
    "cabstractor": ("cabstractor", dict(query_grid=(2, 2), hidden=16, depth=1)),
}


def _rule(grid, base_in, base_out):
    """The documented per-image rule, written out independently: each axis keeps the configured
    ratio, rounded half up, at least 1."""
    return tuple(max(1, math.floor(o * g / i + 0.5)) for g, i, o in zip(grid, base_in, base_out))


def _alone_config(name, cfg, grid):
    """Arguments of the fixed-shape projector that one image of ``grid`` is run through."""
    cfg = dict(cfg)
    if name in ("deco", "cabstractor"):
        cfg["query_grid"] = _rule(grid, BASE, cfg["query_grid"])
    elif name == "pargo" and cfg.get("partial_grid"):
        cfg["partial_grid"] = _rule(grid, BASE, cfg["partial_grid"])
        cfg["n_partial"] = cfg["partial_grid"][0] * cfg["partial_grid"][1]
    elif name == "pargo":  # 1-D windows: the count keeps the ratio, within [1, rows*cols]
        n = math.floor(cfg["n_partial"] * grid[0] * grid[1] / (BASE[0] * BASE[1]) + 0.5)
        cfg["n_partial"] = min(max(n, 1), grid[0] * grid[1])
    return cfg


RESAMPLED = ("queries", "position_embeddings", "pos_emb")  # grid-dependent parameters


def _resample(name, value, proj, alone_cfg, grid):
    """A grid-dependent parameter of the packed projector, resampled as documented: ParGo's
    partial queries and position embeddings (bilinear over the partial grid, or linear over the
    query index), C-Abstractor's position embedding (bilinear over the visual grid)."""
    if name == "cabstractor":  # pos_emb [1, Nv, C]
        t = value.transpose(1, 2).reshape(1, -1, *BASE)
        return F.interpolate(t, size=grid, mode="bilinear", align_corners=False) \
            .flatten(2).transpose(1, 2)
    if name == "qformer":  # global queries only: nothing to resample
        return value
    np_, n = proj.n_partial, alone_cfg["n_partial"]
    part = value[0, :np_].t()[None]  # [1, hidden, Np]
    if alone_cfg.get("partial_grid"):
        part = F.interpolate(part.reshape(1, -1, *proj.partial_grid),
                             size=alone_cfg["partial_grid"], mode="bilinear",
                             align_corners=False).flatten(2)
    else:
        part = F.interpolate(part, size=n, mode="linear", align_corners=False)
    return torch.cat([part[0].t(), value[0, np_:]])[None]


def _perturbed(name, cfg, dtype=torch.float64, **over):
    proj = build_projector(name, vision_width=8, llm_width=6, visual_grid=BASE,
                           **{**cfg, **over}).to(dtype)
    with torch.no_grad():  # fresh random weights everywhere, LayerNorm gains around 1
        for p in proj.parameters():
            p.copy_(torch.randn_like(p) * 0.5 * (p.shape[-1] ** -0.5 if p.dim() > 1 else 1)
                    + (1.0 if p.dim() == 1 and "LayerNorm" in _name_of(proj, p) else 0.0))
    return proj


def _name_of(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


def _oracle(name, cfg, proj, x, grids, g):
    """Each image alone through a fixed-shape projector built for its grid (``impl=
    "reference"``, float64), every parameter a function of the packed projector's (shared, or
    resampled): returns the outputs concatenated and the gradients of ``<y, g>`` with respect
    to the input and every parameter."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in proj.named_parameters()}
    xs = x.detach().clone().requires_grad_(True)
    outs, start, qstart = [], 0, 0
    for grid in grids:
        acfg = _alone_config(name, cfg, grid)
        alone = build_projector(name, vision_width=8, llm_width=6, visual_grid=grid,
                                **{**acfg, "impl": "reference"}).double()
        params = {n: _resample(name, leaves[n], proj, acfg, grid) if n in RESAMPLED else
                  leaves[n] for n, _ in alone.named_parameters()}
        n_in = grid[0] * grid[1]
        y = torch.func.functional_call(alone, params, (xs[None, start:start + n_in],))[0]
        assert y.shape[0] == alone.num_visual_tokens
        outs.append(y)
        start += n_in
    y = torch.cat(outs)
    grads = torch.autograd.grad((y * g).sum(), [xs, *leaves.values()])
    return y.detach(), [len(o) for o in outs], dict(zip(["input", *leaves], grads))


def _run_packed(proj, x, grids, g, impl):
    x = x.detach().clone().requires_grad_(True)
    proj.zero_grad(set_to_none=True)
    y, counts = proj(x, visual_grids=grids, impl=impl)
    (y * g.to(y.dtype)).sum().backward()
    grads = {"input": x.grad, **{n: p.grad for n, p in proj.named_parameters()}}
    return y.detach(), counts, grads


@pytest.mark.parametrize("cfg_id", list(CONFIGS))
def test_packed_equals_each_image_alone_float64(cfg_id, monkeypatch):
    """Forward and every gradient, float64: ``impl="reference"`` (per-image loop) and
    ``impl="kernels"`` (the packed varlen ops and plans; their ``backend="reference"``, since
    the Triton kernels take no float64) equal each image run alone at its own grid. The kernel
    path builds the cross plan once per forward, a band plan once per distinct set of windows
    (official mask: once; cascade: at most once per layer), and runs each layer's
    self-attention as one band_attention_varlen call over the whole batch (no gather by
    window)."""
    name, cfg = CONFIGS[cfg_id]
    proj = _perturbed(name, cfg, backend="reference")
    x = torch.randn(sum(r * c for r, c in MIXED), 8, dtype=torch.float64)
    counts = [proj.tokens_for_grid(grid) for grid in MIXED]
    g = torch.randn(sum(counts), 6, dtype=torch.float64)
    y64, counts64, g64 = _oracle(name, cfg, proj, x, MIXED, g)
    assert counts == counts64
    import models.projectors.packed as packed
    built = []
    for fn in ("plan_band", "plan_partial_global", "band_attention_varlen"):
        orig = getattr(packed, fn)
        monkeypatch.setattr(packed, fn, lambda *a, _o=orig, _n=fn, **k: built.append(_n)
                            or _o(*a, **k))
    for impl in ("reference", "kernels"):
        built.clear()
        y, got_counts, grads = _run_packed(proj, x, MIXED, g, impl)
        assert got_counts == counts
        torch.testing.assert_close(y, y64, msg=lambda m: f"{impl} output: {m}")
        for key, expected in g64.items():
            assert grads[key] is not None, f"{impl}: no gradient reaches {key}"
            torch.testing.assert_close(grads[key], expected,
                                       msg=lambda m, k=key: f"{impl} grad {k}: {m}")
        if name in ("pargo", "qformer") and impl == "kernels":
            n_layers = len(proj.layers)
            assert built.count("plan_partial_global") == 1
            # one self-attention call per layer over the batch as it lies, whatever the images'
            # windows; band plans: one per distinct set of windows (the official mask's are the
            # same in every layer; the cascade's first layer differs from its last)
            assert built.count("band_attention_varlen") == n_layers, built
            expected = n_layers if cfg.get("self_attn") == "cascade" else 1
            assert built.count("plan_band") == expected, built


@pytest.mark.triton
@pytest.mark.parametrize("cfg_id", [c for c in CONFIGS if c != "pargo-partial-only"])
def test_packed_triton_kernels_match_each_image_alone(cfg_id, monkeypatch, device):
    """``impl="kernels"`` on the Triton varlen kernels (the interpreter on a CPU), float32,
    against the float64 per-image oracle, forward and every gradient; and no dense mask is
    built on that path. Budget: 1e-4 relative, test_projectors.py's fp32 model floor (a wrong
    window or a key of another image gives errors of order 0.1..1)."""
    name, cfg = CONFIGS[cfg_id]
    proj = _perturbed(name, cfg, backend="triton")
    x = torch.randn(sum(r * c for r, c in MIXED), 8, dtype=torch.float64)
    g = torch.randn(sum(proj.tokens_for_grid(grid) for grid in MIXED), 6, dtype=torch.float64)
    y64, counts64, g64 = _oracle(name, cfg, proj, x, MIXED, g)

    def boom(*a, **k):
        raise AssertionError("a dense mask was materialised on the kernel path")

    for cls in (PartialGlobalMask, BandMask, QuerySelfPattern):
        monkeypatch.setattr(cls, "materialize", boom)
    low = proj.float().to(device)
    y, counts, grads = _run_packed(low, x.float().to(device), MIXED, g.float().to(device),
                                   "kernels")
    assert counts == counts64
    errors = {key: rel_error(grads[key].cpu(), exp) for key, exp in g64.items()}
    errors["output"] = rel_error(y.cpu(), y64)
    bad = {k: f"{e:.1e}" for k, e in errors.items() if not e <= 1e-4}
    assert not bad, f"{cfg_id}: relative errors above 1e-4: {bad}"


@pytest.mark.parametrize("cfg_id", ["pargo-2d-official", "qformer", "deco", "cabstractor"])
def test_packed_input_of_every_projector_is_validated(cfg_id):
    name, cfg = CONFIGS[cfg_id]
    proj = build_projector(name, vision_width=8, llm_width=6, visual_grid=BASE, **cfg)
    x = torch.randn(15 + 1, 8)
    with pytest.raises(ValueError, match=r"visual_grids\[1\]"):
        proj(x, visual_grids=[(3, 5), (1, 0)])
    with pytest.raises(ValueError, match=r"packed x of shape \[16, 8\]"):
        proj(x[:-1], visual_grids=[(3, 5), (1, 1)])
    with pytest.raises(ValueError, match=r"packed x of shape \[16, 8\]"):
        proj(x[None], visual_grids=[(3, 5), (1, 1)])
    with pytest.raises(TypeError, match="visual_grids must be a sequence"):
        proj(x, visual_grids=16)
    with pytest.raises(ValueError, match="impl"):
        proj(x, visual_grids=[(3, 5), (1, 1)], impl="eager")
    with pytest.raises(ValueError, match="grid"):
        proj.tokens_for_grid((0, 3))


def test_pargo_refuses_a_partial_grid_finer_than_the_image():
    """A configured partial grid finer than the visual grid along an axis (2x8 -> 4x2) would
    give a 1x1 image 2 partial queries for 1 token: refused, naming the image."""
    proj = build_projector("pargo", vision_width=8, llm_width=6, visual_grid=(2, 8),
                           n_partial=8, n_global=1, partial_grid=(4, 2), **QUERY)
    with pytest.raises(ValueError, match=r"visual_grids\[1\].*partial grid \(2, 1\)"):
        proj(torch.randn(16 + 1, 8), visual_grids=[(2, 8), (1, 1)])


@pytest.mark.parametrize("cfg_id", ["mlp2x_gelu", "pargo-2d-official", "pargo-1d-cascade-causal",
                                    "qformer", "deco", "cabstractor"])
def test_visual_grids_as_an_int_tensor(cfg_id):
    """``visual_grids`` as an int tensor ``[n_images, 2]`` (int64 or int32), as the varlen ops
    take it, gives exactly the list's output and counts (both impls); a tensor of the wrong
    dtype, shape or values is refused naming ``visual_grids`` as the varlen ops refuse it."""
    name, cfg = CONFIGS.get(cfg_id, (cfg_id, {}))
    proj = _perturbed(name, cfg, **({} if name == "mlp2x_gelu" else dict(backend="reference")))
    x = torch.randn(sum(r * c for r, c in MIXED), 8, dtype=torch.float64)
    for impl in ("reference", "kernels"):
        if name == "mlp2x_gelu" and impl == "kernels":
            continue  # a token-wise projector has one path
        kw = {} if name == "mlp2x_gelu" else dict(impl=impl)
        y, counts = proj(x, visual_grids=MIXED, **kw)
        for dtype in (torch.int64, torch.int32):
            yt, counts_t = proj(x, visual_grids=torch.tensor(MIXED, dtype=dtype), **kw)
            assert counts_t == counts and all(type(c) is int for c in counts_t)
            assert torch.equal(yt, y), f"{impl} {dtype}"
    bad = [(torch.tensor(MIXED, dtype=torch.float32), TypeError,
            r"^visual_grids must be an integer tensor, got torch.float32"),
           (torch.tensor(MIXED, dtype=torch.bool), TypeError, r"^visual_grids must be an integer"),
           (torch.tensor(MIXED).flatten(), ValueError, r"^visual_grids must be \[n_seq, 2\], got "
                                                       r"shape \(12,\)"),
           (torch.ones(len(MIXED), 3, dtype=torch.long), ValueError,
            r"^visual_grids must be \[n_seq, 2\], got shape \(6, 3\)"),
           (torch.tensor(3), ValueError, r"^visual_grids must be \[n_seq, 2\], got shape \(\)"),
           (torch.zeros(0, 2, dtype=torch.long), ValueError, r"^visual_grids must name at least"),
           (torch.tensor([(3, 5), (1, 0)]), ValueError, r"^visual_grids\[1\] .* must be positive"),
           (torch.tensor(MIXED, device="meta"), ValueError, r"^visual_grids is on the meta device")]
    for grids, error, match in bad:
        with pytest.raises(error, match=match):
            proj(x, visual_grids=grids)
