"""ParGo (partial-global projector, AAAI 2025) and its Q-Former baseline.

``ParGoProjector``: ``n_partial`` partial and ``n_global`` global learnable queries pass through
``n_layers`` layers of

* Cascaded Partial Perception: banded self-attention among the partial queries, the band of
  layer ``l`` of ``d`` spanning ``ceil(l * n_partial / d)`` adjacent queries
  (:func:`pargo_kernels.cascade_windows`); self-attention among the global queries;
* Partial-Global Perception: cross-attention to the visual features, partial query ``i`` seeing
  only its window of patch tokens, global queries seeing all of them;
* feed-forward,

then a linear map to the LLM width. ``QFormerProjector`` is the same stack with global queries
only and full self-attention (the paper's baseline, Table 3 and 6).

``impl="kernels"`` runs the block-sparse Triton / CUDA ops; ``impl="reference"`` materialises the
dense masks and runs eager attention, as the official code does. They compute the same function
(tests/test_projectors.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pargo_kernels import cascade_windows
from pargo_kernels.attention import CASCADE_MODES
from pargo_kernels.masks import PartialGlobalMask

from .common import Projector, check_grid, check_impl, check_int, check_pos_int
from .layers import CrossPattern, QueryLayer, QuerySelfPattern, load_bert_weights
from .registry import register_projector

BACKENDS = ("auto", "triton", "cuda", "reference")


class _QueryProjector(Projector):
    """Learnable queries + :class:`QueryLayer` stack + output Linear; the masks are chosen by the
    subclass through ``n_partial``, ``partial_grid`` and the per-layer self-attention windows."""

    def __init__(self, config: dict, *, n_partial: int, n_global: int, windows, partial_grid,
                 hidden: int, heads: int, intermediate: int, n_layers: int, impl: str,
                 backend: str, dropout: float):
        super().__init__(config)
        if hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if n_partial > self.num_input_tokens:
            raise ValueError(f"n_partial ({n_partial}) must be <= the number of visual tokens "
                             f"({self.num_input_tokens} = visual_grid {self.visual_grid}): "
                             "otherwise some partial windows would be empty")
        self.impl, self.backend = impl, backend
        self.n_partial, self.n_global = n_partial, n_global
        self.num_visual_tokens = n_partial + n_global
        self.vision_norm = nn.LayerNorm(self.vision_width)
        self.queries = nn.Parameter(torch.empty(1, self.num_visual_tokens, hidden))
        self.query_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(
            QueryLayer(hidden, heads, intermediate, self.vision_width, dropout=dropout)
            for _ in range(n_layers))
        self.proj = nn.Linear(hidden, self.llm_width)
        self.self_patterns = [QuerySelfPattern(n_partial, n_global, tuple(w)) for w in windows]
        grids = (self.visual_grid, partial_grid) if partial_grid is not None else (None, None)
        self.cross_pattern = CrossPattern(PartialGlobalMask(
            self.num_visual_tokens, self.num_input_tokens, n_partial, *grids))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation: N(0, 0.02) weights and queries, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.queries, std=0.02)

    def load_bert(self, bert) -> list[str]:
        """Initialise self-attention, feed-forward and the query LayerNorm from a Hugging Face
        ``BertModel`` (or its state dict), as the official code does from bert-small
        (:func:`models.layers.load_bert_weights`)."""
        return load_bert_weights(self.layers, self.query_norm, bert)

    def forward(self, x: Tensor, impl: Optional[str] = None) -> Tensor:
        """``x``: ``[B, Nv, vision_width]`` -> ``[B, n_partial + n_global, llm_width]``.
        ``impl`` overrides ``self.impl`` for this call."""
        self.check_input(x)
        impl = check_impl(impl or self.impl)
        visual = self.vision_norm(x)
        h = self.query_norm(self.queries.expand(x.shape[0], -1, -1).to(visual.dtype))
        for layer, pattern in zip(self.layers, self.self_patterns):
            h = layer(h, visual, pattern, self.cross_pattern, impl, self.backend)
        return self.proj(h)

    def attention_patterns(self, device=None) -> dict[str, list[Tensor]]:
        """Dense boolean masks of every layer (``"self"``: ``[N, N]``, ``"cross"``: ``[N, Nv]``),
        for tests and visualisation; the kernels never build them."""
        return {"self": [p.materialize(device) for p in self.self_patterns],
                "cross": [self.cross_pattern.materialize(device)] * len(self.layers)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}, backend={self.backend!r}"


@register_projector("pargo")
class ParGoProjector(_QueryProjector):
    """ParGo: partial + global queries, cascaded banded self-attention, partial-global
    cross-attention.

    Args:
        vision_width, llm_width: widths of the vision features and of the LLM embeddings.
        visual_grid: ``(rows, cols)`` of the patch tokens (CLS dropped), ``(24, 24)`` for
            CLIP-L/14 at 336 px.
        n_partial, n_global: numbers of partial and global queries (paper: 288 and 16).
        n_layers: layers (paper: 6). hidden, heads, intermediate: the BERT layer size (official
            release: bert-small, 512 / 8 / 2048).
        cascade_mode: ``"symmetric"`` (default: a partial query sees neighbours on both sides,
            the paper's "adjacent tokens") or ``"causal"`` (only preceding ones); see
            :func:`pargo_kernels.cascade_windows` for the rounding.
        partial_grid: ``(rows, cols)`` with ``rows * cols == n_partial`` for 2-D partial windows
            (those of ``adaptive_avg_pool2d`` over ``visual_grid``); default: the paper's 1-D
            windows (``floor(i*Nv/Np)`` .. ``floor((i+1)*Nv/Np)`` in row-major token order).
        impl: ``"kernels"`` (block-sparse ops) or ``"reference"`` (dense masks, eager).
        backend: the kernels' backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"reference"``).
        dropout: hidden dropout of the BERT layers (attention-probability dropout is not
            supported: the kernels never materialise the probabilities).
    """

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 n_partial: int = 288, n_global: int = 16, n_layers: int = 6, hidden: int = 512,
                 heads: int = 8, intermediate: int = 2048, cascade_mode: str = "symmetric",
                 partial_grid=None, impl: str = "kernels", backend: str = "auto",
                 dropout: float = 0.0):
        vision_width, llm_width = (check_pos_int("vision_width", vision_width),
                                   check_pos_int("llm_width", llm_width))
        visual_grid = check_grid("visual_grid", visual_grid)
        n_partial = check_int("n_partial", n_partial, 0)
        n_global = check_int("n_global", n_global, 0)
        if n_partial + n_global == 0:
            raise ValueError("n_partial + n_global must be positive (no queries)")
        n_layers, hidden, heads, intermediate = (check_pos_int(n, v) for n, v in (
            ("n_layers", n_layers), ("hidden", hidden), ("heads", heads),
            ("intermediate", intermediate)))
        if cascade_mode not in CASCADE_MODES:
            raise ValueError(f"cascade_mode must be one of {CASCADE_MODES}, got {cascade_mode!r}")
        if partial_grid is not None:
            partial_grid = check_grid("partial_grid", partial_grid)
            if partial_grid[0] * partial_grid[1] != n_partial:
                raise ValueError(f"partial_grid {partial_grid} holds "
                                 f"{partial_grid[0] * partial_grid[1]} queries but n_partial is "
                                 f"{n_partial}")
        windows = cascade_windows(n_partial, n_layers, cascade_mode) if n_partial else \
            [(0, 0)] * n_layers
        config = dict(vision_width=vision_width, llm_width=llm_width,
                      visual_grid=list(visual_grid), n_partial=n_partial, n_global=n_global,
                      n_layers=n_layers, hidden=hidden, heads=heads, intermediate=intermediate,
                      cascade_mode=cascade_mode,
                      partial_grid=list(partial_grid) if partial_grid else None,
                      impl=check_impl(impl), backend=backend, dropout=float(dropout))
        super().__init__(config, n_partial=n_partial, n_global=n_global, windows=windows,
                         partial_grid=partial_grid, hidden=hidden, heads=heads,
                         intermediate=intermediate, n_layers=n_layers, impl=impl,
                         backend=backend, dropout=dropout)


@register_projector("qformer")
class QFormerProjector(_QueryProjector):
    """Q-Former baseline (BLIP-2 style, cross-attention in every layer): ``n_query`` global
    queries, full self-attention, full cross-attention. Default 304 queries and 6 layers, the
    baseline of ParGo's Tables 3 and 6. Other arguments as :class:`ParGoProjector`."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 n_query: int = 304, n_layers: int = 6, hidden: int = 512, heads: int = 8,
                 intermediate: int = 2048, impl: str = "kernels", backend: str = "auto",
                 dropout: float = 0.0):
        vision_width, llm_width, n_query, n_layers, hidden, heads, intermediate = (
            check_pos_int(n, v) for n, v in (
                ("vision_width", vision_width), ("llm_width", llm_width), ("n_query", n_query),
                ("n_layers", n_layers), ("hidden", hidden), ("heads", heads),
                ("intermediate", intermediate)))
        visual_grid = check_grid("visual_grid", visual_grid)
        config = dict(vision_width=vision_width, llm_width=llm_width,
                      visual_grid=list(visual_grid), n_query=n_query, n_layers=n_layers,
                      hidden=hidden, heads=heads, intermediate=intermediate,
                      impl=check_impl(impl), backend=backend, dropout=float(dropout))
        super().__init__(config, n_partial=0, n_global=n_query, windows=[(0, 0)] * n_layers,
                         partial_grid=None, hidden=hidden, heads=heads,
                         intermediate=intermediate, n_layers=n_layers, impl=impl,
                         backend=backend, dropout=dropout)
