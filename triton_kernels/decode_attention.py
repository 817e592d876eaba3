"""decode_attention on the GPU: split-K ("flash decoding") over the paged rows of one layer, with
optional in-place H2O score accumulation: the two passes of common.run_decode (split pass, grid
(B, Hkv, S) with the split count per row decided on the device; combine pass, grid (B, Hkv)).
No value is read back to the host.
"""
from squeeze_ops import _checks

from .common import run_decode


def decode_attention(q, k_pages, v_pages, block_table, lens, scale, score_pages):
    """Triton launcher of torch.ops.squeeze.decode_attention (see squeeze_ops.ops.decode_attention)."""
    out = _checks.decode_attention(q, k_pages, v_pages, block_table, lens, scale, score_pages)
    if _checks.value_checks_wanted(lens):
        _checks.check_paged_values(block_table.shape[2] * k_pages.shape[1], lens, block_table=block_table,
                                   num_pages=k_pages.shape[0])
    return run_decode(q, k_pages, v_pages, block_table, lens, scale, score_pages, score_pages is not None, out)
