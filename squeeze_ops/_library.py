"""Loads the compiled op library (schemas, C++ CPU kernels, CUDA C++ kernels) and registers
what Python provides: the fake (meta) kernels and the Triton kernels of the CUDA key."""
import glob
import importlib
import os

import torch

from . import _checks


def _load_compiled():
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not libs:
        raise ImportError(
            "squeeze_ops._C is not built: run `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`) in the source tree"
        )
    torch.ops.load_library(libs[0])


_load_compiled()

for _name, _fake in _checks.FAKE_KERNELS.items():
    torch.library.register_fake(f"squeeze::{_name}")(_fake)

# Ops whose CUDA kernel is written in Triton: op name -> (module of triton_kernels, launcher).
# Ops absent here have their CUDA kernel in csrc/cuda (registered by the compiled library).
TRITON_CUDA_KERNELS = {
    # ---- layer dimension ----
    "add_rmsnorm_cossim": ("add_rmsnorm_cossim", "add_rmsnorm_cossim"),
    "add_cossim": ("add_rmsnorm_cossim", "add_cossim"),
    # ---- prefill ----
    "prefill_attention": ("prefill_attention", "prefill_attention"),
    "compress_kv_": ("compress_kv", "compress_kv_"),
    # ---- decode ----
    "decode_attention": ("decode_attention", "decode_attention"),
    "cache_append_": ("cache_ops", "cache_append_"),
    "cache_evict_": ("cache_ops", "cache_evict_"),
    "decode_step_": ("decode_step", "decode_step_"),
}

# Library.impl rather than custom_op: its per-call cost is lower on the decode hot path.
_triton_lib = torch.library.Library("squeeze", "IMPL")
for _name, (_module, _fn) in TRITON_CUDA_KERNELS.items():
    _launcher = getattr(importlib.import_module(f"squeeze_ops.triton_kernels.{_module}"), _fn)
    _triton_lib.impl(_name, _launcher, "CUDA")
