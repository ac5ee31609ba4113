"""Mask descriptions: small validated objects, never dense tensors on the fast path.

Kernels receive a mask as ``(kind, params)``: a small int and five int scalars. A dense boolean
``[n_query, n_key]`` tensor exists only through :meth:`materialize`, for tests, references and
benchmarks of the dense baselines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._validate import check_grid, check_int

# Mask kinds understood by the kernels (a constexpr there).
KIND_PG1D = 0  # partial queries on 1-D windows, then global queries
KIND_PG2D = 1  # partial queries on a 2-D grid of adaptive windows, then global queries
KIND_BAND = 2  # query i sees keys [i - left, i + right]
KIND_PARGO_SELF = 3  # band among rows [0, Np) within [0, Np), then rows [Np, N) see [Np, N)

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class PartialGlobalMask:
    """ParGo's partial-global cross-attention mask (DESIGN.md §1).

    The first ``n_partial`` queries are partial, the remaining ``n_query - n_partial`` global.

    * 1-D (no grids): partial query ``i`` sees keys ``[floor(i*Nv/Np), floor((i+1)*Nv/Np))``.
    * 2-D (``visual_grid=(Hv, Wv)`` and ``partial_grid=(hp, wp)``, both row-major): partial query
      ``(r, c)`` sees key ``(y, x)`` with ``y`` in ``[floor(r*Hv/hp), ceil((r+1)*Hv/hp))`` and
      ``x`` in ``[floor(c*Wv/wp), ceil((c+1)*Wv/wp))``, the windows of ``adaptive_avg_pool2d``.
    * global queries see every key.

    Every window is non-empty, so no row of the mask is fully masked.
    """

    n_query: int
    n_key: int
    n_partial: int
    visual_grid: Optional[tuple[int, int]] = None
    partial_grid: Optional[tuple[int, int]] = None

    def __post_init__(self):
        nq = check_int("n_query", self.n_query, 1)
        nv = check_int("n_key", self.n_key, 1)
        np_ = check_int("n_partial", self.n_partial, 0)
        if np_ > nq:
            raise ValueError(f"n_partial ({np_}) must be <= the number of queries Nq ({nq})")
        if np_ > nv:
            raise ValueError(f"n_partial ({np_}) must be <= the number of keys Nv ({nv}): "
                             "otherwise some partial windows would be empty")
        if np_ * nv > _INT32_MAX:
            raise ValueError(f"n_partial * Nv = {np_ * nv} exceeds 2**31 - 1, which the kernels' "
                             "int32 window arithmetic supports")
        if (self.visual_grid is None) != (self.partial_grid is None):
            raise ValueError("visual_grid and partial_grid must be given together (2-D windows) "
                             f"or both left None (1-D windows); got visual_grid={self.visual_grid!r}"
                             f", partial_grid={self.partial_grid!r}")
        if self.visual_grid is not None:
            hv, wv = check_grid("visual_grid", self.visual_grid)
            hp, wp = check_grid("partial_grid", self.partial_grid)
            if hv * wv != nv:
                raise ValueError(f"visual_grid {hv}x{wv} = {hv * wv} tokens does not match the "
                                 f"number of keys Nv = {nv}")
            if hp * wp != np_:
                raise ValueError(f"partial_grid {hp}x{wp} = {hp * wp} queries does not match "
                                 f"n_partial = {np_}")
            object.__setattr__(self, "visual_grid", (hv, wv))
            object.__setattr__(self, "partial_grid", (hp, wp))

    @property
    def n_global(self) -> int:
        return self.n_query - self.n_partial

    @property
    def kind(self) -> int:
        return KIND_PG1D if self.visual_grid is None else KIND_PG2D

    @property
    def params(self) -> tuple[int, int, int, int, int]:
        if self.visual_grid is None:
            return (self.n_partial, 0, 0, 0, 0)
        return (self.n_partial, *self.visual_grid, *self.partial_grid)

    def materialize(self, device=None) -> torch.Tensor:
        """Dense boolean ``[n_query, n_key]`` mask, True where attention is allowed (tests only)."""
        nq, nv, np_ = self.n_query, self.n_key, self.n_partial
        mask = torch.ones(nq, nv, dtype=torch.bool, device=device)
        if np_ == 0:
            return mask
        if self.visual_grid is None:
            i = torch.arange(np_, device=device)
            lo, hi = i * nv // np_, (i + 1) * nv // np_
            j = torch.arange(nv, device=device)
            mask[:np_] = (j >= lo[:, None]) & (j < hi[:, None])
            return mask
        (hv, wv), (hp, wp) = self.visual_grid, self.partial_grid
        rows = _adaptive_windows(hv, hp, device)  # [hp, Hv]
        cols = _adaptive_windows(wv, wp, device)  # [wp, Wv]
        part = rows[:, None, :, None] & cols[None, :, None, :]  # [hp, wp, Hv, Wv]
        mask[:np_] = part.reshape(np_, nv)
        return mask


def _adaptive_windows(n_in: int, n_out: int, device) -> torch.Tensor:
    """[n_out, n_in] bool: output i covers inputs [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    i = torch.arange(n_out, device=device)
    lo = i * n_in // n_out
    hi = -((-(i + 1) * n_in) // n_out)
    j = torch.arange(n_in, device=device)
    return (j >= lo[:, None]) & (j < hi[:, None])


@dataclass(frozen=True)
class BandMask:
    """Banded self-attention (DESIGN.md §2): query ``i`` sees key ``j`` iff
    ``i - left <= j <= i + right``. Windows wider than ``n`` are valid and clipped, however
    large (``2**64`` included): every backend sees the same clipped band."""

    n: int
    left: int
    right: int

    def __post_init__(self):
        check_int("n", self.n, 1)
        left, right = _check_window(self.left, self.right)
        object.__setattr__(self, "left", left)  # Python ints (numpy ints accepted)
        object.__setattr__(self, "right", right)

    n_query = property(lambda self: self.n)
    n_key = property(lambda self: self.n)
    kind = KIND_BAND

    @property
    def params(self) -> tuple[int, int, int, int, int]:
        # Clipping keeps i + right + 1 inside int32 and changes nothing: no key lies beyond n.
        return (min(self.left, self.n - 1), min(self.right, self.n - 1), 0, 0, 0)

    def materialize(self, device=None) -> torch.Tensor:
        i = torch.arange(self.n, device=device)
        d = i[None, :] - i[:, None]  # j - i, in (-n, n): a wider window changes nothing
        return (d >= -min(self.left, self.n)) & (d <= min(self.right, self.n))


@dataclass(frozen=True)
class ParGoSelfMask:
    """ParGo's whole self-attention over ``n`` queries (DESIGN.md §4): partial rows
    ``i < n_partial`` see keys ``j < n_partial`` with ``i - left <= j <= i + right``; global rows
    ``i >= n_partial`` see keys ``[n_partial, n)``; nothing crosses between the two groups.

    ``left = right = None`` (the released ParGo code's static mask) lets every partial row see
    every partial key. Windows wider than ``n_partial`` are valid and clipped. ``n_partial = 0``
    is full attention over ``n``; ``n_partial = n`` a pure band. Every row sees itself.
    """

    n: int
    n_partial: int
    left: Optional[int] = None
    right: Optional[int] = None

    def __post_init__(self):
        n = check_int("n", self.n, 1)
        np_ = check_int("n_partial", self.n_partial, 0)
        if np_ > n:
            raise ValueError(f"n_partial ({np_}) must be <= the number of tokens N ({n})")
        if (self.left is None) != (self.right is None):
            raise ValueError("window must be a pair (left, right) of non-negative ints or None, "
                             f"got left={self.left!r}, right={self.right!r}")
        if self.left is not None:
            left, right = _check_window(self.left, self.right)
            object.__setattr__(self, "left", left)
            object.__setattr__(self, "right", right)

    n_query = n_key = property(lambda self: self.n)
    kind = KIND_PARGO_SELF

    @property
    def params(self) -> tuple[int, int, int, int, int]:
        # (n_partial, left, right): None and wider windows are clipped to n_partial - 1, which
        # changes nothing (no partial key lies beyond) and keeps i + right + 1 inside int32.
        span = max(self.n_partial - 1, 0)
        left = span if self.left is None else min(self.left, span)
        right = span if self.right is None else min(self.right, span)
        return (self.n_partial, left, right, 0, 0)

    def materialize(self, device=None) -> torch.Tensor:
        """Dense boolean ``[n, n]`` mask, True where attention is allowed (tests only); built from
        the unclipped window, independently of :attr:`params`."""
        window = (self.n, self.n) if self.left is None else (self.left, self.right)
        band = BandMask(self.n, *window).materialize(device)
        partial = torch.arange(self.n, device=device) < self.n_partial
        same = partial[:, None] == partial[None, :]
        return same & (band | ~partial[:, None])


def _check_window(left, right) -> tuple[int, int]:
    return check_int("window[0] (left)", left, 0), check_int("window[1] (right)", right, 0)


def ascii_mask(mask: torch.Tensor, max_cols: int = 72) -> str:
    """Render a small boolean mask as text ('#' allowed, '.' masked), for docs and debugging."""
    m = mask.to("cpu")
    if m.shape[1] > max_cols:
        raise ValueError(f"mask has {m.shape[1]} columns; at most {max_cols} render legibly")
    return "\n".join("".join("#" if b else "." for b in row.tolist()) for row in m)
