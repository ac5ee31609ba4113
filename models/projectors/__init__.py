"""Drop-in vision-language projectors (the ``models.projectors`` package) built on pargo_kernels, selectable by name.

>>> from models.projectors import build_projector
>>> proj = build_projector("pargo", vision_width=1024, llm_width=4096, visual_grid=(24, 24))
>>> proj.num_visual_tokens
304

Input ``[B, Nv, vision_width]`` patch tokens (row-major ``visual_grid``, CLS dropped), output
``[B, num_visual_tokens, llm_width]``. ``proj.config`` rebuilds it (``projector_from_config``).

Registered: ``"pargo"``, ``"qformer"``, ``"deco"``, ``"cabstractor"``, ``"mlp2x_gelu"``,
``"linear"``.
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
