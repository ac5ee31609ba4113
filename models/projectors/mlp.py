"""LLaVA-1.5 projectors: ``linear`` (LLaVA-1) and ``mlp2x_gelu`` (LLaVA-1.5): one output token per
patch token."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from .common import Projector, check_grid, check_pos_int
from .registry import register_projector


class MLPProjector(Projector):
    """``depth`` Linear layers with GELU between them (``depth=1``: a single Linear)."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), depth: int = 2):
        vision_width = check_pos_int("vision_width", vision_width)
        llm_width = check_pos_int("llm_width", llm_width)
        visual_grid = check_grid("visual_grid", visual_grid)
        depth = check_pos_int("depth", depth)
        super().__init__(dict(vision_width=vision_width, llm_width=llm_width,
                              visual_grid=list(visual_grid), depth=depth))
        layers: list[nn.Module] = [nn.Linear(vision_width, llm_width)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_width, llm_width)]
        self.mlp = nn.Sequential(*layers)
        self.num_visual_tokens = self.num_input_tokens

    def tokens_for_grid(self, grid) -> int:
        rows, cols = check_grid("grid", grid)
        return rows * cols

    def forward(self, x: Tensor, visual_grids: Optional[Sequence] = None
                ) -> Union[Tensor, tuple[Tensor, list[int]]]:
        """``x [B, Nv, vision_width] -> [B, Nv, llm_width]``; or a packed batch ``x [total,
        vision_width]`` with ``visual_grids`` (one ``(rows, cols)`` per image) ->
        ``(y [total, llm_width], counts)``, ``counts[i] = rows_i * cols_i``."""
        if visual_grids is None:
            self.check_input(x)
            return self.mlp(x)
        grids = self.check_packed(x, visual_grids)
        return self.mlp(x), [r * c for r, c in grids]


@register_projector("mlp2x_gelu")
class MLP2xGELUProjector(MLPProjector):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear, GELU, Linear."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24)):
        super().__init__(vision_width, llm_width, visual_grid, depth=2)
        del self.config["depth"]


@register_projector("linear")
class LinearProjector(MLPProjector):
    """LLaVA-1's single ``nn.Linear``."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24)):
        super().__init__(vision_width, llm_width, visual_grid, depth=1)
        del self.config["depth"]
