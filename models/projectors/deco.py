"""DeCo (decoupling token compression from semantic abstraction): 2-D adaptive average pooling of
the patch-token grid to ``query_num`` tokens, then LLaVA-1.5's 2-layer GELU MLP.

``impl="kernels"`` runs the pooling and the first Linear with :func:`adaptive_avg_pool_project`
(by default the pooling kernel, then ``F.linear``; see its docstring for why not the fused
kernel); ``impl="reference"`` runs ``F.adaptive_avg_pool2d`` then ``nn.Linear``.

A packed batch (``forward(x [total, C], visual_grids=[...])``) pools each image to its own grid,
:func:`~models.projectors.common.scaled_grid` of the configured ``visual_grid -> query_grid``
(e.g. 24x24 -> 12x12 pools 24x48 to 12x24 and 36x36 to 18x18), in one
:func:`adaptive_avg_pool_project_varlen` call (``impl="reference"``: per image).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pargo_kernels import adaptive_avg_pool_project, adaptive_avg_pool_project_varlen
from pargo_kernels.pooling import pool_project_reference

from .common import (Projector, check_backend, check_grid, check_impl, check_pos_int, offsets,
                     resolve_query_grid, scaled_grid)
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

    def tokens_for_grid(self, grid) -> int:
        rows, cols = scaled_grid(check_grid("grid", grid), self.visual_grid, self.query_grid)
        return rows * cols

    def forward(self, x: Tensor, visual_grids: Optional[Sequence] = None,
                impl: Optional[str] = None) -> Union[Tensor, tuple[Tensor, list[int]]]:
        """``x [B, Nv, vision_width] -> [B, query_num, llm_width]``; or a packed batch ``x
        [total, vision_width]`` with ``visual_grids`` -> ``(y [total_out, llm_width], counts)``,
        each image pooled to its own grid (module docstring)."""
        impl = check_impl(impl or self.impl)
        weight, bias = self.fc1.weight.to(x.dtype), self.fc1.bias.to(x.dtype)
        if visual_grids is not None:
            h, counts = self._pool_packed(x, visual_grids, weight, bias, impl)
            return self.fc2(self.act(h)), counts
        self.check_input(x)
        if impl == "kernels":
            h = adaptive_avg_pool_project(x, weight, bias, in_grid=self.visual_grid,
                                          out_grid=self.query_grid, backend=self.backend)
        else:
            h = pool_project_reference(x, weight, bias, self.visual_grid, self.query_grid)
        return self.fc2(self.act(h))

    def _pool_packed(self, x, visual_grids, weight, bias, impl):
        grids = self.check_packed(x, visual_grids)
        outs = [scaled_grid(g, self.visual_grid, self.query_grid) for g in grids]
        cu = offsets(r * c for r, c in grids)
        if impl == "kernels":
            h, _ = adaptive_avg_pool_project_varlen(x, weight, bias, cu, grids, outs,
                                                    backend=self.backend)
        else:
            h = torch.cat([pool_project_reference(x[None, a:b], weight, bias, g, o)[0]
                           for a, b, g, o in zip(cu, cu[1:], grids, outs)])
        return h, [r * c for r, c in outs]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool {self.visual_grid} -> {self.query_grid}, " \
               f"impl={self.impl!r}"


__all__ = ["DeCoProjector"]
