"""Projectors (models/): the kernel path computes what the dense-mask reference path computes.

Every projector with a kernel inside is run three ways on the same fresh random weights and
inputs: ``impl="kernels"`` (backend "triton": the real Triton kernels, under the interpreter on a
CPU), ``impl="reference"`` in the same dtype, and ``impl="reference"`` in float64 (the oracle).
The kernel path's error against the oracle (max-abs relative, ``rel_error``) must be within a
factor of the reference path's own error plus a floor: FlashAttention's published rule, 2x for
the output and, in 16-bit, 3x for every parameter gradient (fp32: 2x everywhere). A wrong window,
a swapped mask block or a dropped gradient gives errors of order 1 (test_wrong_mask_is_caught).

Why 3x for 16-bit gradients: the ratio of two max-abs errors of a 32-element gradient of a
3-layer model with sharp random weights is noisy when the reference's error happens to be small
(e.g. a LayerNorm gain: kernels 0.031 vs reference 0.005). Measured on 59 fresh bf16 ParGo draws
(interpreter rounding to nearest, tests/conftest.py): the per-tensor kernel/reference median is
0.8..1.0 (no systematic excess), but the worst gradient ``(kernel - floor) / reference`` of a
draw has median 0.8, 90th percentile 1.4, max 2.16 (1 of the 59 failed the former 2x; 0 fail
3x). What it must catch still fails by far: the worst gradient of a draw exceeds the 3x budget
2.7-8.8x with a 16-bit delta from the rounded output (mutant delta-from-rounded-output, 6 draws)
and 30-59x with the cross-attention windows shifted by one key (4 draws).

The floor is the single-op tolerance of ``pargo_kernels.testing`` for bf16; for fp32 it is 1e-4
(5x the single-op 2e-5): a weight gradient sums B*N token contributions through several layers
and its own max is far below its terms', so an fp32 summation-order difference shows up as
1e-5..8e-5 of it (measured on 16 random draws; the eager fp32 path sits at 2e-6..2e-5).
"""
import copy
import json

import pytest
import torch

import models
from models.projectors.layers import CrossPattern
from models.projectors.pargo import QuerySelfPattern
from pargo_kernels.masks import BandMask, PartialGlobalMask
from pargo_kernels.testing import REL_TOL, rel_error

DTYPES = [torch.float32, torch.bfloat16]
MODEL_FLOOR = {torch.float32: 1e-4, torch.bfloat16: REL_TOL[torch.bfloat16]}

# Small configurations of every projector; visual grid 6x8 (48 tokens), vision width 24.
GRID, VISION, LLM = (6, 8), 24, 40
SMALL = {
    "pargo": dict(n_partial=12, n_global=4, n_layers=3, hidden=32, heads=2, intermediate=48),
    "qformer": dict(n_query=10, n_layers=2, hidden=32, heads=2, intermediate=48),
    "deco": dict(query_num=9),
    "cabstractor": dict(num_queries=9, hidden=16, depth=1),
    "mlp2x_gelu": {},
    "linear": {},
    "mlp": dict(depth=3, bias=False, act="gelu_pytorch_tanh"),
}
WITH_KERNELS = ["pargo", "qformer", "deco", "cabstractor"]
# backends of the kernels inside: the Triton kernels (skipped where Triton cannot run) and
# pargo_kernels' reference backend (the kernel path's code with the eager ops)
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "reference"]


def build(name, **over):
    cfg = {**SMALL[name], **over}
    if name in WITH_KERNELS:
        cfg.setdefault("backend", "triton")
    return models.build_projector(name, vision_width=VISION, llm_width=LLM, visual_grid=GRID,
                                  **cfg)


def perturb_(proj):
    """Fresh random weights everywhere (LayerNorm gains and biases too, not their 1/0 init)."""
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else 0.5 * p.shape[-1] ** -0.5))
            if p.dim() == 1 and p.shape[0] > 1:  # norms: gains around 1
                p.add_(1.0 if p.abs().mean() < 10 else 0.0)
    return proj


def run(proj, x, g, impl):
    x = x.detach().clone().requires_grad_(True)
    proj.zero_grad(set_to_none=True)
    y = proj(x, impl=impl) if impl else proj(x)
    y.backward(g.to(y.dtype))
    grads = {n: p.grad.detach().clone() for n, p in proj.named_parameters()}
    grads["input"] = x.grad.detach().clone()
    return y.detach(), grads


def compare(name, proj, dtype, device, batch=2):
    """``proj``'s kernel path (on ``device``) against the float64 oracle, judged by the module
    docstring's rule; returns the kernel path's output."""
    proj = proj.to(device)
    x = torch.randn(batch, GRID[0] * GRID[1], VISION, device=device)
    g = torch.randn(batch, proj.num_visual_tokens, LLM, device=device)
    oracle = copy.deepcopy(proj).double()
    y64, g64 = run(oracle, x.double(), g.double(), "reference")
    low = copy.deepcopy(proj).to(dtype)
    yk, gk = run(low, x.to(dtype), g, "kernels")
    yr, gr = run(low, x.to(dtype), g, "reference")
    tol = MODEL_FLOOR[dtype]
    grad_factor = 2 if dtype == torch.float32 else 3  # FlashAttention's rule (module docstring)
    failures = []
    for key in ["output", *g64]:
        exp, ker, ref = (y64, yk, yr) if key == "output" else (g64[key], gk[key], gr[key])
        e_ker, e_ref = rel_error(ker, exp), rel_error(ref, exp)
        factor = 2 if key == "output" else grad_factor
        if not e_ker <= factor * e_ref + tol:
            failures.append(f"{key}: kernels {e_ker:.2e} vs {factor}x reference {e_ref:.2e} "
                            f"(+{tol:.0e})")
    assert not failures, f"{name} {dtype}: " + "; ".join(failures)
    return yk


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", WITH_KERNELS)
def test_kernels_match_reference(name, dtype, device):
    compare(name, perturb_(build(name)), dtype, device)


@pytest.mark.triton
@pytest.mark.parametrize("cfg", [      # self_attn="official" (the default) unless given
    dict(self_attn="cascade"),          # the paper's cascade, symmetric bands
    dict(self_attn="cascade", cascade_mode="causal"),
    dict(partial_grid=(3, 4)),          # 2-D windows over the 6x8 grid
    dict(n_partial=16, n_global=0),     # partial only
    dict(n_partial=0, n_global=6),      # global only (a Q-Former through the ParGo class)
    dict(n_partial=7, n_global=3),      # 7 does not divide 48: uneven windows
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pargo_variants_match_reference(cfg, device):
    compare("pargo", perturb_(build("pargo", **cfg)), torch.float32, device)


@pytest.mark.triton
def test_wrong_mask_is_caught(device, monkeypatch):
    """The comparison can fail: with the reference's cross-attention windows shifted by one
    query (the oracle shares them), the kernel path is rejected."""
    orig = CrossPattern.materialize
    monkeypatch.setattr(CrossPattern, "materialize",
                        lambda self, device=None: orig(self, device).roll(1, dims=0))
    with pytest.raises(AssertionError, match="kernels"):
        compare("pargo", perturb_(build("pargo")), torch.float32, device)


@pytest.mark.triton
def test_fast_path_builds_no_dense_mask(device, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a dense mask was materialised on the kernel path")

    for cls in (PartialGlobalMask, BandMask, QuerySelfPattern):
        monkeypatch.setattr(cls, "materialize", boom)
    for name in WITH_KERNELS:
        proj = build(name).to(device)
        y = proj(torch.randn(2, 48, VISION, device=device))
        y.sum().backward()
        assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# masks: the official construction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("np_,ng,nv", [(288, 16, 576), (12, 4, 48), (6, 0, 48)])
def test_pargo_cross_mask_equals_official(np_, ng, nv):
    """Official code: ``index = arange(Nv).reshape(Np, Nv // Np)``; partial query i attends to
    keys ``index[i]``, global queries to all keys (0 / -inf additive mask)."""
    grid = (nv // 24, 24) if nv >= 24 else (1, nv)
    proj = models.build_projector("pargo", vision_width=8, llm_width=8, visual_grid=grid,
                                  n_partial=np_, n_global=ng, n_layers=2, hidden=16, heads=2,
                                  intermediate=16)
    official = torch.full((np_ + ng, nv), float("-inf"))
    index = torch.arange(nv).reshape(np_, nv // np_)
    for i in range(np_):
        official[i, index[i]] = 0.0
    official[np_:] = 0.0
    for cross in proj.attention_patterns()["cross"]:
        assert torch.equal(cross, official == 0)


@pytest.mark.parametrize("mode", ["symmetric", "causal"])
def test_pargo_self_masks_are_cascaded_blocks(mode):
    """Self-attention masks built element by element: partial i sees partial j iff j lies among
    the n_vis = ceil(l*Np/d) adjacent queries of layer l (the window containing i), global
    queries see all global queries, nothing crosses the two blocks."""
    np_, ng, d = 12, 4, 3
    proj = build("pargo", n_partial=np_, n_global=ng, n_layers=d, self_attn="cascade",
                 cascade_mode=mode)
    for layer, mask in enumerate(proj.attention_patterns()["self"], start=1):
        n_vis = -(-layer * np_ // d)
        left = n_vis - 1 if mode == "causal" else n_vis // 2
        expected = torch.zeros(np_ + ng, np_ + ng, dtype=torch.bool)
        for i in range(np_ + ng):
            for j in range(np_ + ng):
                if i >= np_ and j >= np_:
                    expected[i, j] = True
                elif i < np_ and j < np_:
                    expected[i, j] = i - left <= j <= i - left + n_vis - 1
        assert torch.equal(mask, expected), f"layer {layer}"
        assert int(mask[:np_, :np_].sum(1).max()) == n_vis


# ---------------------------------------------------------------------------------------------
# registry, configs, shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_builds_all_six(backend, device):
    assert set(models.projector_names()) >= set(SMALL)
    for name in SMALL:
        proj = build(name, **({"backend": backend} if name in WITH_KERNELS else {})).to(device)
        y = proj(torch.randn(3, 48, VISION, device=device))
        assert y.shape == (3, proj.num_visual_tokens, LLM)
        assert torch.isfinite(y).all()
    assert build("mlp2x_gelu").num_visual_tokens == 48
    assert build("pargo").num_visual_tokens == 16
    assert models.build_projector("pargo", vision_width=1024, llm_width=4096).num_visual_tokens \
        == 304


@pytest.mark.parametrize("name, backend", [
    pytest.param(name, "triton", marks=pytest.mark.triton, id=f"{name}-triton")
    for name in WITH_KERNELS] + [pytest.param(name, "reference", id=name) for name in SMALL])
def test_config_json_round_trip(name, backend, device, tmp_path):
    proj = perturb_(build(name, **({"backend": backend} if name in WITH_KERNELS else {})))
    proj = proj.to(device)
    path = tmp_path / "projector.json"
    models.save_projector_config(proj, path)
    assert json.loads(path.read_text())["name"] == name
    again = models.load_projector_config(path)
    assert again.config == proj.config
    again = again.to(device)
    again.load_state_dict(proj.state_dict())
    x = torch.randn(2, 48, VISION, device=device)
    torch.testing.assert_close(again(x), proj(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,cfg,match", [
    ("pargo", dict(n_partial=49), "n_partial"),
    ("pargo", dict(partial_grid=(3, 3)), "partial_grid"),
    ("pargo", dict(heads=3), "heads"),
    ("pargo", dict(cascade_mode="diagonal"), "cascade_mode"),
    ("pargo", dict(self_attn="paper"), "self_attn"),
    ("pargo", dict(n_partial=0, n_global=0), "n_partial"),
    ("pargo", dict(impl="eager"), "impl"),
    ("pargo", dict(backend="tpu"), "backend"),
    ("qformer", dict(heads=5), "heads"),
    ("deco", dict(query_num=10), "query_num"),
    ("cabstractor", dict(num_queries=0), "num_queries"),
])
def test_bad_configs_raise_at_construction(name, cfg, match):
    with pytest.raises(ValueError, match=match):
        build(name, **cfg)


def test_bad_types_and_names():
    with pytest.raises(ValueError, match="unknown projector"):
        models.build_projector("perceiver", vision_width=8, llm_width=8)
    with pytest.raises(TypeError, match="visual_grid"):
        models.build_projector("linear", vision_width=8, llm_width=8, visual_grid=24)
    with pytest.raises(TypeError, match="n_partial"):
        build("pargo", n_partial=12.0)
    with pytest.raises(ValueError, match=r"\[B, 48, 24\]"):
        build("pargo")(torch.randn(2, 47, VISION))
