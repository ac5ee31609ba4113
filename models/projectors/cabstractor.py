"""Honeybee's C-Abstractor: RegNet bottleneck stages (timm's ``RegStage``: depthwise 3x3
convolutions, squeeze-excitation, SiLU, LayerNorm2d) on the patch grid, adaptive average pooling
to ``num_queries`` tokens, more stages, and an MLP read-out with SiLU. 1024 -> 4096 at Honeybee's
sizes: 37,398,016 parameters (tests/test_projector_sources.py).

The pooling runs through :func:`pargo_kernels.adaptive_avg_pool_tokens` with ``impl="kernels"``
(``F.adaptive_avg_pool2d`` with ``impl="reference"``); the convolutions are cuDNN's.

A packed batch (``forward(x [total, C], visual_grids=[...])``) runs per image, looping over the
distinct grids (images of one grid form one batch of the fixed-shape computation; a padded
convolution would leak padding into the 3x3 convolutions and the squeeze-excitation means):
the position embedding is resampled bilinearly to the image's grid (``align_corners=False``,
as ViTs do) and the image is pooled to
:func:`~models.projectors.common.scaled_grid` of the configured ``visual_grid -> query_grid``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pargo_kernels import adaptive_avg_pool_tokens

from .common import (Projector, check_backend, check_grid, check_impl, check_pos_int, offsets,
                     resolve_query_grid, scaled_grid)
from .registry import register_projector


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``[B, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Bottleneck(nn.Module):
    """timm's RegNet ``Bottleneck`` as Honeybee's ``RegStage`` builds it (``bottle_ratio=1``,
    ``group_size=1``, ``se_ratio=0.25``, SiLU, LayerNorm2d, ``downsample="conv1x1"``): 1x1 conv,
    depthwise 3x3 conv (``groups = channels / group_size``), squeeze-excitation of
    ``round(c_in * se_ratio)`` channels, 1x1 conv, a norm after each conv, SiLU after the first
    two and after the residual sum; the shortcut is a 1x1 conv + norm when the width changes.

    Written here rather than imported because timm is not a dependency (it pulls torchvision);
    tests/test_projector_sources.py checks the layer shapes against timm's definition."""

    def __init__(self, c_in: int, c_out: int, se_ratio: float = 0.25):
        super().__init__()
        mid = c_out  # bottle_ratio = 1
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.norm1 = LayerNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)  # group_size 1
        self.norm2 = LayerNorm2d(mid)
        # timm's SEModule: rd_channels = round(c_in * se_ratio), or when that is 0, its default
        # make_divisible(mid / 16, 8) (only tiny widths reach it).
        se = int(round(c_in * se_ratio)) or max(8, int(mid / 16 + 4) // 8 * 8)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, se, 1), nn.SiLU(),
                                nn.Conv2d(se, mid, 1), nn.Sigmoid())
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.norm3 = LayerNorm2d(c_out)
        self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, bias=False), LayerNorm2d(c_out))
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.act(self.norm2(self.conv2(h)))
        h = h * self.se(h)
        h = self.norm3(self.conv3(h))
        return self.act(h + self.shortcut(x))


def _stage(depth: int, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*(Bottleneck(c_in if i == 0 else c_out, c_out) for i in range(depth)))


@register_projector("cabstractor")
class CAbstractor(Projector):
    """Args:
        vision_width, llm_width, visual_grid: as every projector.
        num_queries: output tokens, a perfect square (Honeybee: 144 or 256); or
            ``query_grid=(rows, cols)``.
        hidden: width of the convolutional stages (Honeybee: 1024). depth: blocks per stage
            (Honeybee: 3). mlp_depth: Linear layers of the read-out (Honeybee: 2, SiLU between,
            its ``build_mlp``).
        pos_emb: add a learnable position embedding to the input tokens (Honeybee does).
        impl / backend: pooling by ``adaptive_avg_pool_tokens`` (``"kernels"``) or
            ``F.adaptive_avg_pool2d`` (``"reference"``).
    """

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 num_queries: Optional[int] = 144, query_grid=None, hidden: int = 1024,
                 depth: int = 3, mlp_depth: int = 2, pos_emb: bool = True,
                 impl: str = "kernels", backend: str = "auto"):
        vision_width, llm_width, hidden, depth, mlp_depth = (check_pos_int(n, v) for n, v in (
            ("vision_width", vision_width), ("llm_width", llm_width), ("hidden", hidden),
            ("depth", depth), ("mlp_depth", mlp_depth)))
        visual_grid = check_grid("visual_grid", visual_grid)
        query_grid = resolve_query_grid("num_queries", num_queries, query_grid)
        check_backend(backend)
        super().__init__(dict(vision_width=vision_width, llm_width=llm_width,
                              visual_grid=list(visual_grid), query_grid=list(query_grid),
                              hidden=hidden, depth=depth, mlp_depth=mlp_depth,
                              pos_emb=bool(pos_emb), impl=check_impl(impl), backend=backend))
        self.impl, self.backend, self.query_grid = impl, backend, query_grid
        self.num_visual_tokens = query_grid[0] * query_grid[1]
        self.pos_emb = nn.Parameter(torch.zeros(1, self.num_input_tokens, vision_width)) \
            if pos_emb else None
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.stage1 = _stage(depth, vision_width, hidden)
        self.stage2 = _stage(depth, hidden, hidden)
        readout: list[nn.Module] = [nn.Linear(hidden, llm_width)]
        for _ in range(mlp_depth - 1):
            readout += [nn.SiLU(), nn.Linear(llm_width, llm_width)]
        self.readout = nn.Sequential(*readout)

    def tokens_for_grid(self, grid) -> int:
        rows, cols = scaled_grid(check_grid("grid", grid), self.visual_grid, self.query_grid)
        return rows * cols

    def forward(self, x: Tensor, visual_grids: Optional[Sequence] = None,
                impl: Optional[str] = None) -> Union[Tensor, tuple[Tensor, list[int]]]:
        """``x [B, Nv, vision_width] -> [B, num_queries, llm_width]``; or a packed batch ``x
        [total, vision_width]`` with ``visual_grids`` -> ``(y [total_out, llm_width], counts)``
        (module docstring)."""
        impl = check_impl(impl or self.impl)
        if visual_grids is not None:
            return self._forward_packed(x, visual_grids, impl)
        self.check_input(x)
        return self._forward_grid(x, self.visual_grid, self.query_grid, self.pos_emb, impl)

    def _forward_packed(self, x: Tensor, visual_grids, impl: str):
        grids = self.check_packed(x, visual_grids)
        cu = offsets(r * c for r, c in grids)
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        outs: list[Optional[Tensor]] = [None] * len(grids)
        for g, images in by_grid.items():
            y = self._forward_grid(torch.stack([x[cu[i]:cu[i + 1]] for i in images]), g,
                                   scaled_grid(g, self.visual_grid, self.query_grid),
                                   self._pos_emb_for(g), impl)
            for i, yi in zip(images, y):
                outs[i] = yi
        return torch.cat(outs, 0), [o.shape[0] for o in outs]

    def _pos_emb_for(self, grid) -> Optional[Tensor]:
        """The position embedding resampled to ``grid`` (bilinear, ``align_corners=False``)."""
        if self.pos_emb is None or grid == self.visual_grid:
            return self.pos_emb
        table = self.pos_emb.transpose(1, 2).reshape(1, self.vision_width, *self.visual_grid)
        table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def _forward_grid(self, x: Tensor, grid, query_grid, pos_emb, impl: str) -> Tensor:
        """``x [B, rows*cols, vision_width]`` of ``grid`` -> ``[B, qrows*qcols, llm_width]``."""
        if pos_emb is not None:
            x = x + pos_emb.to(x.dtype)
        (h, w), (qh, qw) = grid, query_grid
        b = x.shape[0]
        img = self.stage1(x.transpose(1, 2).reshape(b, self.vision_width, h, w))
        c = img.shape[1]
        if impl == "kernels":
            tokens = img.permute(0, 2, 3, 1).reshape(b, h * w, c)
            pooled = adaptive_avg_pool_tokens(tokens, (h, w), (qh, qw), backend=self.backend)
            img = pooled.transpose(1, 2).reshape(b, c, qh, qw)
        else:
            img = F.adaptive_avg_pool2d(img, (qh, qw))
        img = self.stage2(img)
        return self.readout(img.flatten(2).transpose(1, 2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool {self.visual_grid} -> {self.query_grid}, " \
               f"impl={self.impl!r}"

