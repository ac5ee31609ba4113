"""Pieces shared by the projectors: config bookkeeping and argument checks."""
from __future__ import annotations

import numbers

from torch import nn

IMPLS = ("kernels", "reference")


def check_pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def check_grid(name: str, grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"{name} must be a pair (rows, cols) of positive ints, got {grid!r}")
    return check_pos_int(f"{name}[0]", grid[0]), check_pos_int(f"{name}[1]", grid[1])


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class Projector(nn.Module):
    """Base class: stores the JSON config and checks the input of ``forward``.

    Subclasses call ``super().__init__(config)`` with their constructor arguments (the registry
    name is added) and set ``num_visual_tokens``.
    """
    projector_name = "projector"

    def __init__(self, config: dict):
        super().__init__()
        self.config = {"name": self.projector_name, **config}
        self.vision_width = config["vision_width"]
        self.llm_width = config["llm_width"]
        self.visual_grid = tuple(config["visual_grid"])
        self.num_input_tokens = self.visual_grid[0] * self.visual_grid[1]
        self.num_visual_tokens = 0

    def check_input(self, x):
        if x.dim() != 3 or x.shape[1] != self.num_input_tokens or x.shape[2] != self.vision_width:
            raise ValueError(
                f"{type(self).__name__} expects x of shape [B, {self.num_input_tokens}, "
                f"{self.vision_width}] (visual_grid {self.visual_grid}, vision_width "
                f"{self.vision_width}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return (f"{self.num_input_tokens} tokens x {self.vision_width} -> "
                f"{self.num_visual_tokens} tokens x {self.llm_width}")
