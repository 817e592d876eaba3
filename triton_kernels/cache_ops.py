"""cache_append_ and cache_evict_ on the GPU (the eviction rule, shared with decode_step_'s
combine-and-evict pass, is common.evict_head).

Layer cache (README): k_cache/v_cache [B, Hkv, C, D], lens int32 [B], slot_pos int32 [B, Hkv, C]
(-1 = empty), scores fp32 [B, Hkv, C]. Slots are unordered; a policy tells old from new by slot_pos.

Nothing here reads a value back to the host, so every launch can be captured in a CUDA graph.
Without SQUEEZE_DEBUG=1 the value checks (lens, budget, pos) run only for CPU tensors; the
kernels instead clamp lens to [0, C] and never write outside the first C slots: an append to a
full cache is dropped, and the eviction only moves slots below lens.
"""
import triton
import triton.language as tl

from squeeze_ops import _checks
from squeeze_ops.vocabulary import POLICY_CODES

from . import FP_FUSION
from .common import block_d, evict_block, evict_head

@triton.jit
def _append_kernel(k_ptr, v_ptr, lens_ptr, pos_ptr, score_ptr, knew_ptr, vnew_ptr, tokpos_ptr,
                   stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
                   stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
                   stride_nb, stride_nh, stride_wb, stride_wh,
                   Hkv, C, D, BLOCK_D: tl.constexpr):
    # One program per sequence: it reads lens[b] and writes it back, so no other program races it.
    b = tl.program_id(0).to(tl.int64)
    slot = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), C)
    room = slot < C
    position = tl.load(tokpos_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = (offs_d < D) & room
    for h in range(0, Hkv):
        k = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d, mask=d_mask)
        v = tl.load(vnew_ptr + b * stride_wb + h * stride_wh + offs_d, mask=d_mask)
        tl.store(k_ptr + b * stride_kb + h * stride_kh + slot * stride_kc + offs_d, k, mask=d_mask)
        tl.store(v_ptr + b * stride_vb + h * stride_vh + slot * stride_vc + offs_d, v, mask=d_mask)
        tl.store(pos_ptr + b * stride_pb + h * stride_ph + slot * stride_pc, position, mask=room)
        tl.store(score_ptr + b * stride_sb + h * stride_sh + slot * stride_sc, 0.0, mask=room)
    tl.store(lens_ptr + b, slot + 1, mask=room)


@triton.jit
def _evict_kernel(k_ptr, v_ptr, n_ptr, lens_ptr, pos_ptr, score_ptr, budget_ptr,
                  stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
                  stride_pb, stride_ph, stride_pc, stride_sb, stride_sh, stride_sc,
                  C, D, sinks, RECENT_RATIO: tl.constexpr, POLICY: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (sequence, KV head). n_ptr holds lens as it was before the launch: lens itself
    # is rewritten by the head-0 program while the others may still be starting.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    n = tl.minimum(tl.maximum(tl.load(n_ptr + b), 0), C)
    kept = evict_head(k_ptr + b * stride_kb + h * stride_kh, v_ptr + b * stride_vb + h * stride_vh,
                      pos_ptr + b * stride_pb + h * stride_ph, score_ptr + b * stride_sb + h * stride_sh,
                      stride_kc, stride_vc, stride_pc, stride_sc, n, tl.load(budget_ptr + b), sinks, D,
                      RECENT_RATIO, POLICY, BLOCK_C, BLOCK_D)
    tl.store(lens_ptr + b, kept, mask=h == 0)


def cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos):
    """Triton launcher of torch.ops.squeeze.cache_append_ (see squeeze_ops.ops.cache_append_)."""
    _checks.cache_append_(k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos)
    B, Hkv, C, D = k_cache.shape
    if _checks.value_checks_wanted(lens):
        _checks.check_cache_values(C, lens, append=True, pos=pos)
    _append_kernel[(B,)](
        k_cache, v_cache, lens, slot_pos, scores, k_new, v_new, pos,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *slot_pos.stride(), *scores.stride(),
        *k_new.stride()[:2], *v_new.stride()[:2],
        Hkv, C, D, BLOCK_D=block_d(D), enable_fp_fusion=FP_FUSION,
    )


def cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio):
    """Triton launcher of torch.ops.squeeze.cache_evict_ (see squeeze_ops.ops.cache_evict_)."""
    _checks.cache_evict_(k_cache, v_cache, lens, slot_pos, scores, budget, policy, sinks, recent_ratio)
    B, Hkv, C, D = k_cache.shape
    if _checks.value_checks_wanted(lens):
        _checks.check_cache_values(C, lens, budget=budget)
    _evict_kernel[(B, Hkv)](
        k_cache, v_cache, lens.clone(), lens, slot_pos, scores, budget,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *slot_pos.stride(), *scores.stride(),
        C, D, sinks, RECENT_RATIO=float(recent_ratio), POLICY=POLICY_CODES[policy],
        BLOCK_C=evict_block(C), BLOCK_D=block_d(D), num_warps=8, enable_fp_fusion=FP_FUSION,
    )
