"""Packed (variable-resolution) batches through the projectors: ``proj(x_packed,
visual_grids=[...])`` must equal running each image alone at its own grid, and bad packing must
be refused with the argument named."""
from __future__ import annotations

import pytest
import torch

from models.projectors import build_projector

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
