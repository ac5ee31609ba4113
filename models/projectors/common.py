"""Pieces shared by the projectors: config bookkeeping and argument checks."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from pargo_kernels._validate import check_grid, check_int
from pargo_kernels.varlen_plan import check_grids

__all__ = ["BACKENDS", "IMPLS", "Projector", "check_backend", "check_dropout", "check_grid",
           "check_impl", "check_int", "check_pos_int", "offsets", "resolve_query_grid",
           "scaled_grid"]

IMPLS = ("kernels", "reference")
BACKENDS = ("auto", "triton", "cuda", "reference")  # pargo_kernels' backend names


def check_pos_int(name: str, value) -> int:
    return check_int(name, value, 1)


def check_dropout(value) -> float:
    """A dropout probability: a real number in ``[0, 1)`` (NaN, infinities and 1, which would
    zero every sub-layer output in training, are refused; ``nn.Dropout`` itself lets NaN
    through)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a real number in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:  # also False for NaN
        raise ValueError(f"dropout must be a probability in [0, 1), got {value}")
    return value


def resolve_query_grid(num_name: str, num, query_grid) -> tuple[int, int]:
    """The output grid of a pooling projector: ``query_grid=(rows, cols)`` if given, else a
    square grid of ``num`` (named ``num_name``) tokens, which must be a perfect square."""
    if query_grid is not None:
        return check_grid("query_grid", query_grid)
    num = check_pos_int(num_name, num)
    side = math.isqrt(num)
    if side * side != num:
        raise ValueError(f"{num_name} must be a perfect square (the pooled grid is square), got "
                         f"{num}; pass query_grid=(rows, cols) for another shape")
    return side, side


def scaled_grid(grid, base_in, base_out) -> tuple[int, int]:
    """The per-image rule of the packed batches: the output grid of an image of ``grid`` keeps
    the configured ``base_in -> base_out`` ratio on each axis, rounded half up, at least 1:
    ``out_a = max(1, floor(base_out_a * grid_a / base_in_a + 1/2))`` (exact integer arithmetic).
    ``scaled_grid(base_in, base_in, base_out) == base_out``; a ratio <= 1 keeps ``out_a <=
    grid_a``. E.g. 24x24 -> 18x16 maps 24x48 to 18x32 and 36x36 to 27x24."""
    return tuple(max(1, (2 * o * g + i) // (2 * i)) for g, i, o in zip(grid, base_in, base_out))


def offsets(counts) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: the ``cu_seqlens`` of a packed batch of ``counts`` tokens."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


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

    def check_packed(self, x, visual_grids) -> list[tuple[int, int]]:
        """Validate a packed batch: ``x [total, vision_width]`` holding images of
        ``visual_grids[i] = (rows_i, cols_i)`` back to back (row-major, CLS dropped), with
        ``total = sum(rows_i * cols_i)``; ``visual_grids`` is a sequence of pairs or an int
        tensor ``[n_images, 2]`` (a CUDA one is copied to the host once), as in the varlen
        ops. Returns the grids as int pairs."""
        if isinstance(visual_grids, torch.Tensor):  # the varlen ops' check: dtype, shape, values
            n = visual_grids.shape[0] if visual_grids.dim() == 2 else -1
            grids = check_grids("visual_grids", visual_grids, max(n, 0))
            if not grids:
                raise ValueError("visual_grids must name at least one image, got shape "
                                 f"{tuple(visual_grids.shape)}")
        else:
            if isinstance(visual_grids, (str, bytes)) or not hasattr(visual_grids, "__len__"):
                raise TypeError("visual_grids must be a sequence of (rows, cols) pairs, one per "
                                f"image, or an int tensor [n_images, 2], got "
                                f"{type(visual_grids).__name__}")
            if len(visual_grids) == 0:
                raise ValueError("visual_grids must name at least one image, got an empty "
                                 "sequence")
            grids = [check_grid(f"visual_grids[{i}]", g) for i, g in enumerate(visual_grids)]
        total = sum(r * c for r, c in grids)
        if x.dim() != 2 or x.shape[0] != total or x.shape[1] != self.vision_width:
            raise ValueError(
                f"{type(self).__name__} expects a packed x of shape [{total}, "
                f"{self.vision_width}] (the sum of rows*cols over visual_grids, vision_width "
                f"{self.vision_width}), got {tuple(x.shape)}")
        return grids

    def tokens_for_grid(self, grid) -> int:
        """Output tokens this projector gives an image of ``grid = (rows, cols)`` in a packed
        batch (the count per image that ``forward(x, visual_grids=...)`` returns)."""
        raise NotImplementedError(f"{type(self).__name__} does not take packed batches")

    def extra_repr(self) -> str:
        return (f"{self.num_input_tokens} tokens x {self.vision_width} -> "
                f"{self.num_visual_tokens} tokens x {self.llm_width}")
