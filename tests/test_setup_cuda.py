"""setup.py and the optional CUDA extension: an explicit request (``PARGO_BUILD_CUDA=1``) fails
loudly when the extension cannot be built (no CUDA torch, no nvcc) or its build fails; auto
mode skips it and says why on stderr."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("pargo_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the functions, runs no setup()
    return mod


def _here_why(setup_module) -> str:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return setup_module.why_not_buildable(None, None, None, setup_module.cuda_sources())
    return setup_module.why_not_buildable(torch.__version__, torch.version.cuda, CUDA_HOME,
                                          setup_module.cuda_sources())


def _setup(mode: str, *args):
    env = dict(os.environ, PARGO_BUILD_CUDA=mode)
    return subprocess.run([sys.executable, "setup.py", "--name", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_explicit_request_fails_loudly_or_builds(setup_module):
    """``--name`` runs the extension check, not the build: with PARGO_BUILD_CUDA=1 and no way
    to build (here: the CPU build of torch) setup.py exits non-zero naming what is missing."""
    why = _here_why(setup_module)
    proc = _setup("1")
    if not why:  # a CUDA torch and nvcc: the request is accepted
        assert proc.returncode == 0 and "building the CUDA extension" in proc.stderr, proc.stderr
        return
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"PARGO_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}" in proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a crash


def test_auto_mode_says_on_stderr_why_it_skips(setup_module):
    why = _here_why(setup_module)
    proc = _setup("auto")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pargo_kernels"
    if why:
        assert f"CUDA extension skipped (PARGO_BUILD_CUDA=auto): {why}" in proc.stderr
    proc = _setup("maybe")
    assert proc.returncode != 0 and "PARGO_BUILD_CUDA must be auto, 1 or 0" in proc.stderr


def test_reasons_name_what_is_missing(setup_module, tmp_path):
    why = setup_module.why_not_buildable
    src = ["csrc/attention_fwd.cu"]
    assert "torch is not importable" in why(None, None, None, src)
    assert "2.13.0+cpu is a CPU build" in why("2.13.0+cpu", None, "/usr/local/cuda", src)
    assert "nvcc was not found (no CUDA toolkit found" in why("2.11.0+cu130", "13.0", None, src)
    assert f"nvcc was not found (not in {tmp_path}/bin" in why("2.11.0+cu130", "13.0",
                                                                str(tmp_path), src)
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert why("2.11.0+cu130", "13.0", str(tmp_path), src) == ""
    assert why("2.11.0+cu130", "13.0", str(tmp_path), []) == "csrc/ has no sources"
    assert {os.path.splitext(s)[1] for s in setup_module.cuda_sources()} == {".cu", ".cpp"}


def test_failed_build_is_an_error_only_when_requested(setup_module, capsys):
    def broken():
        raise RuntimeError("Error compiling objects for extension")
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        setup_module.build_or_skip(broken, "pargo_kernels._C", "on")
    assert "PARGO_BUILD_CUDA=1: building the CUDA extension pargo_kernels._C FAILED" in \
        capsys.readouterr().err
    setup_module.build_or_skip(broken, "pargo_kernels._C", "auto")  # skipped, not raised
    err = capsys.readouterr().err
    assert "CUDA extension pargo_kernels._C skipped: its build failed (RuntimeError: Error " \
           "compiling objects" in err and "PARGO_BUILD_CUDA=1 makes this an error" in err
    built = []
    setup_module.build_or_skip(lambda: built.append(1), "pargo_kernels._C", "on")
    assert built == [1] and capsys.readouterr().err == ""
