"""Drop-in vision-language projectors (the ``models.projectors`` package) built on pargo_kernels, selectable by name.

>>> from models.projectors import build_projector
>>> proj = build_projector("pargo", vision_width=1024, llm_width=4096, visual_grid=(24, 24))
>>> proj.num_visual_tokens
304

Input ``[B, Nv, vision_width]`` patch tokens (row-major ``visual_grid``, CLS dropped), output
``[B, num_visual_tokens, llm_width]``. ``proj.config`` rebuilds it (``projector_from_config``).

Packed batches of images of different grids: ``y, counts = proj(x, visual_grids=[(r0, c0), ...])``
with ``x [sum_i r_i * c_i, vision_width]`` (the images' tokens back to back) returns ``y
[sum(counts), llm_width]`` and ``counts[i] == proj.tokens_for_grid(visual_grids[i])``; image
``i``'s rows equal running it alone at its own grid. Per-image rules
(:func:`~models.projectors.common.scaled_grid`: each axis keeps the configured ratio, rounded half
up, at least 1): ``mlp2x_gelu`` / ``linear`` / ``mlp`` one token per patch; ``deco`` and
``cabstractor`` pool to ``scaled_grid(grid, visual_grid, query_grid)``; ``pargo`` gets the
partial grid ``scaled_grid(grid, visual_grid, partial_grid)`` (1-D windows: the count keeps the
ratio) plus ``n_global`` globals, its partial queries resampled bilinearly; ``qformer`` ``n_query``.

Registered: ``"pargo"``, ``"qformer"``, ``"deco"``, ``"cabstractor"``, ``"mlp2x_gelu"``,
``"linear"``, ``"mlp"`` (any depth, bias, activation, CLS kept: the LLaVA checkpoints' variants).
"""
from .cabstractor import CAbstractor
from .deco import DeCoProjector
from .mlp import LinearProjector, MLP2xGELUProjector, MLPProjector
from .pargo import ParGoProjector, QFormerProjector
from .registry import (build_projector, load_projector_config, projector_from_config,
                       projector_names, register_projector, save_projector_config)

__all__ = ["build_projector", "projector_from_config", "projector_names", "register_projector",
           "save_projector_config", "load_projector_config", "ParGoProjector",
           "QFormerProjector", "DeCoProjector", "CAbstractor", "MLPProjector",
           "MLP2xGELUProjector", "LinearProjector"]
