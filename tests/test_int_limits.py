"""Huge integers and the names in error messages at the edges of the public ops (issue 25, item 7).

* Band windows of any size, ``2**63`` and ``2**64`` included (Python, numpy and torch ints): a
  window wider than the sequence is documented as valid and clipped, so every backend (Triton,
  the CUDA kernels, the reference) and the packed op (a shared window, per-sequence windows as
  a list or an int tensor) gives the clipped band: checked against a float64 oracle whose mask
  is written with Python's unbounded ints, not through :mod:`pargo_kernels.masks`. Where the
  CUDA extension is not built, its Python-side dispatch still runs: the extension's op is
  replaced by a stand-in that applies csrc/bindings.cpp's checks on the mask parameters it is
  given (each in ``[0, 2**31)``) and computes the forward with the reference.
* Pooling to ``2**31`` or more output cells: one clear ValueError naming ``out_grid`` on every
  backend (before: an allocation failure, or torch's "Expected a value of type List[int]").
* Per-batch arguments on the meta device (no values to read): ValueError naming the argument.
* ``band_attention_varlen`` names its own offsets argument, ``cu_seqlens``.
"""
import numpy as np
import pytest
import torch

import pargo_kernels as pk
from pargo_kernels import _cuda, attention
from pargo_kernels.masks import BandMask, ParGoSelfMask
from pargo_kernels.ops import varlen_triton
from pargo_kernels.reference import masked_attention
from pargo_kernels.testing import assert_close, randn, run_with_grads

# windows at and past the int32 / int64 / uint64 limits, as Python, numpy and torch ints
HUGE_WINDOWS = [(2**31, 1), (0, 2**63 - 1), (2**63, 2**63), (2**64, 0),
                (np.uint64(2**64 - 1), 2), (np.int64(2**62), 10**30)]
N, NP = 7, 5  # tokens, ParGo self-attention's partial tokens


def _band(n, left, right):
    """Dense [n, n] band, from Python ints (no clipping, no overflow)."""
    left, right = int(left), int(right)
    return torch.tensor([[i - left <= j <= i + right for j in range(n)] for i in range(n)])


def _pargo_self(n, np_, left, right):
    band = _band(n, left, right)
    return torch.tensor([[(i < np_) == (j < np_) and (i >= np_ or bool(band[i, j]))
                          for j in range(n)] for i in range(n)])


OPS = {
    # id: (call(q, k, v, window, backend), dense mask of a window)
    "band": (lambda q, k, v, w, be: pk.band_attention(q, k, v, w, backend=be),
             lambda w: _band(N, *w)),
    "pargo_self": (lambda q, k, v, w, be: pk.pargo_self_attention(q, k, v, NP, w, backend=be),
                   lambda w: _pargo_self(N, NP, *w)),
}


class _CudaOpsStandIn:
    """``torch.ops.pargo_cuda`` where the extension is not built: the mask parameters checked as
    csrc/bindings.cpp's ``attention_shape`` checks them, the forward computed by the reference
    from those parameters (what the CUDA kernels would be asked to compute)."""

    def __init__(self):
        self.params = []

    def attention_fwd(self, q, k, v, kind, params, scale):
        self.params.append(list(params))
        if len(params) != 5 or not all(0 <= p <= 2**31 - 1 for p in params):
            raise RuntimeError(f"attention: mask params must be in [0, 2**31), got {params}")
        n = q.shape[2]
        if kind == BandMask.kind:
            mask = BandMask(n, params[0], params[1])
        else:
            span = max(params[0] - 1, 0)
            if params[1] > span or params[2] > span:
                raise RuntimeError(f"attention: ParGo self-attention params {params}")
            mask = ParGoSelfMask(n, params[0], params[1], params[2])
        out = masked_attention(q, k, v, mask.materialize(q.device), scale)
        return out, torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)


BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "reference", "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_huge_windows_are_clipped_on_every_backend(op, backend, device, monkeypatch):
    call, dense = OPS[op]
    dtype, dim = torch.float32, 16
    stand_in = None
    if backend == "cuda":  # the kernels' dtype and head dims
        dtype, dim = torch.float16, 64
        q = torch.empty(1, 1, N, dim, dtype=dtype, device=device)
        if attention._cuda_reasons(q, q, q):  # not servable here: the stand-in extension
            stand_in = _CudaOpsStandIn()
            monkeypatch.setattr(attention, "_cuda_reasons", lambda *a: [])
            monkeypatch.setattr(_cuda, "ops", lambda: stand_in)
    for window in HUGE_WINDOWS:
        q, k, v = (randn((1, 2, N, dim), dtype, device, requires_grad=stand_in is None)
                   for _ in range(3))
        ref = masked_attention(q.double(), k.double(), v.double(), dense(window).to(device),
                               dim ** -0.5)
        if stand_in is not None:  # forward only: the stand-in has no backward
            out = call(q, k, v, window, backend)
            assert_close(f"{window} out", out, ref, dtype)
            assert all(0 <= p < 2**31 for p in stand_in.params[-1])
            continue
        grad = torch.randn(1, 2, N, dim, device=device)
        out, grads = run_with_grads(lambda a, b, c: call(a, b, c, window, backend), (q, k, v),
                                    grad)
        ref, ref_grads = run_with_grads(
            lambda a, b, c: masked_attention(a, b, c, dense(window).to(device), dim ** -0.5),
            (q, k, v), grad, torch.float64)
        assert_close(f"{window} out", out, ref, dtype)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_close(f"{window} {name}", g, r, dtype)


VARLEN_WINDOWS = {
    # id: (window argument, the (left, right) it stands for in each of the 3 sequences)
    "shared-2^63": ((2**63, 1), [(2**63, 1)] * 3),
    "shared-2^64": ((0, 2**64), [(0, 2**64)] * 3),
    "shared-np.uint64": ((np.uint64(2**64 - 1), np.uint64(2**64 - 1)),
                         [(2**64 - 1, 2**64 - 1)] * 3),
    "list": ([(2**63, 0), (1, 2**64), (10**30, 10**30)],
             [(2**63, 0), (1, 2**64), (10**30, 10**30)]),
    "int64-tensor": (torch.tensor([[2**63 - 1, 0], [1, 2**63 - 1], [2**62, 2**62]]),
                     [(2**63 - 1, 0), (1, 2**63 - 1), (2**62, 2**62)]),
    "uint64-tensor": (torch.tensor([[2**64 - 1, 0], [1, 2**63], [2**63, 2**64 - 1]],
                                   dtype=torch.uint64),
                      [(2**64 - 1, 0), (1, 2**63), (2**63, 2**64 - 1)]),
}


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("case", list(VARLEN_WINDOWS))
def test_varlen_huge_windows_are_clipped(case, backend, device):
    """The packed band op with huge windows (shared, per-sequence list or int tensor) against the
    per-sequence float64 oracle, forward and every gradient; ``backend="cuda"`` refuses with its
    usual reason (no varlen CUDA kernels), whatever the window."""
    window, per_seq = VARLEN_WINDOWS[case]
    lens = [3, 6, 1]
    cu = [0, 3, 9, 10]
    q, k, v = (torch.randn(10, 2, 16, device=device) for _ in range(3))
    grad = torch.randn(10, 2, 16, device=device)

    def oracle(a, b, c):
        outs = []
        for i, n in enumerate(lens):
            sl = [t[cu[i]:cu[i + 1]].transpose(0, 1) for t in (a, b, c)]
            outs.append(masked_attention(*sl, _band(n, *per_seq[i]).to(device),
                                         16 ** -0.5).transpose(0, 1))
        return torch.cat(outs)

    out, grads = run_with_grads(
        lambda a, b, c: pk.band_attention_varlen(a, b, c, cu, window, backend=backend),
        (q, k, v), grad)
    ref, ref_grads = run_with_grads(oracle, (q, k, v), grad, torch.float64)
    assert_close("out", out, ref, torch.float32)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, r, torch.float32)
    with pytest.raises(ValueError, match="no varlen kernels"):
        pk.band_attention_varlen(q, k, v, cu, window, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "reference", "cuda"])
@pytest.mark.parametrize("huge", [2**31, 2**40, 2**63, 2**64])
def test_pooling_to_huge_grids_is_a_clear_error(huge, backend, device):
    x = torch.randn(1, 12, 8, device=device)
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=rf"out_grid \(1, {huge}\) has {huge} cells, more than "
                                         r"2\*\*31 - 1"):
        pk.adaptive_avg_pool_tokens(x, (3, 4), (1, huge), backend=backend)
    for fused in (False, True):
        with pytest.raises(ValueError, match=r"out_grid \(.*\) has \d+ cells, more than"):
            pk.adaptive_avg_pool_project(x, w, in_grid=(3, 4), out_grid=(huge, 1),
                                         backend=backend, fused=fused)
    with pytest.raises(ValueError, match=r"pooled batch has \d+ tokens, more than 2\*\*31 - 1"):
        pk.adaptive_avg_pool_tokens_varlen(x[0], [0, 12], [(3, 4)], [(huge, 1)],
                                           backend="reference" if backend == "cuda" else backend)


def _meta(values):
    return torch.tensor(values, device="meta")


def test_meta_device_arguments_are_named():
    """Per-batch arguments on the meta device hold no values to plan with: a ValueError naming
    the argument, not torch's 'Cannot copy out of meta tensor'."""
    q = torch.randn(6, 2, 16)
    x = torch.randn(6, 4)
    calls = {
        "cu_seqlens": lambda: pk.band_attention_varlen(q, q, q, _meta([0, 6]), (1, 1)),
        "cu_seqlens_q": lambda: pk.partial_global_attention_varlen(q, q, q, _meta([0, 6]),
                                                                   [0, 6], 2),
        "cu_seqlens_k": lambda: pk.partial_global_attention_varlen(q, q, q, [0, 6],
                                                                   _meta([0, 6]), 2),
        "n_partial": lambda: pk.partial_global_attention_varlen(q, q, q, [0, 6], [0, 6],
                                                                _meta(2)),
        "visual_grids": lambda: pk.partial_global_attention_varlen(
            q, q, q, [0, 6], [0, 6], 2, visual_grids=_meta([[2, 3]]), partial_grids=[(1, 2)]),
        "window": lambda: pk.band_attention_varlen(q, q, q, [0, 6], _meta([[1, 1]])),
        "windows": lambda: pk.plan_band([0, 6], windows=_meta([[1, 1]])),
        "in_grids": lambda: pk.adaptive_avg_pool_tokens_varlen(x, [0, 6], _meta([[2, 3]]),
                                                               (1, 1)),
        "out_grids": lambda: pk.plan_pool([0, 6], [(2, 3)], _meta([[1, 1]])),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name} is on the meta device"):
            call()
    with pytest.raises(ValueError, match=r"^cu_seqlens is on the meta device"):
        pk.adaptive_avg_pool_tokens_varlen(x, _meta([0, 6]), [(2, 3)], (1, 1))
    with pytest.raises(TypeError, match=r"^n_partial must be an integer tensor"):  # not 2
        pk.partial_global_attention_varlen(q, q, q, [0, 6], [0, 6], torch.tensor(2.5))


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_band_varlen_messages_name_cu_seqlens(backend, device):
    """band_attention_varlen has one offsets argument, ``cu_seqlens``: its length errors name it
    (from the op and from the launcher, which repeats the check under torch.compile), where the
    partial-global op names ``cu_seqlens_q`` / ``cu_seqlens_k``."""
    q = torch.randn(9, 2, 16, device=device)
    with pytest.raises(ValueError, match=r"^q has 9 tokens but cu_seqlens\[-1\] = 8$"):
        pk.band_attention_varlen(q, q, q, [0, 4, 8], (1, 1), backend=backend)
    with pytest.raises(ValueError, match=r"^q has 8 tokens but cu_seqlens\[-1\] = 9$"):
        pk.band_attention_varlen(q[:8], q[:8], q[:8], window=(1, 1), backend=backend,
                                 plan=pk.plan_band([0, 4, 9], device=device))
    band_plan = pk.plan_band([0, 4, 8], device=device)
    with pytest.raises(ValueError, match=r"^q has 9 tokens but cu_seqlens\[-1\] = 8$"):
        varlen_triton.check_lengths(band_plan, q, q, q)
    pg_plan = pk.plan_partial_global([0, 4, 8], [0, 4, 9], 1, device=device)
    with pytest.raises(ValueError, match=r"^q has 9 tokens but cu_seqlens_q\[-1\] = 8$"):
        varlen_triton.check_lengths(pg_plan, q, q, q)
    with pytest.raises(ValueError, match=r"^k has 8 tokens but cu_seqlens_k\[-1\] = 9$"):
        pk.partial_global_attention_varlen(q[:8], q[:8], q[:8], [0, 4, 8], [0, 4, 9], 1,
                                           backend=backend)
