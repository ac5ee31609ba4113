"""The test setup itself: the suite never chooses the interpreter, and under it the conftest's
round-to-nearest bf16 cast is in force.

``TRITON_INTERPRET`` is the caller's choice (``make test`` sets it for the CPU run): a test or
the conftest that set it in the test process would hide, on a CPU machine, exactly the failures
a CUDA machine would show (tests pinning the Triton backend on CPU tensors). Child processes
may get their own environment (a benchmark smoke run that is CPU-only by design), so
``subprocess`` environments built from a copy of ``os.environ`` are allowed; changing this
process's environment is not.
"""
import ast
import os

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
VAR = "TRITON_INTERPRET"
# calls that change this process's environment when given VAR (on os.environ, os, monkeypatch)
_ENVIRON_METHODS = {"setdefault", "pop", "update", "__setitem__", "__delitem__", "clear",
                    "popitem"}
_ANY_RECEIVER = {"setenv", "delenv", "putenv", "unsetenv"}


def _is_environ(node) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def _names_var(node) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == VAR for n in ast.walk(node)) or \
        any(isinstance(n, ast.keyword) and n.arg == VAR for n in ast.walk(node))


def environment_writes(source: str) -> list[int]:
    """Lines of ``source`` that set, change or remove ``TRITON_INTERPRET`` in the running
    process (``os.environ[...] = / del``, ``os.environ.setdefault / pop / update``,
    ``os.putenv``, ``monkeypatch.setenv / delenv``, ``os.environ |= ...``)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and _is_environ(t.value) and _names_var(t.slice):
                    lines.append(node.lineno)
                if isinstance(node, ast.AugAssign) and _is_environ(t) and _names_var(node.value):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, args = node.func.attr, ast.Tuple(elts=list(node.args) + list(node.keywords))
            if not _names_var(args):
                continue
            if name in _ANY_RECEIVER or (name in _ENVIRON_METHODS and _is_environ(node.func.value)):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_no_test_sets_triton_interpret():
    offenders = []
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name)) as f:
                offenders += [f"tests/{name}:{line}" for line in environment_writes(f.read())]
    assert not offenders, f"these lines set {VAR} in the test process: {offenders}"


@pytest.mark.parametrize("source, caught", [
    ('os.environ["TRITON_INTERPRET"] = "1"', True),
    ('os.environ.setdefault("TRITON_INTERPRET", "1")', True),
    ('os.environ.update(TRITON_INTERPRET="1")', True),
    ('os.environ.pop("TRITON_INTERPRET", None)', True),
    ('del os.environ["TRITON_INTERPRET"]', True),
    ('monkeypatch.setenv("TRITON_INTERPRET", "0")', True),
    ('os.putenv("TRITON_INTERPRET", "1")', True),
    ('os.environ |= {"TRITON_INTERPRET": "1"}', True),
    ('env = dict(os.environ, TRITON_INTERPRET="1")', False),  # a child process's environment
    ('env.pop("TRITON_INTERPRET", None)', False),
    ('x = os.environ.get("TRITON_INTERPRET")', False),
    ('os.environ["PARGO_BACKEND"] = "triton"', False),
])
def test_environment_write_detector(source, caught):
    assert bool(environment_writes(source)) == caught


@pytest.mark.interpreter(reason="the conftest's patch of the interpreter's bf16 cast")
def test_interpreter_rounds_fp32_to_bf16_to_nearest_even():
    """Under the interpreter ``x.to(tl.bfloat16)`` rounds to nearest even, as the GPU's
    ``cvt.rn.bf16.f32`` and torch's cast do (tests/conftest.py patches Triton 3.6's truncating
    cast). About half of the random values lie nearer the bf16 neighbour away from zero, where
    truncation gives the other one."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))

    x = (torch.rand(64, dtype=torch.float64) + 1.0) * 2.0 ** torch.randint(-8, 8, (64,))
    x = torch.where(torch.rand(64) < 0.5, -x, x).to(torch.float32)
    y = torch.empty(64, dtype=torch.bfloat16)
    cast[(1,)](x, y, N=64)
    assert torch.equal(y, x.to(torch.bfloat16))
    assert not torch.equal(y, (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
                           .to(torch.bfloat16))  # truncation differs on some of 64 draws
