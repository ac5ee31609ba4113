"""Backend selection shared by every op.

A backend is a name (``"triton"``, ``"cuda"``, ``"reference"``) plus a function that, given the
inputs of a call, returns the reasons it *cannot* serve them (an empty list means it can).
``backend="auto"`` walks a per-op preference list and takes the first willing backend; an
explicit backend that refuses raises ``ValueError`` listing its reasons, so nothing silently
falls back. ``PARGO_BACKEND=<name>`` pins the backend of every call that passes ``"auto"``.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")
ENV_VAR = "PARGO_BACKEND"


def triton_interpret() -> bool:
    """True when Triton was asked to interpret kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_device_reasons(tensors: Sequence[torch.Tensor]) -> list[str]:
    """Why the Triton backend cannot run on the device of ``tensors`` (empty list: it can)."""
    if not triton_available():
        return ["triton is not installed"]
    device = tensors[0].device
    if device.type == "cuda":
        if triton_interpret():
            return ["TRITON_INTERPRET=1 is set, so Triton only runs on CPU tensors in this process"]
        return []
    if device.type == "cpu":
        if triton_interpret():
            return []
        return ["CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing pargo_kernels (or use backend='reference')"]
    return [f"device type {device.type!r} is not supported by Triton here"]


def resolve(op: str, backend: str, reasons: dict[str, Callable[[], list[str]]],
            preference: Sequence[str]) -> str:
    """Pick the backend for one call of ``op``.

    ``reasons`` maps each backend the op implements to a thunk returning its refusal reasons.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        pinned = os.environ.get(ENV_VAR, "").strip()
        if pinned and pinned != "auto":
            if pinned not in BACKENDS:
                raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {pinned!r}")
            backend = pinned
    if backend != "auto":
        if backend not in reasons:
            raise ValueError(f"{op}: backend {backend!r} is not implemented for this op "
                             f"(available: {sorted(reasons)})")
        why = reasons[backend]()
        if why:
            raise ValueError(f"{op}: backend {backend!r} cannot serve this input: " + "; ".join(why))
        return backend
    refusals = []
    for name in preference:
        if name not in reasons:
            continue
        why = reasons[name]()
        if not why:
            return name
        refusals.append(f"{name}: " + "; ".join(why))
    raise ValueError(f"{op}: no backend can serve this input (" + " | ".join(refusals) + ")")
