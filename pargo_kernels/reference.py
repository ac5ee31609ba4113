"""Plain-PyTorch references: the oracle of every test and the ``"reference"`` backend.

They build the dense boolean mask and run eager attention, computing in at least float32 (in
float64 when given float64, which is how tests use them). Differentiable through autograd.
"""
from __future__ import annotations

import torch

from .masks import BandMask, PartialGlobalMask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked to -inf where ``mask`` is False) v; ``mask`` [Nq, Nv] bool.

    Every row of ``mask`` allows at least one key (the masks of this package guarantee it); a row
    whose allowed scores are all -inf gives 0, as ``F.scaled_dot_product_attention`` does.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    # SDPA's softmax (aten::_safe_softmax): a row whose scores are all -inf (only reachable with
    # -inf in the inputs) gets probabilities 0 rather than NaN, and zero gradients. The row is
    # zeroed before the softmax as well, so that its backward does not multiply by NaN.
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, v.to(compute)).to(q.dtype)


def partial_global_attention_reference(q, k, v, mask: PartialGlobalMask, scale: float):
    return masked_attention(q, k, v, mask.materialize(q.device), scale)


def band_attention_reference(q, k, v, mask: BandMask, scale: float):
    return masked_attention(q, k, v, mask.materialize(q.device), scale)
