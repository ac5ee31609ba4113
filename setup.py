"""pargo_kernels setup: pure-Python package plus an optional CUDA extension (csrc/).

The CUDA extension is built only when a CUDA-enabled torch and nvcc are present:

    PARGO_BUILD_CUDA=auto|1|0   auto (default): build when possible, else skip it, saying why
                                on stderr (a failed build is skipped too); 1: must build: a
                                missing CUDA torch / nvcc or a failed build is an error
                                (non-zero exit, the message names what is missing); 0: skip
    PARGO_CUDA_ARCHS="80;90"    compute capabilities to build for (default: the visible GPU's,
                                else 80;90)
    MAX_JOBS, NVCC_THREADS       parallelism of the build

Install with ``pip install --no-build-isolation -e .`` so the torch already installed is used
(an isolated build environment would download a CUDA build of torch); pip shows what setup.py
prints only with ``-v``. Without pip: ``PARGO_BUILD_CUDA=1 python setup.py build_ext --inplace``
(what benchmarks/gpu_run.sh does) builds ``pargo_kernels/_C*.so`` in the checkout.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def build_mode() -> str:
    """``"on"``, ``"off"`` or ``"auto"`` from ``PARGO_BUILD_CUDA``."""
    mode = os.environ.get("PARGO_BUILD_CUDA", "auto").strip().lower()
    if mode in _ON:
        return "on"
    if mode in _OFF:
        return "off"
    if mode != "auto":
        sys.exit(f"pargo_kernels: PARGO_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    return "auto"


def cuda_sources(root: str = ROOT) -> list:
    """The extension's translation units, relative to ``root``: nvcc compiles the ``.cu``
    files, the host compiler the ``.cpp`` (benchmarks/gpu_plan.py counts them)."""
    return sorted(os.path.relpath(p, root) for p in
                  glob.glob(os.path.join(root, "csrc", "*.cu")) +
                  glob.glob(os.path.join(root, "csrc", "*.cpp")))


def why_not_buildable(torch_version, torch_cuda, cuda_home, sources) -> str:
    """Why the extension cannot be built ('' if it can): ``torch_version`` None when torch is
    not importable, ``torch_cuda`` its CUDA version (None: a CPU build), ``cuda_home`` the CUDA
    toolkit torch found (None: none)."""
    if torch_version is None:
        return "torch is not importable (install torch first, then use --no-build-isolation)"
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build (the extension needs a CUDA build of torch)"
    if cuda_home is None or shutil.which(os.path.join(cuda_home, "bin", "nvcc")) is None:
        where = f"not in {cuda_home}/bin" if cuda_home else "no CUDA toolkit found"
        return f"nvcc was not found ({where}; put it on PATH or set CUDA_HOME)"
    if not sources:
        return "csrc/ has no sources"
    return ""


def build_or_skip(build, ext_name: str, mode: str) -> None:
    """Run ``build()`` (one extension's build); a failure is an error when the build was
    requested (``mode == "on"``), a skip with the reason on stderr in auto mode."""
    try:
        build()
    except (Exception, SystemExit) as exc:  # compile errors come as RuntimeError / CompileError
        why = f"{type(exc).__name__}: {exc}".strip()
        if mode == "on":
            print(f"pargo_kernels: PARGO_BUILD_CUDA=1: building the CUDA extension {ext_name} "
                  f"FAILED ({why}); see the compiler output above", file=sys.stderr)
            raise
        print(f"pargo_kernels: CUDA extension {ext_name} skipped: its build failed ({why}); "
              "the package works without it (backend='cuda' refuses, saying why). "
              "PARGO_BUILD_CUDA=1 makes this an error.", file=sys.stderr)


def _cuda_extensions(mode: str):
    if mode == "off":
        print("pargo_kernels: PARGO_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = cuda_sources()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        why = why_not_buildable(None, None, None, sources)
    else:
        why = why_not_buildable(torch.__version__, torch.version.cuda, CUDA_HOME, sources)
    if why:
        if mode == "on":
            sys.exit(f"pargo_kernels: PARGO_BUILD_CUDA=1 but the CUDA extension cannot be built: "
                     f"{why}")
        print(f"pargo_kernels: CUDA extension skipped (PARGO_BUILD_CUDA=auto): {why}",
              file=sys.stderr)
        return [], {}
    archs = os.environ.get("PARGO_CUDA_ARCHS", "").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = [f"{major}{minor}"]
        else:
            archs = ["80", "90"]
    print(f"pargo_kernels: building the CUDA extension for sm_{', sm_'.join(archs)} "
          f"(PARGO_BUILD_CUDA={mode})", file=sys.stderr)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode,
                  f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
    ext = CUDAExtension(
        name="pargo_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )

    class Build(BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            build_or_skip(lambda: super(Build, self).build_extension(ext), ext.name, mode)

    return [ext], {"build_ext": Build}


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too
    ext_modules, cmdclass = _cuda_extensions(build_mode())
    setup(
        name="pargo_kernels",
        version="0.1.0",
        description="Triton and CUDA kernels for ParGo / DeCo vision-language projectors",
        long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
            os.path.join(ROOT, "README.md")) else "",
        long_description_content_type="text/markdown",
        packages=find_packages(include=["pargo_kernels", "pargo_kernels.*", "models",
                                        "models.*"]),
        python_requires=">=3.10",
        # torch is deliberately not pinned here: the user's torch (CPU or CUDA) is used as it is.
        install_requires=["torch>=2.5", "numpy"],
        extras_require={
            "triton": ["triton>=3.2"],
            "test": ["pytest", "pytest-benchmark"],
            "train": ["transformers>=5.0", "peft", "accelerate", "pillow", "tqdm"],
            "study": ["transformers>=5.0", "peft", "accelerate", "pillow", "tqdm", "scikit-learn",
                      "matplotlib"],
            "deepspeed": ["deepspeed"],
            "xformers": ["xformers"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
