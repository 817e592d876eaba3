"""Test setup. Without a GPU the Triton kernels run on CPU tensors through Triton's
interpreter: TRITON_INTERPRET must be set before any kernel module imports triton."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402

# Two bugs of Triton's interpreter (not of its compiler) mended where they occur, so every
# supported Triton runs the kernels on CPU tensors.
TRITON_VERSION = tuple(map(int, triton.__version__.split(".")[:2]))
if os.environ.get("TRITON_INTERPRET") == "1":
    from triton.runtime import interpreter as _interpreter

    if TRITON_VERSION < (3, 8):
        # Triton 3.6 turns a runtime scalar into an index with int() on a 1-element array, which
        # numpy 2 refuses (`range(0, n)` over a kernel argument or a loaded value); Triton 3.8
        # squeezes it first.
        _patch_lang_tensor = _interpreter._patch_lang_tensor

        def _patch_with_squeezed_index(tensor, scope):
            _patch_lang_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        _interpreter._patch_lang_tensor = _patch_with_squeezed_index

    if TRITON_VERSION >= (3, 9):
        # Triton 3.9 computes `block_mask & scalar_mask` in int32 and hands the int32 data to a
        # masked load or store, whose C++ side accepts only bool; the compiled kernel tests the
        # mask for nonzero, and so does this.
        _Builder = _interpreter.InterpreterBuilder
        _masked_load, _masked_store = _Builder.create_masked_load, _Builder.create_masked_store

        def _as_bool(mask):
            return mask if mask.data.dtype == bool else _interpreter.TensorHandle(mask.data != 0, mask.dtype)

        _Builder.create_masked_load = lambda self, ptrs, mask, *rest: _masked_load(self, ptrs, _as_bool(mask), *rest)
        _Builder.create_masked_store = lambda self, ptrs, value, mask, *rest: _masked_store(
            self, ptrs, value, _as_bool(mask), *rest)

import squeeze_ops  # noqa: E402,F401  (registers torch.ops.squeeze.*)
from squeeze_ops import _checks  # noqa: E402

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


@pytest.fixture
def no_value_checks():
    """The Triton launchers as they run on a GPU without SQUEEZE_DEBUG: no value check reads a
    tensor back, so out-of-range lengths, budgets and offsets reach the kernels (which clamp)."""
    with _checks.forced_value_checks(False):
        yield


@pytest.fixture
def value_checks():
    """The Triton launchers with their value checks on whatever the device (as under SQUEEZE_DEBUG=1)."""
    with _checks.forced_value_checks(True):
        yield


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M on CPU as research.evaluation.load_smollm2 returns it (runner, tokenizer,
    model), loaded once per test session: the GGUF load takes ~30 s on 2 cores."""
    from research import evaluation

    return evaluation.load_smollm2("cpu")
