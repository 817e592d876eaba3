"""Every Triton launch of the library pins its compile options (squeeze_ops.triton_kernels.FP_FUSION),
so that neither a Triton version's default (FP fusion off from Triton 3.10) nor a process-wide
TRITON_DEFAULT_FP_FUSION changes the numerics or the speed the kernels were tested and timed with.
Each launcher is called once on small inputs while the kernels' `run` records what it was given;
a new kernel or launch site that forgets the option fails here."""
import math

import pytest
import torch
from paged_cases import random_cache

from conftest import TRITON_DEVICE
from squeeze_ops import triton_kernels
from squeeze_ops.triton_kernels import add_rmsnorm_cossim, cache_ops, common, compress_kv, decode_attention, decode_step
from squeeze_ops.triton_kernels import prefill_attention

MODULES = (add_rmsnorm_cossim, cache_ops, common, compress_kv, decode_attention, decode_step, prefill_attention)
I32 = dict(dtype=torch.int32, device=TRITON_DEVICE)
JIT = type(prefill_attention._attention_kernel)  # the interpreter's class under TRITON_INTERPRET, else Triton's


def launched_kernels():
    """The @triton.jit kernels the launchers launch: by convention named _*_kernel."""
    return {name for m in MODULES for name, obj in vars(m).items()
            if isinstance(obj, JIT) and name.startswith("_") and name.endswith("_kernel")}


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: [the enable_fp_fusion of each launch]} filled as the kernels run."""
    seen = {}
    run = JIT.run

    def recording_run(self, *args, **kwargs):
        seen.setdefault(self.__name__, []).append(kwargs.get("enable_fp_fusion"))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JIT, "run", recording_run)
    return seen


def test_every_triton_launch_pins_fp_fusion(launches):
    B, H, Hkv, D, d = 2, 4, 2, 64, 48
    x = lambda *shape: torch.randn(*shape, device=TRITON_DEVICE)  # noqa: E731
    cu = torch.tensor([0, 3, 8], **I32)
    T = 8

    add_rmsnorm_cossim.add_rmsnorm_cossim(x(T, d), x(T, d), x(d), cu, torch.zeros(B, device=TRITON_DEVICE), 1e-6)
    prefill_attention.prefill_attention(x(T, H, D), x(T, Hkv, D), x(T, Hkv, D), cu, 5, 1 / math.sqrt(D), 0)
    cache = random_cache(B, Hkv, [0, 0], D, 4, width=2, device=TRITON_DEVICE)
    budget = torch.tensor([[2, 2], [4, 4]], **I32)
    compress_kv.compress_kv_(x(T, Hkv, D), x(T, Hkv, D), x(T, Hkv).abs(), cu, budget, "h2o", 0, 0.5, 3, "avg",
                             *cache)
    cache_ops.cache_append_(*cache, x(B, Hkv, D), x(B, Hkv, D), torch.tensor([3, 5], **I32))
    cache_ops.cache_evict_(*cache, budget, "h2o", 0, 0.5)
    decode_attention.decode_attention(x(B, H, D), cache[0], cache[1], cache[4], cache[5], 1 / math.sqrt(D), cache[3])
    decode_step.decode_step_(x(B, H, D), x(B, Hkv, D), x(B, Hkv, D), torch.tensor([6, 7], **I32), *cache, budget,
                             1 / math.sqrt(D), "h2o", 0, 0.5, True)

    assert set(launches) == launched_kernels()
    assert {name: set(flags) for name, flags in launches.items()} == {name: {triton_kernels.FP_FUSION}
                                                                      for name in launches}
