"""Test setup. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter: TRITON_INTERPRET must be set before any kernel module imports triton."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import squeeze_ops  # noqa: E402,F401  (registers torch.ops.squeeze.*)

# Devices on which the Triton launchers are exercised directly (so a dispatch fallback cannot
# hide a kernel bug): the GPU when there is one, else CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
