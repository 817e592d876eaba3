"""The readable specification: every op in plain PyTorch, computed in float32/float64.

Kernels are tested against these functions; they follow the SqueezeAttention paper
(arXiv 2404.04793) and the H2O / StreamingLLM policies as described in the README.
"""
import torch

# ---- layer dimension ----

# ---- prefill ----

# ---- decode ----
