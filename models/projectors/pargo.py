"""ParGo (partial-global projector, AAAI 2025) and its Q-Former baseline.

``ParGoProjector``: ``n_partial`` partial and ``n_global`` global learnable queries (plus BERT's
absolute position embeddings, LayerNorm-ed as BERT's embeddings) pass through ``n_layers``
layers of

* self-attention among the queries: partial queries see partial queries, global queries see
  global queries, nothing crosses. ``self_attn="official"`` (default): every partial query sees
  every partial query, in every layer (the static mask of the released code,
  ``get_global_local_attention`` in bytedance/ParGo). ``self_attn="cascade"``: the paper's
  Cascaded Partial Perception, a band among the partial queries whose width grows with the
  layer (:func:`pargo_kernels.cascade_windows`);
* Partial-Global Perception: cross-attention to the visual features, partial query ``i`` seeing
  only its window of patch tokens, global queries seeing all of them;
* feed-forward,

then a linear map to the LLM width. ``QFormerProjector`` is the same stack with global queries
only and full self-attention (ParGo's baseline by default, BLIP-2's Q-Former with
``preset="blip2"``).

``impl="kernels"`` runs the block-sparse Triton / CUDA ops; ``impl="reference"`` materialises the
dense masks and runs eager attention (the released code's computation). Both compute the same
function (tests/test_projectors.py, tests/test_projector_sources.py).

Packed batches of images of different grids (``proj(x [total, vision_width],
visual_grids=[...])``, see :meth:`_QueryProjector.forward`): every image gets its own partial
queries (the rule in :class:`ParGoProjector`) and ``n_global`` globals; the layers run on the
concatenated queries through the varlen ops (:mod:`models.projectors.packed`), with their plans
built once per forward; ``impl="reference"`` loops over the images through the dense masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pargo_kernels import cascade_windows, pargo_self_attention
from pargo_kernels.attention import CASCADE_MODES
from pargo_kernels.masks import BandMask, PartialGlobalMask

from .common import (Projector, check_backend, check_dropout, check_grid, check_impl,
                     check_int, check_pos_int, scaled_grid)
from .layers import CrossPattern, DensePattern, QueryLayer, load_bert_weights
from .packed import SelfPatternBuilder, cross_pattern
from .registry import register_projector

SELF_ATTN_MODES = ("official", "cascade")


def _self_attention(q: Tensor, k: Tensor, v: Tensor, n_partial: int,
                    window: Optional[tuple[int, int]] = None, *, backend: str = "auto") -> Tensor:
    """The self-attention of every ParGo / Q-Former layer (``q, k, v``: ``[B, H, N, D]``): rows
    ``[0, n_partial)`` attend to keys ``[0, n_partial)`` within the band ``window=(left, right)``
    (``None``: all partial keys, the released mask), rows ``[n_partial, N)`` to keys
    ``[n_partial, N)``: one launch of ``pargo_kernels.pargo_self_attention`` (mask kind 3), in
    place of a band over the partials, a full band over the globals and a concatenation."""
    return pargo_self_attention(q, k, v, n_partial, window, backend=backend)


@dataclass(frozen=True)
class QuerySelfPattern(DensePattern):
    """Self-attention among ``n_partial + n_global`` queries: partial query ``i`` sees partial
    query ``j`` iff ``i - left <= j <= i + right`` (``window``; ``None``: every partial query);
    global queries see all global queries; partial and global queries do not see each other."""

    n_partial: int
    n_global: int
    window: Optional[tuple[int, int]] = None

    def kernels(self, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        return _self_attention(q, k, v, self.n_partial, self.window, backend=backend)

    def materialize(self, device=None) -> Tensor:
        """Dense boolean ``[N, N]`` mask (reference path and tests only)."""
        np_, ng = self.n_partial, self.n_global
        mask = torch.zeros(np_ + ng, np_ + ng, dtype=torch.bool, device=device)
        if np_:
            mask[:np_, :np_] = True if self.window is None else \
                BandMask(np_, *self.window).materialize(device)
        mask[np_:, np_:] = True
        return mask


class _QueryProjector(Projector):
    """Learnable queries (+ position embeddings) + :class:`QueryLayer` stack + output Linear;
    the masks are chosen by the subclass through ``n_partial``, ``partial_grid`` and
    ``cascade_mode`` (None: every partial query sees every partial query; else the per-layer
    bands of :func:`pargo_kernels.cascade_windows`)."""

    def __init__(self, config: dict, *, n_partial: int, n_global: int,
                 cascade_mode: Optional[str], partial_grid,
                 hidden: int, heads: int, intermediate: int, n_layers: int, impl: str,
                 backend: str, dropout: float, pos_emb: bool, cross_attention_freq: int = 1):
        super().__init__(config)
        if hidden % heads:
            raise ValueError(f"heads ({heads}) must divide hidden ({hidden})")
        check_backend(backend)
        if n_partial > self.num_input_tokens:
            raise ValueError(f"n_partial ({n_partial}) must be <= the number of visual tokens "
                             f"({self.num_input_tokens} = visual_grid {self.visual_grid}): "
                             "otherwise some partial windows would be empty")
        self.impl, self.backend = impl, backend
        self.n_partial, self.n_global = n_partial, n_global
        self.partial_grid, self.cascade_mode = partial_grid, cascade_mode
        self.num_visual_tokens = n_partial + n_global
        self.vision_norm = nn.LayerNorm(self.vision_width)
        self.queries = nn.Parameter(torch.empty(1, self.num_visual_tokens, hidden))
        # BERT's absolute position embeddings of the query positions (the released ParGo code
        # adds them in its BertEmbeddings; BLIP-2's Q-Former adds none).
        self.position_embeddings = nn.Parameter(torch.empty(1, self.num_visual_tokens, hidden)) \
            if pos_emb else None
        self.query_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.query_dropout = nn.Dropout(dropout)
        # Cross-attention in layer i iff i % cross_attention_freq == 0 (BLIP-2's rule).
        self.layers = nn.ModuleList(
            QueryLayer(hidden, heads, intermediate, self.vision_width, dropout=dropout,
                       cross=i % cross_attention_freq == 0)
            for i in range(n_layers))
        self.proj = nn.Linear(hidden, self.llm_width)
        self.self_patterns = [QuerySelfPattern(n_partial, n_global, w)
                              for w in self._windows(n_partial)]
        grids = (self.visual_grid, partial_grid) if partial_grid is not None else (None, None)
        self.cross_pattern = CrossPattern(PartialGlobalMask(
            self.num_visual_tokens, self.num_input_tokens, n_partial, *grids))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation: N(0, 0.02) weights, queries and position embeddings, zero
        biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.queries, std=0.02)
        if self.position_embeddings is not None:
            nn.init.normal_(self.position_embeddings, std=0.02)

    def load_bert(self, bert, *, copy_ffn: bool = False) -> list[str]:
        """Initialise from a Hugging Face ``BertModel`` (or its state dict) as the released
        ``init_ParGo`` does: BERT layer ``i``'s self-attention into layer ``i``, the first
        ``num_visual_tokens`` position embeddings, the embeddings' LayerNorm into
        ``query_norm``. Cross-attention stays fresh, and so does the feed-forward unless
        ``copy_ffn=True`` (the released code keeps BERT's text feed-forward apart and trains a
        fresh query feed-forward; BLIP-2's stage 1 copies the text one into it). A BERT with
        fewer layers than the projector (bert-small: 4, the paper: 6) fills the first ones; the
        others keep their fresh initialisation. See :func:`models.projectors.layers.load_bert_weights`;
        returns the names of the loaded parameters."""
        return load_bert_weights(self.layers, self.query_norm, bert,
                                 position_embeddings=self.position_embeddings,
                                 copy_ffn=copy_ffn)

    def _windows(self, n_partial: int) -> list[Optional[tuple[int, int]]]:
        """Per-layer partial bands of ``n_partial`` partial queries (None: all of them)."""
        if self.cascade_mode is None or n_partial == 0:
            return [None] * len(self.layers)
        return cascade_windows(n_partial, len(self.layers), self.cascade_mode)

    def partial_for_grid(self, grid) -> tuple[int, Optional[tuple[int, int]]]:
        """``(n_partial_i, partial_grid_i)`` of an image of ``grid`` in a packed batch (the
        rule of the class docstring); ``partial_grid_i`` is None with 1-D windows."""
        rows, cols = check_grid("grid", grid)
        if self.n_partial == 0:
            return 0, None
        if self.partial_grid is None:  # 1-D: the count keeps the ratio, within [1, Nv_i]
            n = (2 * self.n_partial * rows * cols + self.num_input_tokens) \
                // (2 * self.num_input_tokens)
            return min(max(n, 1), rows * cols), None
        pg = scaled_grid((rows, cols), self.visual_grid, self.partial_grid)
        if pg[0] * pg[1] > rows * cols:
            raise ValueError(f"an image of grid {(rows, cols)} would get partial grid {pg} "
                             f"({pg[0] * pg[1]} queries for {rows * cols} tokens): the "
                             f"configured partial_grid {self.partial_grid} is finer than "
                             f"visual_grid {self.visual_grid} along an axis")
        return pg[0] * pg[1], pg

    def tokens_for_grid(self, grid) -> int:
        return self.partial_for_grid(grid)[0] + self.n_global

    def forward(self, x: Tensor, visual_grids: Optional[Sequence] = None,
                impl: Optional[str] = None) -> Union[Tensor, tuple[Tensor, list[int]]]:
        """``x``: ``[B, Nv, vision_width]`` -> ``[B, n_partial + n_global, llm_width]``; or a
        packed batch ``x [total, vision_width]`` with ``visual_grids`` (one ``(rows, cols)`` per
        image) -> ``(y [total_out, llm_width], counts)``, ``counts[i] =
        tokens_for_grid(visual_grids[i])`` (class docstring). ``impl`` overrides ``self.impl``
        for this call."""
        impl = check_impl(impl or self.impl)
        if visual_grids is not None:
            return self._forward_packed(x, visual_grids, impl)
        self.check_input(x)
        visual = self.vision_norm(x)
        h = self.query_embeddings(x.shape[0], visual.dtype)
        for layer, pattern in zip(self.layers, self.self_patterns):
            h = layer(h, visual, pattern, self.cross_pattern, impl, self.backend)
        return self.proj(h)

    def _forward_packed(self, x: Tensor, visual_grids, impl: str):
        grids = self.check_packed(x, visual_grids)
        parts = []
        for i, g in enumerate(grids):
            try:
                parts.append(self.partial_for_grid(g))
            except ValueError as e:
                raise ValueError(f"visual_grids[{i}]: {e}") from None
        n_partials = [n for n, _ in parts]
        counts = [n + self.n_global for n in n_partials]
        cross = cross_pattern(
            [CrossPattern(PartialGlobalMask(nq, r * c, n, *((g, pg) if pg else (None, None))))
             for nq, g, (r, c), (n, pg) in zip(counts, grids, grids, parts)],
            counts, [r * c for r, c in grids], x.device)
        builder = SelfPatternBuilder(n_partials, self.n_global, x.device)
        windows = [self._windows(n) for n in n_partials]  # [image][layer]
        visual = self.vision_norm(x)[None]
        h = self.packed_query_embeddings(parts, visual.dtype)[None]
        for li, layer in enumerate(self.layers):
            ws = [w[li] for w in windows]
            pattern = builder.layer([QuerySelfPattern(n, self.n_global, w)
                                     for n, w in zip(n_partials, ws)], ws)
            h = layer(h, visual, pattern, cross, impl, self.backend)
        return self.proj(h[0]), counts

    def query_embeddings(self, batch: int, dtype=None) -> Tensor:
        """The first layer's input ``[batch, N, hidden]``: dropout(LayerNorm(queries + position
        embeddings)), BERT's embeddings applied to the queries as in the released code."""
        h = self.queries if self.position_embeddings is None else \
            self.queries + self.position_embeddings
        h = h.expand(batch, -1, -1)
        return self.query_dropout(self.query_norm(h if dtype is None else h.to(dtype)))

    def packed_query_embeddings(self, parts, dtype=None) -> Tensor:
        """The first layer's input of a packed batch, ``[sum_i (n_partial_i + n_global),
        hidden]``: per image (``parts[i] = partial_for_grid(grid_i)``) its partial queries and
        their position embeddings resampled to its partial grid, then the globals, through the
        same LayerNorm and dropout as :meth:`query_embeddings`."""
        tables = [self.queries[0]] + ([] if self.position_embeddings is None
                                      else [self.position_embeddings[0]])
        resampled, rows = {}, []
        for n, pg in parts:
            if (n, pg) not in resampled:
                resampled[n, pg] = sum(self._resample(t[:self.n_partial], n, pg) for t in tables)
            rows += [resampled[n, pg], sum(t[self.n_partial:] for t in tables)]
        h = torch.cat(rows, 0)
        return self.query_dropout(self.query_norm(h if dtype is None else h.to(dtype)))

    def _resample(self, table: Tensor, n: int, pg: Optional[tuple[int, int]]) -> Tensor:
        """``table [n_partial, hidden]`` resampled to ``n`` partial queries: bilinear over the
        partial grid (``pg``; 1-D windows: linear over the query index), ``align_corners=False``,
        as ViTs resample position embeddings; unchanged at the configured size."""
        if n == 0 or (pg or n) == (self.partial_grid or self.n_partial):
            return table[:n]
        t = table.t()[None]  # [1, hidden, n_partial]
        if pg is None:
            return F.interpolate(t, size=n, mode="linear", align_corners=False)[0].t()
        t = t.reshape(1, -1, *self.partial_grid)
        return F.interpolate(t, size=pg, mode="bilinear", align_corners=False).flatten(2)[0].t()

    def attention_patterns(self, device=None) -> dict[str, list[Optional[Tensor]]]:
        """Dense boolean masks of every layer (``"self"``: ``[N, N]``, ``"cross"``: ``[N, Nv]``,
        ``None`` for a layer without cross-attention), for tests and visualisation; the kernels
        never build them."""
        cross = self.cross_pattern.materialize(device)
        return {"self": [p.materialize(device) for p in self.self_patterns],
                "cross": [cross if layer.crossattention is not None else None
                          for layer in self.layers]}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}, backend={self.backend!r}"


def _check_sizes(**sizes) -> list[int]:
    return [check_pos_int(name, value) for name, value in sizes.items()]


@register_projector("pargo")
class ParGoProjector(_QueryProjector):
    """ParGo: partial + global queries, partial-global cross-attention.

    Args:
        vision_width, llm_width: widths of the vision features and of the LLM embeddings.
        visual_grid: ``(rows, cols)`` of the patch tokens (CLS dropped), ``(24, 24)`` for
            CLIP-L/14 at 336 px.
        n_partial, n_global: numbers of partial and global queries (paper and release: 288
            and 16).
        n_layers: layers (paper: 6; the release builds as many as its BERT has, bert-small: 4).
        hidden, heads, intermediate: the BERT layer size (release: bert-small, 512 / 8 / 2048).
        self_attn: ``"official"`` (default) or ``"cascade"``. ``"official"`` is the static mask
            of the released code (every partial query sees every partial query in every
            layer): it is what the released checkpoint was trained and evaluated with, and it
            leaves nothing to interpretation. ``"cascade"`` is the paper's Cascaded Partial
            Perception, whose band widths and sides the paper fixes only in prose
            (``cascade_mode`` and :func:`pargo_kernels.cascade_windows`'s rounding are our
            reading).
        cascade_mode: with ``self_attn="cascade"``: ``"symmetric"`` (default: a partial query
            sees neighbours on both sides, the paper's "adjacent tokens") or ``"causal"`` (only
            preceding ones). Ignored (but validated) with ``"official"``.
        partial_grid: ``(rows, cols)`` with ``rows * cols == n_partial`` for 2-D partial windows
            (those of ``adaptive_avg_pool2d`` over ``visual_grid``); default: the paper's 1-D
            windows (``floor(i*Nv/Np)`` .. ``floor((i+1)*Nv/Np)`` in row-major token order).
        pos_emb: add learnable absolute position embeddings to the queries (default True, as
            the release does with BERT's; :meth:`load_bert` loads them).
        impl: ``"kernels"`` (block-sparse ops) or ``"reference"`` (dense masks, eager).
        backend: the kernels' backend (``"auto"``, ``"triton"``, ``"cuda"``, ``"reference"``).
        dropout: hidden dropout of the BERT layers and embeddings, in ``[0, 1)``
            (attention-probability dropout is not supported: the kernels never materialise the
            probabilities).

    Packed batches (``forward(x, visual_grids=...)``): an image of grid ``(r, c)`` gets

    * with ``partial_grid``: the partial grid
      :func:`~models.projectors.common.scaled_grid` ``((r, c), visual_grid, partial_grid)``:
      each axis keeps the configured ratio, rounded half up, at least 1 (24x24 -> 18x16 gives
      a 24x48 image 18x32 = 576 partial queries, a 36x36 one 27x24, a 1x1 one 1x1); its
      windows are the 2-D windows of that grid over ``(r, c)``;
    * without (1-D windows): ``round_half_up(n_partial * r * c / Nv)`` partial queries,
      clamped to ``[1, r * c]``, with the 1-D windows over its ``r * c`` tokens;
    * ``n_global`` globals (the same ones for every image), so ``tokens_for_grid((r, c)) =
      n_partial_i + n_global``.

    The partial queries and their position embeddings are resampled to the image's partial
    grid by bilinear interpolation (``align_corners=False``, as ViTs resample position
    embeddings; 1-D: linear over the query index); at the configured grid they are unchanged,
    so that image gets exactly the fixed-shape result. With ``self_attn="cascade"`` the bands
    are ``cascade_windows`` of the image's own partial count.
    """

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 n_partial: int = 288, n_global: int = 16, n_layers: int = 6, hidden: int = 512,
                 heads: int = 8, intermediate: int = 2048, self_attn: str = "official",
                 cascade_mode: str = "symmetric", partial_grid=None, pos_emb: bool = True,
                 impl: str = "kernels", backend: str = "auto", dropout: float = 0.0):
        vision_width, llm_width, n_layers, hidden, heads, intermediate = _check_sizes(
            vision_width=vision_width, llm_width=llm_width, n_layers=n_layers, hidden=hidden,
            heads=heads, intermediate=intermediate)
        visual_grid = check_grid("visual_grid", visual_grid)
        n_partial = check_int("n_partial", n_partial, 0)
        n_global = check_int("n_global", n_global, 0)
        if n_partial + n_global == 0:
            raise ValueError("n_partial + n_global must be positive (no queries)")
        if self_attn not in SELF_ATTN_MODES:
            raise ValueError(f"self_attn must be one of {SELF_ATTN_MODES}, got {self_attn!r}")
        if cascade_mode not in CASCADE_MODES:
            raise ValueError(f"cascade_mode must be one of {CASCADE_MODES}, got {cascade_mode!r}")
        if partial_grid is not None:
            partial_grid = check_grid("partial_grid", partial_grid)
            if partial_grid[0] * partial_grid[1] != n_partial:
                raise ValueError(f"partial_grid {partial_grid} holds "
                                 f"{partial_grid[0] * partial_grid[1]} queries but n_partial is "
                                 f"{n_partial}")
        dropout = check_dropout(dropout)
        config = dict(vision_width=vision_width, llm_width=llm_width,
                      visual_grid=list(visual_grid), n_partial=n_partial, n_global=n_global,
                      n_layers=n_layers, hidden=hidden, heads=heads, intermediate=intermediate,
                      self_attn=self_attn, cascade_mode=cascade_mode,
                      partial_grid=list(partial_grid) if partial_grid else None,
                      pos_emb=bool(pos_emb), impl=check_impl(impl), backend=backend,
                      dropout=dropout)
        super().__init__(config, n_partial=n_partial, n_global=n_global,
                         cascade_mode=cascade_mode if self_attn == "cascade" else None,
                         partial_grid=partial_grid, hidden=hidden, heads=heads,
                         intermediate=intermediate, n_layers=n_layers, impl=impl,
                         backend=backend, dropout=dropout, pos_emb=bool(pos_emb))


# Q-Former sizes: ParGo's baseline (Tables 3 and 6: 304 queries, bert-small sizes, 6 layers,
# cross-attention in every layer, run through ParGo's code, hence its position embeddings) and
# BLIP-2's Q-Former (LAVIS Blip2Base.init_Qformer: bert-base-uncased, 32 queries,
# cross_attention_freq=2, query embeddings without position embeddings).
QFORMER_PRESETS = {
    "pargo": dict(n_query=304, n_layers=6, hidden=512, heads=8, intermediate=2048,
                  cross_attention_freq=1, pos_emb=True),
    "blip2": dict(n_query=32, n_layers=12, hidden=768, heads=12, intermediate=3072,
                  cross_attention_freq=2, pos_emb=False),
}


@register_projector("qformer")
class QFormerProjector(_QueryProjector):
    """Q-Former: ``n_query`` global queries, full self-attention, full cross-attention in every
    ``cross_attention_freq``-th layer (layers 0, f, 2f, ...).

    ``preset`` gives the defaults of every size argument left ``None``: ``"pargo"`` (default)
    is ParGo's baseline (304 queries, 6 layers, hidden 512, 8 heads, intermediate 2048,
    cross-attention every layer, position embeddings); ``"blip2"`` is BLIP-2's Q-Former (32
    queries, bert-base: 12 layers, hidden 768, 12 heads, intermediate 3072, cross-attention
    every other layer, no position embeddings; BLIP-2 initialises it from bert-base-uncased
    with ``load_bert(bert, copy_ffn=True)``). Other arguments as :class:`ParGoProjector`.

    Packed batches: every image gets the ``n_query`` queries, full self-attention among its own
    queries and full cross-attention to its own tokens."""

    def __init__(self, vision_width: int, llm_width: int, visual_grid=(24, 24), *,
                 preset: str = "pargo", n_query: Optional[int] = None,
                 n_layers: Optional[int] = None, hidden: Optional[int] = None,
                 heads: Optional[int] = None, intermediate: Optional[int] = None,
                 cross_attention_freq: Optional[int] = None, pos_emb: Optional[bool] = None,
                 impl: str = "kernels", backend: str = "auto", dropout: float = 0.0):
        if preset not in QFORMER_PRESETS:
            raise ValueError(f"preset must be one of {tuple(QFORMER_PRESETS)}, got {preset!r}")
        given = dict(n_query=n_query, n_layers=n_layers, hidden=hidden, heads=heads,
                     intermediate=intermediate, cross_attention_freq=cross_attention_freq,
                     pos_emb=pos_emb)
        sizes = {k: QFORMER_PRESETS[preset][k] if v is None else v for k, v in given.items()}
        pos_emb = bool(sizes.pop("pos_emb"))
        vision_width, llm_width = _check_sizes(vision_width=vision_width, llm_width=llm_width)
        n_query, n_layers, hidden, heads, intermediate, cross_attention_freq = \
            _check_sizes(**sizes)
        visual_grid = check_grid("visual_grid", visual_grid)
        dropout = check_dropout(dropout)
        config = dict(vision_width=vision_width, llm_width=llm_width,
                      visual_grid=list(visual_grid), preset=preset, n_query=n_query,
                      n_layers=n_layers, hidden=hidden, heads=heads, intermediate=intermediate,
                      cross_attention_freq=cross_attention_freq, pos_emb=pos_emb,
                      impl=check_impl(impl), backend=backend, dropout=dropout)
        super().__init__(config, n_partial=0, n_global=n_query, cascade_mode=None,
                         partial_grid=None, hidden=hidden, heads=heads,
                         intermediate=intermediate, n_layers=n_layers, impl=impl,
                         backend=backend, dropout=dropout, pos_emb=pos_emb,
                         cross_attention_freq=cross_attention_freq)
