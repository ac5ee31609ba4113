"""Projectors against their sources: the released ParGo code (bytedance/ParGo), BLIP-2's Q-Former
(LAVIS), Honeybee's C-Abstractor (timm RegStage), and the edge cases every projector must take
(an empty batch, invalid dropout).

The masks and layer layouts are rebuilt here the way the sources build them, independently of
models/; forward and backward of the kernel path are checked against the float64 dense
reference with tests/test_projectors.py's rule (``compare``).
"""
import math

import pytest
import torch

import models
from models.projectors.layers import eager_attention
from models.projectors.pargo import QuerySelfPattern, _self_attention
from pargo_kernels.testing import REL_TOL, rel_error
from test_projectors import GRID, LLM, VISION, WITH_KERNELS, build, compare, perturb_


# ---------------------------------------------------------------------------------------------
# ParGo self-attention: the released static mask and the paper's cascade
# ---------------------------------------------------------------------------------------------
def released_self_mask(n_query: int, n_partial: int) -> torch.Tensor:
    """The released ``get_global_local_attention``'s self-attention mask, rebuilt step by step:
    start from all ones, zero the partial x partial block and (negative slicing, as there) the
    global x global block, turn the ones into -inf. Returned as "may attend" booleans."""
    n_global = n_query - n_partial
    additive = torch.ones(n_query, n_query)
    additive[:n_partial, :n_partial] = 0
    additive[-n_global:, -n_global:] = 0  # n_global = 0: [-0:] is the whole matrix, as there
    additive = additive.masked_fill(additive == 1, float("-inf"))
    return additive == 0


@pytest.mark.parametrize("np_,ng", [(288, 16), (12, 4), (16, 0), (0, 6), (7, 3)])
def test_official_self_mask_is_the_released_one_in_every_layer(np_, ng):
    grid = (24, 24) if np_ == 288 else GRID
    proj = models.build_projector("pargo", vision_width=8, llm_width=8, visual_grid=grid,
                                  n_partial=np_, n_global=ng, n_layers=3, hidden=16, heads=2,
                                  intermediate=16)
    assert proj.config["self_attn"] == "official"  # the default
    expected = released_self_mask(np_ + ng, np_)
    masks = proj.attention_patterns()["self"]
    assert len(masks) == 3
    for mask in masks:
        assert torch.equal(mask, expected)


@pytest.mark.triton
@pytest.mark.parametrize("n,np_,window", [(9, 6, None), (9, 6, (2, 1)), (9, 6, (0, 0)),
                                          (7, 0, None), (7, 7, (1, 3)), (5, 5, (9, 9))])
def test_self_attention_helper_against_dense_oracle(n, np_, window, device):
    """``_self_attention`` (the one call the fused ``pargo_self_attention`` replaces): output and
    q/k/v gradients against eager float64 attention under the dense mask."""
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, device=device) for _ in range(3))
    g = torch.randn(b, h, n, d, dtype=torch.float64, device=device)
    mask = QuerySelfPattern(np_, n - np_, window).materialize(device)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        y = fn(*leaves)
        y.backward(g.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    got = run(lambda *t: _self_attention(*t, np_, window, backend="triton"), torch.float32)
    exp = run(lambda *t: eager_attention(*t, mask), torch.float64)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exp):
        assert rel_error(a, e) <= REL_TOL[torch.float32], name


# ---------------------------------------------------------------------------------------------
# BERT initialisation as the released init_ParGo
# ---------------------------------------------------------------------------------------------
def tiny_bert(n_layers):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=n_layers,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=40, hidden_act="gelu")
    return perturb_(transformers.BertModel(cfg).eval())


@pytest.mark.parametrize("n_bert", [4, 6])
@pytest.mark.parametrize("copy_ffn", [False, True])
def test_load_bert_layers_position_embeddings_and_ffn(n_bert, copy_ffn):
    """A 6-layer projector from a 4- or 6-layer BERT: BERT layer i's self-attention (and, with
    copy_ffn, its feed-forward) computes what BERT's does in layer i < n_bert; every other
    parameter keeps its value; the query embeddings are BERT's LayerNorm(queries + position
    embeddings)."""
    bert = tiny_bert(n_bert)
    proj = build("pargo", n_partial=12, n_global=4, n_layers=6).eval()
    before = {n: p.detach().clone() for n, p in proj.named_parameters()}
    loaded = proj.load_bert(bert, copy_ffn=copy_ffn)
    per_layer = 10 + (6 if copy_ffn else 0)
    assert len(loaded) == n_bert * per_layer + 3
    x = torch.randn(2, 16, 32)
    full = QuerySelfPattern(0, 16)
    with torch.no_grad():
        for i in range(n_bert):
            ours, theirs = proj.layers[i], bert.encoder.layer[i]
            a = ours.attention(x, x, full, "reference", "auto")
            torch.testing.assert_close(a, theirs.attention(x)[0], rtol=1e-5, atol=1e-5)
            bert_ffn = theirs.output(theirs.intermediate(a), a)
            assert (rel_error(ours.ffn(a), bert_ffn) < 1e-5) == copy_ffn
        emb = bert.embeddings
        expected = emb.LayerNorm(proj.queries + emb.position_embeddings.weight[:16])
        torch.testing.assert_close(proj.query_embeddings(1), expected, rtol=1e-5, atol=1e-5)
    changed = {n for n, p in proj.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"layers.{n}" if n[0].isdigit() else n for n in loaded}
    assert not any(n.startswith(f"layers.{i}.") for n in changed for i in range(n_bert, 6))
    assert not any(".crossattention." in n for n in changed)


def test_load_bert_refuses_mismatches():
    bert = tiny_bert(2)
    with pytest.raises(ValueError, match="hidden or intermediate"):
        build("pargo", hidden=16).load_bert(bert)
    with pytest.raises(ValueError, match="hidden or intermediate"):
        build("pargo", intermediate=40).load_bert(bert, copy_ffn=True)
    with pytest.raises(ValueError, match="heads"):
        build("pargo", heads=4).load_bert(bert)
    with pytest.raises(ValueError, match="position embeddings"):  # 44 queries, 40 positions
        build("pargo", n_partial=40, n_global=4).load_bert(bert)
    build("pargo", intermediate=40).load_bert(bert)  # the feed-forward is not loaded
    build("pargo", n_partial=40, n_global=4, pos_emb=False).load_bert(bert)


# ---------------------------------------------------------------------------------------------
# every projector: an empty batch, invalid dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, impl", [  # a new projector needs a SMALL entry
    pytest.param(name, "kernels", marks=pytest.mark.triton, id=f"{name}-kernels")
    for name in models.projector_names() if name in WITH_KERNELS] + [
    pytest.param(name, "reference", id=f"{name}-reference") for name in models.projector_names()])
def test_empty_batch(name, impl, device):
    proj = perturb_(build(name)).to(device)
    x = torch.randn(0, 48, VISION, device=device, requires_grad=True)
    y = proj(x, impl=impl) if name in WITH_KERNELS else proj(x)
    assert y.shape == (0, proj.num_visual_tokens, LLM)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for n, p in proj.named_parameters():
        assert p.grad is not None and not p.grad.any(), n


@pytest.mark.parametrize("name", ["pargo", "qformer"])
@pytest.mark.parametrize("bad,error", [(math.nan, ValueError), (-0.1, ValueError),
                                       (1.0, ValueError), (math.inf, ValueError),
                                       ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_invalid_dropout_is_refused(name, bad, error):
    with pytest.raises(error, match="dropout"):
        build(name, dropout=bad)


def test_dropout_is_applied():
    proj = perturb_(build("pargo", dropout=0.5, impl="reference")).train()
    x = torch.randn(2, 48, VISION)
    assert not torch.equal(proj(x), proj(x))
    proj.eval()
    assert torch.equal(proj(x), proj(x))


# ---------------------------------------------------------------------------------------------
# C-Abstractor as Honeybee builds it (timm RegStage, group_size=1)
# ---------------------------------------------------------------------------------------------
def regstage_block_params(c_in: int, c_out: int) -> int:
    """Parameters of timm's regnet ``Bottleneck(c_in, c_out)`` with Honeybee's arguments
    (bottle_ratio 1, group_size 1, se_ratio 0.25, LayerNorm2d), from its layer definitions:
    ConvNormAct = bias-free conv + norm (weight, bias)."""
    mid = c_out
    norm = 2 * mid
    conv1 = c_in * mid + norm
    groups = mid // 1  # bottleneck channels // group_size
    conv2 = mid * (mid // groups) * 3 * 3 + norm
    rd = round(c_in * 0.25)
    se = (mid * rd + rd) + (rd * mid + mid)  # fc1, fc2 (1x1 convs with bias)
    conv3 = mid * c_out + 2 * c_out
    downsample = c_in * c_out + 2 * c_out if c_in != c_out else 0
    return conv1 + conv2 + se + conv3 + downsample


def honeybee_params(vision, llm, n_tokens, hidden, depth, mlp_depth) -> int:
    pos_emb = n_tokens * vision
    stages = regstage_block_params(vision, hidden) + \
        (2 * depth - 1) * regstage_block_params(hidden, hidden)
    readout = (hidden * llm + llm) + (mlp_depth - 1) * (llm * llm + llm)
    return pos_emb + stages + readout


@pytest.mark.parametrize("vision,llm,grid,cfg", [
    (1024, 4096, (24, 24), {}),                               # Honeybee's C-Abstractor
    (24, 40, GRID, dict(num_queries=9, hidden=16, depth=2)),  # width change: conv shortcut
])
def test_cabstractor_parameter_count_is_honeybees(vision, llm, grid, cfg):
    proj = models.build_projector("cabstractor", vision_width=vision, llm_width=llm,
                                  visual_grid=grid, **cfg)
    c = proj.config
    expected = honeybee_params(vision, llm, grid[0] * grid[1], c["hidden"], c["depth"],
                               c["mlp_depth"])
    assert sum(p.numel() for p in proj.parameters()) == expected
    if vision == 1024:
        assert expected == 37_398_016  # "about 37 M" (Honeybee), not 94 M (full 3x3 convs)


def test_cabstractor_is_depthwise_with_silu_readout():
    proj = build("cabstractor", hidden=16, depth=2, mlp_depth=3)
    for block in [*proj.stage1, *proj.stage2]:
        assert block.conv2.groups == block.conv2.in_channels == block.conv2.out_channels
    acts = [m for m in proj.readout if not isinstance(m, torch.nn.Linear)]
    assert len(acts) == 2 and all(isinstance(m, torch.nn.SiLU) for m in acts)


# ---------------------------------------------------------------------------------------------
# Q-Former: ParGo's baseline (default) and BLIP-2's configuration
# ---------------------------------------------------------------------------------------------
def layer_sizes(proj):
    layer = proj.layers[0]
    return dict(n_query=proj.num_visual_tokens, n_layers=len(proj.layers),
                hidden=layer.attention.query.in_features, heads=layer.attention.heads,
                intermediate=layer.ffn.intermediate.out_features,
                cross=[i for i, lyr in enumerate(proj.layers) if lyr.crossattention is not None],
                pos_emb=proj.position_embeddings is not None)


def test_qformer_presets():
    """Default: ParGo's baseline (304 queries, 6 bert-small-sized layers, cross-attention in
    every layer). ``preset="blip2"``: LAVIS ``init_Qformer`` (bert-base-uncased: 12 layers,
    768 wide, 12 heads, intermediate 3072; 32 queries; cross_attention_freq=2, i.e. layers 0, 2,
    ..., 10; no position embeddings on the queries)."""
    with torch.device("meta"):  # sizes only: no 100 M random numbers
        baseline = models.build_projector("qformer", vision_width=1024, llm_width=64)
        blip2 = models.build_projector("qformer", vision_width=1408, llm_width=64,
                                       visual_grid=(16, 16), preset="blip2")
        again = models.projector_from_config(blip2.config)
    assert layer_sizes(baseline) == dict(n_query=304, n_layers=6, hidden=512, heads=8,
                                         intermediate=2048, cross=list(range(6)), pos_emb=True)
    assert layer_sizes(blip2) == dict(n_query=32, n_layers=12, hidden=768, heads=12,
                                      intermediate=3072, cross=[0, 2, 4, 6, 8, 10],
                                      pos_emb=False)
    assert layer_sizes(again) == layer_sizes(blip2)
    assert blip2.attention_patterns()["cross"][1] is None
    with pytest.raises(ValueError, match="preset"):
        build("qformer", preset="blip3")
    with pytest.raises(ValueError, match="cross_attention_freq"):
        build("qformer", cross_attention_freq=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qformer_blip2_tiny_matches_reference(dtype, device):
    proj = build("qformer", preset="blip2", n_query=6, n_layers=4, hidden=32, heads=2,
                 intermediate=48)
    assert layer_sizes(proj)["cross"] == [0, 2]
    compare("qformer", perturb_(proj), dtype, device)


def test_relevance_skips_layers_without_cross_attention():
    from models.digits.relevance import capture_attention, projector_relevance
    proj = build("qformer", preset="blip2", n_query=6, n_layers=3, hidden=32, heads=2,
                 intermediate=48, impl="reference").eval()
    x = torch.randn(2, 48, VISION)
    with capture_attention(proj) as rec:
        proj(x)
    assert [(i, k) for i, k, _ in rec] == [(0, "self"), (0, "cross"), (1, "self"), (2, "self"),
                                          (2, "cross")]
    rel = projector_relevance(proj, x, lambda o: o[:, 0].sum())
    assert rel["per_query"].shape == (2, 6, 48) and torch.isfinite(rel["patch"]).all()
