"""Triton kernels of squeeze_ops (installed as squeeze_ops.triton_kernels): one module per op,
each with its @triton.jit kernels and a launcher that takes tensors. Registration for the
CUDA dispatch key happens in squeeze_ops/_library.py."""
