"""Test setup. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter: TRITON_INTERPRET must be set before any kernel module imports triton."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and tuple(map(int, triton.__version__.split(".")[:2])) < (3, 8):
    # Triton 3.6's interpreter turns a runtime scalar into an index with int() on a 1-element
    # array, which numpy 2 refuses (`range(0, n)` over a kernel argument or a loaded value);
    # Triton 3.8 squeezes it first. The same rule here, so the oldest supported Triton runs the
    # kernels on CPU too.
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_with_squeezed_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _interpreter._patch_lang_tensor = _patch_with_squeezed_index

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


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M on CPU as squeeze_ops.evaluation.load_smollm2 returns it (runner, tokenizer,
    model), loaded once per test session: the GGUF load takes ~30 s on 2 cores."""
    from squeeze_ops import evaluation

    return evaluation.load_smollm2("cpu")
