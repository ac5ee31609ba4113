"""BERT-style query-transformer layers (the Q-Former / ParGo layer), with the attention pattern
supplied as a small mask object and computed either by the block-sparse kernels or by the dense
reference.

One layer is, in order (post-LayerNorm residuals, as in BERT and BLIP-2's Q-Former):

1. self-attention among the queries (ParGo: a band among the partial queries, full among the
   global ones, nothing across; Q-Former: full),
2. cross-attention from the queries to the visual features (ParGo: the partial-global mask;
   Q-Former: full),
3. feed-forward (Linear, GELU, Linear).

Module names follow Hugging Face's ``BertLayer`` (``query``/``key``/``value``/``dense``/
``LayerNorm``) so a ``BertModel``'s weights load by name (:func:`load_bert_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pargo_kernels import band_attention, partial_global_attention
from pargo_kernels.masks import BandMask, PartialGlobalMask


# --------------------------------------------------------------------------------------------
# attention patterns: what a query may see, as small objects (never a dense mask on the fast path)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySelfPattern:
    """Self-attention among ``n_partial + n_global`` queries: partial query ``i`` sees partial
    query ``j`` iff ``i - left <= j <= i + right`` (``window``); global queries see all global
    queries; partial and global queries do not see each other."""

    n_partial: int
    n_global: int
    window: tuple[int, int]

    def kernels(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        np_, ng = self.n_partial, self.n_global
        parts = []
        if np_:
            parts.append(band_attention(q[:, :, :np_], k[:, :, :np_], v[:, :, :np_],
                                        self.window, backend=backend))
        if ng:
            parts.append(band_attention(q[:, :, np_:], k[:, :, np_:], v[:, :, np_:],
                                        (ng - 1, ng - 1), backend=backend))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def materialize(self, device=None) -> Tensor:
        """Dense boolean ``[N, N]`` mask (reference path and tests only)."""
        np_, ng = self.n_partial, self.n_global
        mask = torch.zeros(np_ + ng, np_ + ng, dtype=torch.bool, device=device)
        if np_:
            mask[:np_, :np_] = BandMask(np_, *self.window).materialize(device)
        mask[np_:, np_:] = True
        return mask


@dataclass(frozen=True)
class CrossPattern:
    """Cross-attention of ``n_query`` queries to ``n_key`` visual tokens with the partial-global
    mask (``n_partial = 0``: every query sees every token, as in a Q-Former)."""

    mask: PartialGlobalMask

    def kernels(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        m = self.mask
        return partial_global_attention(q, k, v, m.n_partial, visual_grid=m.visual_grid,
                                        partial_grid=m.partial_grid, backend=backend)

    def materialize(self, device=None) -> Tensor:
        return self.mask.materialize(device)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                    probs_hook: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """The official eager computation: scores in the input dtype, ``-inf`` where ``mask`` is
    False, softmax in fp32 rounded back to the input dtype (as BERT does under autocast), P @ V.
    The reference path of the projectors; in float64 it is the tests' oracle.

    ``probs_hook``, when given, is called with the probabilities ``P`` ``[B, H, Nq, Nk]`` (still
    in the autograd graph, e.g. to ``retain_grad()`` them for relevance maps)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    if probs_hook is not None:
        probs_hook(p)
    return torch.matmul(p, v)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention + output projection + dropout + post-LayerNorm residual (BERT's
    ``BertAttention``). ``kv_width`` is the width of the keys' source (the vision width for
    cross-attention).

    ``probs_hook`` (default None): set it to a callable to receive the attention probabilities
    of every reference-path call (``impl="reference"``; see :func:`eager_attention`); the
    kernels path never materialises them and ignores it."""

    probs_hook: Optional[Callable[[Tensor], None]] = None

    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, d], no copy

    def forward(self, x: Tensor, source: Tensor, pattern, impl: str, backend: str) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), \
            self._heads(self.value(source))
        if impl == "kernels":
            o = pattern.kernels(q, k, v, backend)
        else:
            o = eager_attention(q, k, v, pattern.materialize(x.device),
                                probs_hook=self.probs_hook)
        o = o.transpose(1, 2).reshape(x.shape)
        return self.LayerNorm(x + self.dropout(self.dense(o)))


class FeedForward(nn.Module):
    """BERT's ``BertIntermediate`` + ``BertOutput``: Linear, GELU, Linear, dropout, post-LN."""

    def __init__(self, hidden: int, intermediate: int, eps: float, dropout: float):
        super().__init__()
        self.intermediate = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.output = nn.Linear(intermediate, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(x + self.dropout(self.output(self.act(self.intermediate(x)))))


class QueryLayer(nn.Module):
    """Self-attention, cross-attention to the visual features, feed-forward."""

    def __init__(self, hidden: int, heads: int, intermediate: int, vision_width: int,
                 eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.attention = Attention(hidden, heads, hidden, eps, dropout)
        self.crossattention = Attention(hidden, heads, vision_width, eps, dropout)
        self.ffn = FeedForward(hidden, intermediate, eps, dropout)

    def forward(self, x: Tensor, visual: Tensor, self_pattern, cross_pattern, impl: str,
                backend: str) -> Tensor:
        x = self.attention(x, x, self_pattern, impl, backend)
        x = self.crossattention(x, visual, cross_pattern, impl, backend)
        return self.ffn(x)


def load_bert_weights(layers: nn.ModuleList, query_norm: Optional[nn.LayerNorm], bert) -> list[str]:
    """Copy a Hugging Face ``BertModel``'s (or its ``state_dict``'s) weights into ``layers``: each
    layer's self-attention, its feed-forward and (``query_norm``) the embeddings' LayerNorm, as
    BLIP-2 and the official ParGo initialise from BERT. The first ``len(layers)`` BERT layers are
    used. Cross-attention weights have no BERT counterpart and keep their initialisation.

    Returns the names of the parameters that were loaded. Raises ``ValueError`` when BERT has
    fewer layers, another width or (given a ``BertModel``) another head count than the projector.
    A bare state dict carries no head count: the caller vouches for it.
    """
    sd = bert.state_dict() if isinstance(bert, nn.Module) else dict(bert)
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    n_bert = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")),
                     default=-1)
    if n_bert < len(layers):
        raise ValueError(f"bert has {n_bert} layers but the projector has {len(layers)}")
    names = {
        "attention.query": "attention.self.query", "attention.key": "attention.self.key",
        "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
        "attention.LayerNorm": "attention.output.LayerNorm",
        "ffn.intermediate": "intermediate.dense", "ffn.output": "output.dense",
        "ffn.LayerNorm": "output.LayerNorm",
    }
    ours = {}
    for i, layer in enumerate(layers):
        for mine, theirs in names.items():
            for p in ("weight", "bias"):
                ours[f"{i}.{mine}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    loaded = []
    own = dict(layers.named_parameters())
    heads = layers[0].attention.heads
    if isinstance(bert, nn.Module) and hasattr(bert, "config"):
        if bert.config.num_attention_heads != heads:
            raise ValueError(f"bert has {bert.config.num_attention_heads} attention heads but "
                             f"the projector has {heads}")
    with torch.no_grad():
        for mine, theirs in ours.items():
            if theirs not in sd:
                raise ValueError(f"bert weights lack {theirs!r}")
            if sd[theirs].shape != own[mine].shape:
                raise ValueError(f"bert {theirs} has shape {tuple(sd[theirs].shape)} but the "
                                 f"projector's {mine} has {tuple(own[mine].shape)} (hidden or "
                                 "intermediate size differ)")
            own[mine].copy_(sd[theirs])
            loaded.append(mine)
        if query_norm is not None:
            for p in ("weight", "bias"):
                src = sd[f"embeddings.LayerNorm.{p}"]
                getattr(query_norm, p).copy_(src)
                loaded.append(f"query_norm.{p}")
    return loaded
