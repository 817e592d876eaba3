"""cache_append_ and cache_evict_ on the GPU over paged rows (the eviction rule, shared with
decode_step_'s combine-and-evict pass, is common.evict_row; the row addressing common.row_slots).

Nothing here reads a value back to the host, so every launch can be captured in a CUDA graph.
Without SQUEEZE_DEBUG=1 the value checks (lens, budget, pos, page ids) run only for CPU tensors;
the kernels instead clamp lens to [0, C] and never follow a page id outside the pool: an append
to a full row is dropped, and the eviction only moves slots below lens.
"""
import triton
import triton.language as tl

from squeeze_ops import _checks
from squeeze_ops.vocabulary import POLICY_CODES

from . import FP_FUSION
from .common import block_d, evict_block, evict_row, row_slots


@triton.jit
def _append_kernel(k_ptr, v_ptr, pos_ptr, score_ptr, table_ptr, lens_ptr, knew_ptr, vnew_ptr, tokpos_ptr,
                   stride_kp, stride_ks, stride_vp, stride_vs, stride_pp, stride_ps, stride_sp, stride_ss,
                   stride_nb, stride_nh, stride_wb, stride_wh,
                   M, P, D, PAGE: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per row: it reads its lens entry and writes it back, so no other program races it.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    C = M * PAGE
    slot = tl.minimum(tl.maximum(tl.load(lens_ptr + row), 0), C)
    room = slot < C
    page, at, ok = row_slots(table_ptr + row * M, slot, C, P, PAGE)
    put = room & ok
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.load(knew_ptr + b * stride_nb + h * stride_nh + offs_d, mask=d_mask & put)
    v = tl.load(vnew_ptr + b * stride_wb + h * stride_wh + offs_d, mask=d_mask & put)
    tl.store(k_ptr + page * stride_kp + at * stride_ks + offs_d, k, mask=d_mask & put)
    tl.store(v_ptr + page * stride_vp + at * stride_vs + offs_d, v, mask=d_mask & put)
    tl.store(pos_ptr + page * stride_pp + at * stride_ps, tl.load(tokpos_ptr + b), mask=put)
    tl.store(score_ptr + page * stride_sp + at * stride_ss, 0.0, mask=put)
    tl.store(lens_ptr + row, slot + 1, mask=room)


@triton.jit
def _evict_kernel(k_ptr, v_ptr, pos_ptr, score_ptr, table_ptr, lens_ptr, budget_ptr,
                  stride_kp, stride_ks, stride_vp, stride_vs, stride_pp, stride_ps, stride_sp, stride_ss,
                  M, P, D, sinks, PAGE: tl.constexpr, RECENT_RATIO: tl.constexpr, POLICY: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per row (it owns its lens entry).
    row = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    C = M * PAGE
    n = tl.minimum(tl.maximum(tl.load(lens_ptr + row), 0), C)
    kept = evict_row(table_ptr + row * M, k_ptr, v_ptr, pos_ptr, score_ptr, stride_kp, stride_ks, stride_vp,
                     stride_vs, stride_pp, stride_ps, stride_sp, stride_ss, C, P, n,
                     tl.minimum(tl.load(budget_ptr + row), C), sinks, D, RECENT_RATIO, POLICY, PAGE, BLOCK_C,
                     BLOCK_D)
    tl.store(lens_ptr + row, kept)


def _pool_strides(k_pages, v_pages, pos_pages, score_pages):
    return (*k_pages.stride()[:2], *v_pages.stride()[:2], *pos_pages.stride(), *score_pages.stride())


def cache_append_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos):
    """Triton launcher of torch.ops.squeeze.cache_append_ (see squeeze_ops.ops.cache_append_)."""
    _checks.cache_append_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos)
    P, PAGE, D = k_pages.shape
    B, Hkv, M = block_table.shape
    if _checks.value_checks_wanted(lens):
        _checks.check_paged_values(M * PAGE, lens, append=True, pos=pos, block_table=block_table, num_pages=P)
    if B == 0:
        return
    _append_kernel[(B, Hkv)](
        k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos,
        *_pool_strides(k_pages, v_pages, pos_pages, score_pages), *k_new.stride()[:2], *v_new.stride()[:2],
        M, P, D, PAGE=PAGE, BLOCK_D=block_d(D), enable_fp_fusion=FP_FUSION,
    )


def cache_evict_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, policy, sinks, recent_ratio):
    """Triton launcher of torch.ops.squeeze.cache_evict_ (see squeeze_ops.ops.cache_evict_)."""
    _checks.cache_evict_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, policy, sinks,
                         recent_ratio)
    P, PAGE, D = k_pages.shape
    B, Hkv, M = block_table.shape
    if _checks.value_checks_wanted(lens):
        _checks.check_paged_values(M * PAGE, lens, budget=budget, block_table=block_table, num_pages=P)
    if B == 0:
        return
    _evict_kernel[(B, Hkv)](
        k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget,
        *_pool_strides(k_pages, v_pages, pos_pages, score_pages),
        M, P, D, sinks, PAGE=PAGE, RECENT_RATIO=float(recent_ratio), POLICY=POLICY_CODES[policy],
        BLOCK_C=evict_block(M * PAGE), BLOCK_D=block_d(D), num_warps=8, enable_fp_fusion=FP_FUSION,
    )
