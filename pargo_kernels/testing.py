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
                 dtype: torch.dtype, factor: float = 1.0,
                 roundoff: torch.Tensor | None = None) -> None:
    """``actual`` within ``REL_TOL[dtype] * factor`` of ``expected`` (relative to its max, see
    :func:`rel_error`). ``roundoff`` (same shape, >= 0, e.g. :func:`attention_grad_roundoff`)
    raises the allowance element by element where a cancellation makes the exact value small
    compared with the terms that produce it."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err, tol = rel_error(actual, expected), REL_TOL[dtype] * factor
    if err <= tol:
        return
    if roundoff is not None and err != float("inf"):
        a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
        allowed = (tol * e.abs().max().clamp_min(SCALE_FLOOR)).clamp_min(roundoff)
        excess = ((a - e).abs() / allowed).max().item()
        if excess <= 1.0:
            return
        raise AssertionError(f"{name}: relative max error {err:.3e} > tolerance {tol:.1e} "
                             f"({dtype}) and {excess:.2f}x the round-off bound where larger")
    raise AssertionError(f"{name}: relative max error {err:.3e} > tolerance {tol:.1e} "
                         f"({dtype})")


def attention_grad_roundoff(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            grad: torch.Tensor, mask: torch.Tensor, scale: float,
                            ulps: float = 8.0):
    """Element-wise round-off allowances ``(bq, bk, bv)`` on the dq, dk, dv of masked attention:
    a calibrated margin (not a proof) for what a correct fp32-accumulating kernel reaches,
    whatever the exact value.

    The backward forms ``dS = P * (dP - delta)`` with ``dP_ij = dO_i . v_j`` and ``delta_i =
    dO_i . O_i``, two fp32 dot products over the head dim that cancel: each is off by a few
    ulps of ``T_i = max_j sum_d |dO_id v_jd|`` (over the keys row ``i`` sees), so ``dS_ij`` is
    off by ``P_ij * ulps * T_i`` even when the exact dS, and with it dq or dk, is 0 or tiny
    (one key per row; two keys with equal scores). Then ``dq_i = scale * sum_j dS_ij k_j`` and
    ``dk_j = scale * sum_i dS_ij q_i`` carry ``bq = ulps*eps*scale * T_i * (P |k|)_i`` and ``bk
    = ulps*eps*scale * (P^T (T |q|))_j``; ``dv = P^T dO`` has no such cancellation (``bv =
    0``). ``eps = 2^-23`` whatever the input dtype (dS is fp32); the 16-bit tolerances of
    ``REL_TOL`` are far above it. Inputs ``[..., N, D]`` float64, ``mask [Nq, Nv]`` bool.
    Not counted: the exp2 / log-sum-exp rounding in P, and delta's terms ``|dO_id O_id|`` beyond
    ``T_i``; 8 ulps is the margin that covers them on the fuzz's draws (worst error 0.27-0.56 of
    the allowance over 300 fp32 draws). A wrong key or tile errs by ``scale * P_ij * T_i *
    |k_j|``, which this hides only where ``P_ij`` < ~1e-6.

    Found by tests/test_fuzz.py: band N=11, window (0, 0), D=96, fp32, |dq| = 2.1e-6 with exact
    dq = 0; varlen Nq=2, Nv=2 all global, D=16, fp32: |dk| <= 0.045, error 2.8e-6 (eager fp32
    PyTorch: 1.1e-6), both above ``REL_TOL * SCALE_FLOOR = 2e-6``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    terms = torch.matmul(grad.abs(), v.abs().transpose(-1, -2)).masked_fill(~mask, 0.0)
    t = terms.amax(dim=-1, keepdim=True)
    c = ulps * 2.0 ** -23 * scale
    bq = c * t * torch.matmul(p, k.abs())
    bk = c * torch.matmul(p.transpose(-1, -2), t * q.abs())
    return bq, bk, torch.zeros_like(v)


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


def triton_test_device() -> str:
    """The device the tests run the Triton backend on: the CPU when Triton's interpreter is on
    (``TRITON_INTERPRET=1``: it runs CPU tensors only), else CUDA when a GPU is visible, else
    the CPU (where the Triton tests then skip, see :func:`triton_skip_reason`)."""
    from ._backend import triton_interpret
    if triton_interpret() or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def triton_skip_reason(device) -> str:
    """Why the Triton backend cannot run on ``device`` in this process ("" when it can): the
    reason a test that needs it is skipped with."""
    from ._backend import triton_available, triton_device_reasons, triton_interpret
    why = triton_device_reasons([torch.empty(0, device=device)])
    if not why:
        return ""
    if triton_available() and torch.device(device).type == "cpu" and not triton_interpret():
        return ("Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 (CPU tensors, "
                "interpreter off)")
    return "Triton backend cannot run here: " + "; ".join(why)
