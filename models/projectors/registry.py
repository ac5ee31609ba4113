"""Projector registry: ``build_projector(name, **config)`` and JSON round-trips.

Every projector maps vision features ``[B, Nv, vision_width]`` (a row-major ``visual_grid`` of
patch tokens, CLS already dropped) to ``[B, num_visual_tokens, llm_width]`` LLM embeddings, and
keeps its constructor arguments in ``.config`` (a JSON-serialisable dict whose ``"name"`` is its
registry key), so ``build_projector(**proj.config)`` rebuilds it.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_projector(name: str):
    """Class decorator: make ``cls`` buildable as ``build_projector(name, ...)``."""
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a projector named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.projector_name = name
        return cls
    return wrap


def projector_names() -> list[str]:
    return sorted(_REGISTRY)


def build_projector(name: str, **config) -> nn.Module:
    """Build the projector registered as ``name`` (see :func:`projector_names`) from ``config``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown projector {name!r}; registered: {projector_names()}")
    return _REGISTRY[name](**config)


def projector_from_config(config: dict) -> nn.Module:
    """Inverse of ``proj.config``: a dict with a ``"name"`` key plus constructor arguments."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"config must be a dict with a 'name' key, got {config!r}")
    config = dict(config)
    return build_projector(config.pop("name"), **config)


def save_projector_config(proj: nn.Module, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(proj.config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_projector_config(path: str | os.PathLike) -> nn.Module:
    """Build (fresh weights) the projector described by a JSON file written by
    :func:`save_projector_config`."""
    with open(path) as f:
        return projector_from_config(json.load(f))
