"""Helpers shared by the tests and the benchmarks: random inputs, the float64 oracle run, and
the per-dtype tolerance check. One copy, so tests and benchmarks judge outputs the same way."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

# Max |actual - oracle| allowed, relative to max |oracle| of the same tensor. The oracle runs in
# float64 on the very same (already rounded) inputs, so the budget covers only the kernel's own
# rounding: probabilities rounded to the input dtype before P@V, fp32 accumulation, the output
# rounding. A wrong window or a missed tile gives errors of order 1 (see the discrimination
# test), far above these.
REL_TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


# Floor of the normaliser: inputs are N(0, 1), so outputs and gradients are O(0.1 .. 1); a
# tensor whose exact value is ~0 (dq of a band of width 1, say) is judged against this scale
# rather than against its own round-off.
SCALE_FLOOR = 0.1


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, SCALE_FLOOR), in float64; a NaN or inf in
    ``actual`` gives inf."""
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(SCALE_FLOOR)).item()


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor,
                 dtype: torch.dtype, factor: float = 1.0) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err, tol = rel_error(actual, expected), REL_TOL[dtype] * factor
    if not err <= tol:
        raise AssertionError(f"{name}: relative max error {err:.3e} > tolerance {tol:.1e} "
                             f"({dtype})")


def randn(shape: Sequence[int], dtype: torch.dtype, device, layout: str = "bhnd",
          requires_grad: bool = True) -> torch.Tensor:
    """Fresh N(0, 1) tensor ``[B, H, N, D]``; ``layout="bnhd"`` returns the non-contiguous
    ``[B, N, H, D].transpose(1, 2)`` view that models with a fused QKV projection produce."""
    if layout == "bhnd":
        t = torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)
    elif layout == "bnhd":
        b, h, n, d = shape
        t = torch.randn(b, n, h, d, device=device, dtype=torch.float32).to(dtype).transpose(1, 2)
    else:
        raise ValueError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
    return t.requires_grad_(requires_grad)


def run_with_grads(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                   grad_out: torch.Tensor, dtype: torch.dtype | None = None):
    """Run ``fn(*inputs)`` (inputs cast to ``dtype`` as fresh leaves if given) and backward with
    ``grad_out``; returns ``(out, [grads...])``."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [x.grad for x in leaves]
