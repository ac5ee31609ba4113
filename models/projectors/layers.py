"""BERT-style query-transformer layers (the Q-Former / ParGo layer), with the attention pattern
supplied as a small mask object and computed either by the block-sparse kernels or by the dense
reference.

One layer is, in order (post-LayerNorm residuals, as in BERT and BLIP-2's Q-Former):

1. self-attention among the queries (ParGo: partial queries among themselves, global ones among
   themselves, :class:`models.projectors.pargo.QuerySelfPattern`; Q-Former: full),
2. cross-attention from the queries to the visual features (ParGo: the partial-global mask;
   Q-Former: full), absent in a layer built with ``cross=False`` (BLIP-2's every other layer),
3. feed-forward (Linear, GELU, Linear).

Module names follow Hugging Face's ``BertLayer`` (``query``/``key``/``value``/``dense``/
``LayerNorm``) so a ``BertModel``'s weights load by name (:func:`load_bert_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pargo_kernels import partial_global_attention
from pargo_kernels.masks import PartialGlobalMask


# --------------------------------------------------------------------------------------------
# attention patterns: what a query may see, as small objects (never a dense mask on the fast path)
# --------------------------------------------------------------------------------------------
class DensePattern:
    """Mixin of the fixed-shape patterns: the reference path is eager attention under the dense
    mask of ``materialize`` (a pattern object provides ``kernels(q, k, v, backend)`` and
    ``reference(q, k, v, probs_hook)``, both on ``[B, H, N, D]``)."""

    def reference(self, q: Tensor, k: Tensor, v: Tensor,
                  probs_hook: Optional[Callable[[Tensor], None]] = None) -> Tensor:
        return eager_attention(q, k, v, self.materialize(q.device), probs_hook=probs_hook)


@dataclass(frozen=True)
class CrossPattern(DensePattern):
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
        b, n, width = x.shape  # explicit head size: -1 is ambiguous when B or N is 0
        return x.view(b, n, self.heads, width // self.heads).transpose(1, 2)  # [B, H, N, d]

    def forward(self, x: Tensor, source: Tensor, pattern, impl: str, backend: str) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), \
            self._heads(self.value(source))
        if impl == "kernels":
            o = pattern.kernels(q, k, v, backend)
        else:
            o = pattern.reference(q, k, v, self.probs_hook)
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
    """Self-attention, cross-attention to the visual features (``cross=False``: none,
    ``crossattention`` is None), feed-forward."""

    def __init__(self, hidden: int, heads: int, intermediate: int, vision_width: int,
                 eps: float = 1e-12, dropout: float = 0.0, cross: bool = True):
        super().__init__()
        self.attention = Attention(hidden, heads, hidden, eps, dropout)
        self.crossattention = Attention(hidden, heads, vision_width, eps, dropout) \
            if cross else None
        self.ffn = FeedForward(hidden, intermediate, eps, dropout)

    def forward(self, x: Tensor, visual: Tensor, self_pattern, cross_pattern, impl: str,
                backend: str) -> Tensor:
        x = self.attention(x, x, self_pattern, impl, backend)
        if self.crossattention is not None:
            x = self.crossattention(x, visual, cross_pattern, impl, backend)
        return self.ffn(x)


# BERT parameter names (Hugging Face BertLayer) of ours, without the "weight" / "bias" suffix.
_BERT_ATTENTION = {
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
    "attention.LayerNorm": "attention.output.LayerNorm",
}
_BERT_FFN = {"ffn.intermediate": "intermediate.dense", "ffn.output": "output.dense",
             "ffn.LayerNorm": "output.LayerNorm"}


def load_bert_weights(layers: nn.ModuleList, query_norm: Optional[nn.LayerNorm], bert, *,
                      position_embeddings: Optional[nn.Parameter] = None,
                      copy_ffn: bool = False) -> list[str]:
    """Copy a Hugging Face ``BertModel``'s (or its ``state_dict``'s) weights into a query
    transformer, as the released ParGo ``init_ParGo`` does (``BertLMHeadModel.from_pretrained``):

    * BERT layer ``i``'s self-attention into ``layers[i]``, for ``i < min(len(layers), n_bert)``:
      a BERT with more layers lends its first ones; with fewer, the projector's extra layers
      keep their fresh initialisation;
    * the feed-forward only with ``copy_ffn=True``. The release keeps BERT's text feed-forward
      (``intermediate`` / ``output``, unused for the queries) apart from a freshly initialised
      query feed-forward (``intermediate_query`` / ``output_query``), so by default ours stays
      fresh; BLIP-2's stage 1 copies the text one into it (``copy_ffn=True``);
    * ``position_embeddings`` (``[1, N, hidden]``, when given): BERT's first ``N`` absolute
      position embeddings; ``query_norm``: the embeddings' LayerNorm.

    Cross-attention has no BERT counterpart and keeps its initialisation. Returns the names of
    the loaded parameters. Raises ``ValueError`` when BERT has no layers, another width,
    another intermediate size (with ``copy_ffn``), fewer position embeddings than queries or
    (given a ``BertModel``) another head count than the projector; a bare state dict carries
    no head count: the caller vouches for it.
    """
    sd = bert.state_dict() if isinstance(bert, nn.Module) else dict(bert)
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    n_bert = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")),
                     default=-1)
    if n_bert == 0:
        raise ValueError("bert weights hold no encoder layer ('encoder.layer.<i>.*')")
    heads = layers[0].attention.heads
    if isinstance(bert, nn.Module) and hasattr(bert, "config"):
        if bert.config.num_attention_heads != heads:
            raise ValueError(f"bert has {bert.config.num_attention_heads} attention heads but "
                             f"the projector has {heads}")
    names = {**_BERT_ATTENTION, **(_BERT_FFN if copy_ffn else {})}
    pairs = {}  # our parameter -> (its name in the returned list, BERT's tensor name)
    own = {}
    for i in range(min(len(layers), n_bert)):
        for mine, theirs in names.items():
            for p in ("weight", "bias"):
                own[f"{i}.{mine}.{p}"] = layers[i].get_parameter(f"{mine}.{p}")
                pairs[f"{i}.{mine}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
    if query_norm is not None:
        for p in ("weight", "bias"):
            own[f"query_norm.{p}"] = getattr(query_norm, p)
            pairs[f"query_norm.{p}"] = f"embeddings.LayerNorm.{p}"
    sources = {}
    for mine, theirs in pairs.items():
        if theirs not in sd:
            raise ValueError(f"bert weights lack {theirs!r}")
        if sd[theirs].shape != own[mine].shape:
            raise ValueError(f"bert {theirs} has shape {tuple(sd[theirs].shape)} but the "
                             f"projector's {mine} has {tuple(own[mine].shape)} (hidden or "
                             "intermediate size differ)")
        sources[mine] = sd[theirs]
    if position_embeddings is not None:
        name = "embeddings.position_embeddings.weight"
        if name not in sd:
            raise ValueError(f"bert weights lack {name!r}")
        n, width = position_embeddings.shape[1:]
        table = sd[name]
        if table.shape[1] != width or table.shape[0] < n:
            raise ValueError(f"bert {name} has shape {tuple(table.shape)}; the projector needs "
                             f"at least {n} position embeddings of width {width}")
        own["position_embeddings"] = position_embeddings
        sources["position_embeddings"] = table[:n].unsqueeze(0)
    with torch.no_grad():
        for mine, src in sources.items():
            own[mine].copy_(src)
    return list(sources)
