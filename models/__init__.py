"""Vision-language projectors (:mod:`models.projectors`) and the MLLM built on them with its
LLaVA-style trainer (:mod:`models.mllm`); :mod:`models.digits` is a small study using both.

>>> from models import build_projector
>>> proj = build_projector("pargo", vision_width=1024, llm_width=4096, visual_grid=(24, 24))
>>> proj.num_visual_tokens
304

``import models`` imports the projectors only (torch, no transformers); the MLLM code is in
``models.mllm`` (``python -m models.train`` / ``python -m models.eval_mme`` are its entry points).
"""
from .projectors import *  # noqa: F401,F403
from .projectors import __all__  # noqa: F401
