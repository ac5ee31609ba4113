"""Test configuration.

The tests do not choose how Triton runs: ``TRITON_INTERPRET=1`` (set by ``make test`` for the
CPU run, before triton is imported) runs the kernels under Triton's interpreter on CPU tensors;
without it they run compiled on a CUDA GPU. Nothing in tests/ sets or clears TRITON_INTERPRET in
this process (tests/test_suite_setup.py checks the sources, ``pytest_runtest_call`` below the
runs).

``DEVICE`` (the ``device`` fixture) is where tests put their tensors: the CPU under the
interpreter, else CUDA when there is a GPU, else the CPU. Tests that need Triton say so, and are
skipped with the reason where it cannot run:

* ``@pytest.mark.triton``: runs the Triton backend on ``DEVICE`` (a parametrized backend:
  ``pytest.param("triton", marks=pytest.mark.triton)``); skipped without a CUDA GPU and without
  the interpreter. The reference backend's cases of the same test still run.
* ``@pytest.mark.interpreter(reason=...)``: relies on the interpreter itself (records its builder
  calls, or host memory that only the interpreter addresses); skipped unless it is on.
* ``@pytest.mark.gpu(reason=...)``: needs compiled Triton kernels on a CUDA GPU.
"""
import os

import pytest
import torch

from pargo_kernels._backend import triton_interpret
from pargo_kernels.testing import triton_skip_reason, triton_test_device

INTERPRET = triton_interpret()
DEVICE = triton_test_device()
TRITON_WHY = triton_skip_reason(DEVICE)
_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def sparse_buffer(monkeypatch):
    """``make(n, dtype)``: an uninitialised buffer of ``n`` elements on ``DEVICE`` of which a
    test touches a few rows (offsets past 2^31 elements). CPU: virtual memory, pages allocated
    when touched, and the interpreter is kept from copying the whole storage back after each
    launch (on CPU its host copy *is* the tensor). CUDA: real memory; skipped, with the reason,
    where the GPU has too little free."""
    def make(n, dtype):
        if DEVICE == "cuda":
            need, free = n * dtype.itemsize, torch.cuda.mem_get_info()[0]
            if free < need + 2**30:
                pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, "
                            f"{free / 2**30:.1f} GiB free")
        elif INTERPRET:
            from triton.runtime import interpreter
            monkeypatch.setattr(interpreter.GridExecutor, "_restore_args_dev",
                                lambda *a, **k: None)
        return torch.empty(n, dtype=dtype, device=DEVICE)
    return make


def pytest_configure(config):
    for line in ("triton: runs the Triton backend on the test device (skipped where Triton "
                 "cannot run: no CUDA GPU and no TRITON_INTERPRET=1)",
                 "interpreter(reason): relies on Triton's interpreter (skipped without "
                 "TRITON_INTERPRET=1)",
                 "gpu(reason): needs compiled Triton on a CUDA GPU (skipped otherwise)"):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    gpu_why = "" if DEVICE == "cuda" else (
        "needs a CUDA GPU and TRITON_INTERPRET unset" if torch.cuda.is_available()
        else "needs a CUDA GPU")
    for item in items:
        if TRITON_WHY and item.get_closest_marker("triton"):
            item.add_marker(pytest.mark.skip(reason=TRITON_WHY))
        mark = item.get_closest_marker("interpreter")
        if mark and not INTERPRET:
            why = mark.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(
                reason="needs Triton's interpreter (TRITON_INTERPRET=1)" + (": " + why if why
                                                                            else "")))
        mark = item.get_closest_marker("gpu")
        if mark and gpu_why:
            why = mark.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=gpu_why + (": " + why if why else "")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that changes TRITON_INTERPRET in this process fails: triton was imported with the
    value the run started with, and the backends read the variable at every call."""
    result = yield
    now = os.environ.get("TRITON_INTERPRET")
    if now != _INTERPRET_AT_START:
        raise AssertionError(f"TRITON_INTERPRET changed during the test ({_INTERPRET_AT_START!r}"
                             f" -> {now!r}): the tests must not set it (make test does)")
    return result


def _interpreter_rounds_bf16_to_nearest():
    """Triton 3.6's interpreter casts fp32 -> bf16 (``x.to(tl.bfloat16)``) by truncating the
    mantissa (round toward zero), while the GPU compiles the same cast to ``cvt.rn.bf16.f32``
    (round to nearest even). Truncation biases every rounded value toward zero (attention
    probabilities all low), and the bias adds up coherently in reductions (LayerNorm and
    projection weight gradients): the bf16 projector test then measured the interpreter, not
    the kernels (kernel error ~4x PyTorch's on some draws). Here the interpreter rounds to
    nearest even, as the hardware does (torch's fp32 -> bf16 cast is RNE)."""
    if not INTERPRET:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        return truncating(self, src, dst_type)

    builder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest()
