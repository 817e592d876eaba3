"""decode_attention on the GPU: split-K ("flash decoding") over a ragged layer cache, with optional
in-place H2O score accumulation: the two passes of common.run_decode (split pass, grid
(B, Hkv, S) with the split count per sequence decided on the device; combine pass, grid
(B, Hkv)). No value is read back to the host.
"""
from squeeze_ops import _checks

from .common import run_decode


def decode_attention(q, k_cache, v_cache, lens, scale, scores):
    """Triton launcher of torch.ops.squeeze.decode_attention (see squeeze_ops.ops.decode_attention)."""
    out = _checks.decode_attention(q, k_cache, v_cache, lens, scale, scores)
    if _checks.value_checks_wanted(lens):
        _checks.check_cache_values(k_cache.shape[2], lens)
    return run_decode(q, k_cache, v_cache, lens, scale, scores, scores is not None, out)
