"""pargo_kernels setup: pure-Python package plus an optional CUDA extension (csrc/).

The CUDA extension is built only when a CUDA-enabled torch and nvcc are present:

    PARGO_BUILD_CUDA=auto|1|0   auto (default): build when possible; 1: must build; 0: skip
    PARGO_CUDA_ARCHS="80;90"    compute capabilities to build for (default: the visible GPU's,
                                else 80;90)
    MAX_JOBS, NVCC_THREADS       parallelism of the build

Install with ``pip install --no-build-isolation -e .`` so the torch already installed is used
(an isolated build environment would download a CUDA build of torch).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    mode = os.environ.get("PARGO_BUILD_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        print("pargo_kernels: PARGO_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        why = "torch is not importable (install torch first, then use --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
            why = "nvcc was not found (set CUDA_HOME)"
        elif not sources:
            why = "csrc/ has no sources"
    if why:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError(f"PARGO_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        print(f"pargo_kernels: not building the CUDA extension: {why}", file=sys.stderr)
        return [], {}
    archs = os.environ.get("PARGO_CUDA_ARCHS", "").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    if not archs:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            archs = [f"{major}{minor}"]
        else:
            archs = ["80", "90"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode,
                  f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
    ext = CUDAExtension(
        name="pargo_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="pargo_kernels",
    version="0.1.0",
    description="Triton and CUDA kernels for ParGo / DeCo vision-language projectors",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pargo_kernels", "pargo_kernels.*", "models", "models.*"]),
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
