"""Test configuration.

On a machine without a CUDA GPU the Triton kernels run under Triton's interpreter on CPU
tensors: ``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here,
before any test module imports pargo_kernels. On a GPU machine the same tests run on CUDA.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
