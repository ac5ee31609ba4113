"""DeCo (decoupling token compression from semantic abstraction): 2-D adaptive average pooling of
the patch-token grid to ``query_num`` tokens, then LLaVA-1.5's 2-layer GELU MLP.

``impl="kernels"`` runs the pooling and the first Linear with :func:`adaptive_avg_pool_project`
(by default the pooling kernel, then ``F.linear``; see its docstring for why not the fused
kernel); ``impl="reference"`` runs ``F.adaptive_avg_pool2d`` then ``nn.Linear``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from pargo_kernels import adaptive_avg_pool_project
from pargo_kernels.pooling import pool_project_reference

from .common import (Projector, check_backend, check_grid, check_impl, check_pos_int,
                     resolve_query_grid)
from .registry import register_projector


@register_projector("deco")
class DeCoProjector(Projector):
    """Args:
        vision_width, llm_width, visual_grid: as every projector.
        query_num: output tokens, a perfect square (DeCo: 144 = 12x12, or 64); or give
            ``query_grid=(rows, cols)`` instead for a non-square grid.
        impl: ``"kernels"`` (adaptive_avg_pool_project: pooling + first Linear) or ``"reference"``.
        backend: backend of that op (``"auto"``, ``"triton"``, ``"reference"``).
    """

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 query_num: Optional[int] = 144, query_grid=None, impl: str = "kernels",
                 backend: str = "auto"):
        vision_width = check_pos_int("vision_width", vision_width)
        llm_width = check_pos_int("llm_width", llm_width)
        visual_grid = check_grid("visual_grid", visual_grid)
        query_grid = resolve_query_grid("query_num", query_num, query_grid)
        check_backend(backend)
        super().__init__(dict(vision_width=vision_width, llm_width=llm_width,
                              visual_grid=list(visual_grid), query_grid=list(query_grid),
                              impl=check_impl(impl), backend=backend))
        self.impl, self.backend = impl, backend
        self.query_grid = query_grid
        self.num_visual_tokens = query_grid[0] * query_grid[1]
        self.fc1 = nn.Linear(vision_width, llm_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, x: Tensor, impl: Optional[str] = None) -> Tensor:
        self.check_input(x)
        impl = check_impl(impl or self.impl)
        if impl == "kernels":
            h = adaptive_avg_pool_project(x, self.fc1.weight.to(x.dtype),
                                          self.fc1.bias.to(x.dtype), in_grid=self.visual_grid,
                                          out_grid=self.query_grid, backend=self.backend)
        else:
            h = pool_project_reference(x, self.fc1.weight.to(x.dtype), self.fc1.bias.to(x.dtype),
                                       self.visual_grid, self.query_grid)
        return self.fc2(self.act(h))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool {self.visual_grid} -> {self.query_grid}, " \
               f"impl={self.impl!r}"


__all__ = ["DeCoProjector"]
