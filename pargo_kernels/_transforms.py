"""How the public ops behave under autocast, torch.func transforms and double backward.

* Autocast: like ``F.scaled_dot_product_attention`` (a "lower precision" op): inside
  ``torch.autocast(device, dtype)``, floating inputs other than float64 are cast to the autocast
  dtype (so mixed q/k/v dtypes are accepted there) and the op runs with autocast off, returning
  that dtype. The public functions apply the rule themselves (:func:`autocast_like_sdpa`), before
  validation and for every backend; the registered ops get the same rule at the dispatcher
  (:func:`register_autocast`) for direct ``torch.ops.pargo`` calls.
  ``torch.library.register_autocast`` is not used: it casts to one dtype fixed at registration,
  whereas SDPA follows the dtype of the enclosing ``torch.autocast``.
* ``torch.func`` transforms (``jacrev``, ``vmap``, ``grad``, ...) and double backward are not
  supported by the Triton and CUDA kernels (no vmap rule, no backward of the backward): they
  raise ``NotImplementedError`` saying so, and pointing to ``backend="reference"``.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _cast(value, dtype):
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def autocast_like_sdpa(*tensor_args: str):
    """Decorator of a public op: under autocast, cast the named tensor arguments as SDPA does
    and run the op with autocast disabled."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else None
            if not isinstance(first, Tensor) or first.device.type not in _AUTOCAST_DEVICES \
                    or not torch.is_autocast_enabled(first.device.type):
                return fn(*args, **kwargs)
            device = first.device.type
            bound = sig.bind(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device)
            for name in tensor_args:
                if name in bound.arguments:
                    bound.arguments[name] = _cast(bound.arguments[name], dtype)
            with torch.autocast(device, enabled=False):
                return fn(*bound.args, **bound.kwargs)
        return wrapper
    return deco


def register_autocast(op, device_types=_AUTOCAST_DEVICES) -> None:
    """Autocast rule of a registered op (``torch.ops.pargo.*``) at the dispatcher: SDPA's."""
    for device in device_types:
        key = "Autocast" + torch._C._dispatch_key_for_device(device)

        def kernel(*args, _device=device):
            dtype = torch.get_autocast_dtype(_device)
            with torch.autocast(_device, enabled=False):
                return op(*[_cast(a, dtype) for a in args])
        torch.library.impl(op._name, key)(kernel)


def refuse_functorch(op: str, backend: str) -> None:
    """Raise a clear error when a torch.func transform reaches a kernel backend."""
    if backend != "reference" and not torch.compiler.is_compiling() \
            and torch._C._are_functorch_transforms_active():
        raise NotImplementedError(
            f"{op}: torch.func transforms (jacrev, jacfwd, vmap, grad, ...) are not supported by "
            f"the {backend!r} backend (its kernels have no vmap rule); use backend='reference', "
            "or torch.autograd.functional.jacobian (plain autograd) for Jacobians")


def no_double_backward(custom_op, op: str) -> None:
    """Register, for the backward op ``custom_op``, an autograd formula that refuses: double
    backward is unsupported."""
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{op}: double backward (a gradient of a gradient, e.g. torch.autograd.grad with "
            "create_graph=True followed by another backward) is not supported by the Triton and "
            "CUDA kernels; use backend='reference'")

    def setup_context(ctx, inputs, output):
        pass
    custom_op.register_autograd(backward, setup_context=setup_context)
