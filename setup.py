"""Build of the squeeze_ops._C op library.

SQUEEZE_BUILD=auto (default) builds the CUDA kernels when nvcc (CUDA_HOME) and a CUDA build
of torch are both present, else the CPU kernels only; SQUEEZE_BUILD=cpu / cuda forces either.
The presence of a GPU is deliberately not consulted: build machines have nvcc but no GPU.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

mode = os.environ.get("SQUEEZE_BUILD", "auto")
if mode not in ("auto", "cpu", "cuda"):
    raise SystemExit(f"SQUEEZE_BUILD must be auto, cpu or cuda, got {mode!r}")
# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as in /usr/local/bin)
# makes that guess wrong, so a usable toolkit is one whose headers are really there.
cuda_possible = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
)
if mode == "cuda" and not cuda_possible:
    raise SystemExit(
        f"SQUEEZE_BUILD=cuda needs a CUDA toolkit (CUDA_HOME={CUDA_HOME}) and a CUDA build of torch"
        f" (torch {torch.__version__}, CUDA {torch.version.cuda})"
    )
with_cuda = mode == "cuda" or (mode == "auto" and cuda_possible)

sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# The C++ standard is left to torch.utils.cpp_extension: torch 2.14 headers need C++20.
extra = {"cxx": ["-O3", "-fopenmp"]}


def torch_libstdcxx():
    """The libstdc++ this process (so torch's libc10) runs with, or None off Linux."""
    if not os.path.exists("/proc/self/maps"):
        return None
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so"):
                return path
    return None


# Link that libstdc++ ahead of the compiler's own: a toolchain that links a static copy (a GCC
# under /opt/gcc was seen doing so) would give the library a second C++ runtime, and a
# c10::Error thrown by a TORCH_CHECK then crashes the process instead of raising.
libstdcxx = torch_libstdcxx()
link = ["-fopenmp"] + ([libstdcxx] if libstdcxx else [])
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # No --use_fast_math: kmeans1d must give bit-identical partitions on CPU and GPU.
    extra["nvcc"] = ["-O3", "--fmad=false", "-lineinfo"]
print(f"squeeze_ops: building the {'CPU + CUDA' if with_cuda else 'CPU-only'} op library")
Extension = CUDAExtension if with_cuda else CppExtension

setup(
    packages=["squeeze_ops", "squeeze_ops.engine", "squeeze_ops.engine.allocators", "squeeze_ops.models",
              "squeeze_ops.triton_kernels"],
    package_data={"squeeze_ops.engine": ["profiles/*.json"]},
    package_dir={"squeeze_ops.triton_kernels": "triton_kernels"},
    ext_modules=[
        Extension(
            "squeeze_ops._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
