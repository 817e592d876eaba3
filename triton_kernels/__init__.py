"""Triton kernels of squeeze_ops (installed as squeeze_ops.triton_kernels): one module per op,
each with its @triton.jit kernels and a launcher that takes tensors. Registration for the
CUDA dispatch key happens in squeeze_ops/_library.py."""

# Compile option of every launch (and of the sm_90 compile test): fused multiply-add contraction
# on, as the kernels were tested and timed. Triton 3.10 turns its default off (3.9 warns); the
# library pins it per launch so that neither the Triton version nor a process-wide
# TRITON_DEFAULT_FP_FUSION changes its numerics or speed.
FP_FUSION = True
