"""Lazy loader of the optional CUDA extension ``pargo_kernels._C`` (built from csrc/ by setup.py).

Importing the extension registers the ``torch.ops.pargo_cuda.*`` ops. It is imported on first
use only, so a CPU-only install (no extension) imports and runs the rest of the package.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch


@functools.lru_cache(maxsize=1)
def _load() -> str:
    """Import the extension once; returns '' on success, else why it is unavailable."""
    try:
        import pargo_kernels._C  # noqa: F401  (registers torch.ops.pargo_cuda)
    except ImportError as exc:
        why = ("the CUDA extension pargo_kernels._C is not built (a CUDA build of torch and nvcc "
               "are needed at install time: pip install --no-build-isolation -e . with "
               "PARGO_BUILD_CUDA=1)")
        if torch.version.cuda is None:
            why += f"; torch {torch.__version__} is a CPU build"
        return f"{why} [{type(exc).__name__}: {exc}]"
    except Exception as exc:  # noqa: BLE001 - e.g. an undefined symbol after a torch upgrade
        return f"the CUDA extension pargo_kernels._C failed to load: {type(exc).__name__}: {exc}"
    return ""


def cuda_extension_reasons(tensors: Sequence[torch.Tensor] = ()) -> list[str]:
    """Why the CUDA extension cannot serve ``tensors`` (empty list: it can)."""
    why = []
    not_cuda = [t.device for t in tensors if t is not None and t.device.type != "cuda"]
    if not_cuda:
        why.append(f"the CUDA kernels need CUDA tensors, got device {not_cuda[0]}")
    loaded = _load()
    if loaded:
        why.append(loaded)
    return why


def ops():
    """``torch.ops.pargo_cuda`` (call only after :func:`cuda_extension_reasons` returned [])."""
    return torch.ops.pargo_cuda
