"""cache_append_ and cache_evict_: C++ CPU kernels, Triton kernels (interpreter on CPU, GPU when
present) and fake kernels against squeeze_ops.reference; the eviction rule pinned on small cases."""
import pytest
import torch
from decode_cases import POLICIES, assert_same_cache, clone_all, expect_error, kept_positions, random_cache
from decode_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import reference
from squeeze_ops.triton_kernels import cache_ops as tk

I32 = dict(dtype=torch.int32)


def new_tokens(B, Hkv, D, positions, dtype=torch.float32, device="cpu"):
    k_new = torch.randn(B, Hkv, D).to(dtype)
    v_new = torch.randn(B, Hkv, D).to(dtype)
    return [t.to(device) for t in (k_new, v_new, torch.tensor(positions, **I32))]


# ---- cache_append_ ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_append_matches_reference(dtype):
    C = 11
    cache = random_cache(4, 3, C, 64, [0, 1, C - 1, 5], dtype)
    token = new_tokens(4, 3, 64, [0, 1, 10, 5], dtype)
    got, want = clone_all(cache), clone_all(cache)
    torch.ops.squeeze.cache_append_(*got, *token)
    reference.cache_append_(*want, *token)
    assert_same_cache(got, want)
    assert got[2].tolist() == [1, 2, C, 6]


def test_append_triton_matches_reference():
    cache = random_cache(3, 2, 9, 64, [0, 8, 4], device=TRITON_DEVICE)
    token = new_tokens(3, 2, 64, [7, 8, 4], device=TRITON_DEVICE)
    got, want = clone_all(cache), clone_all(cache)
    tk.cache_append_(*got, *token)
    reference.cache_append_(*want, *token)
    assert_same_cache(got, want)


def test_append_opcheck():
    cache = random_cache(2, 2, 6, 64, [0, 3])
    torch.library.opcheck(torch.ops.squeeze.cache_append_.default, (*cache, *new_tokens(2, 2, 64, [0, 3])))


# ---- the eviction rule, pinned on small hand-made cases ----

def single_head_cache(positions, scores, C=None):
    """One sequence, one KV head, D 64, holding `positions` with `scores` in slot order."""
    n = len(positions)
    C = C or n
    cache = random_cache(1, 1, C, 64, [n])
    cache[3][0, 0, :n] = torch.tensor(positions, **I32)
    cache[4][0, 0, :n] = torch.tensor(scores, dtype=torch.float32)
    return cache


def evict_to(cache, budget, policy, sinks, recent_ratio):
    torch.ops.squeeze.cache_evict_(*cache, torch.tensor([budget], **I32), policy, sinks, recent_ratio)
    return sorted(kept_positions(cache[2], cache[3])[(0, 0)])


@pytest.mark.parametrize("policy,sinks,recent_ratio,kept", [
    ("window", 2, 0.5, [6, 7, 8, 9]),       # the newest; sinks ignored
    ("streaming", 2, 0.5, [0, 1, 8, 9]),    # sinks + the newest
    ("h2o", 0, 0.5, [3, 7, 8, 9]),          # R = 2 newest (8, 9) + the highest scores (7: 0.9, 3: 0.8)
    ("h2o", 1, 0.25, [0, 3, 7, 9]),         # sink 0 + R = 1 newest (9) + the two highest (7, 3)
    ("h2o", 0, 0.0, [2, 3, 5, 7]),          # no recent window: the four highest scores
])
def test_eviction_rule(policy, sinks, recent_ratio, kept):
    positions = [5, 0, 9, 3, 7, 1, 8, 2, 6, 4]
    score_of = {0: 0.1, 1: 0.2, 2: 0.7, 3: 0.8, 4: 0.3, 5: 0.6, 6: 0.05, 7: 0.9, 8: 0.15, 9: 0.01}
    cache = single_head_cache(positions, [score_of[p] for p in positions], C=12)
    assert evict_to(cache, 4, policy, sinks, recent_ratio) == kept


def test_h2o_ties_evict_the_oldest():
    """Equal scores: the smallest position outside the protected set goes first."""
    positions = [4, 9, 0, 7, 2, 5, 1, 8, 3, 6]
    cache = single_head_cache(positions, [0.5] * 10)
    # sinks 1, R = floor(5 * 0.4) = 2 newest (8, 9); among 1..7 (all tied) the oldest go: 1, 2, 3, 4, 5.
    assert evict_to(cache, 5, "h2o", 1, 0.4) == [0, 6, 7, 8, 9]


def test_fallback_when_everything_is_protected():
    # sinks 3 cover 0..2 and R = floor(2 * 1.0) = 2 covers the newest: no regular candidate is left.
    # Fallback: the oldest non-sink first (3, then 4, ...), then the oldest sinks.
    cache = single_head_cache([4, 0, 3, 1, 2], [0.1, 0.9, 0.2, 0.8, 0.3])
    assert evict_to(clone_all(cache), 2, "h2o", 3, 1.0) == [1, 2]
    assert evict_to(clone_all(cache), 4, "h2o", 3, 1.0) == [0, 1, 2, 4]
    assert evict_to(clone_all(cache), 1, "streaming", 5, 0.5) == [4]


def test_eviction_moves_the_last_slot_into_the_victim():
    cache = single_head_cache([3, 0, 2, 1], [0.4, 0.3, 0.2, 0.1], C=6)
    k_last = cache[0][0, 0, 3].clone()
    torch.ops.squeeze.cache_evict_(*cache, torch.tensor([3], **I32), "window", 0, 0.5)
    assert cache[2].tolist() == [3]
    assert cache[3][0, 0].tolist() == [3, 1, 2, -1, -1, -1]  # position 0 (slot 1) evicted, slot 3 moved in
    assert cache[4][0, 0].tolist() == pytest.approx([0.4, 0.1, 0.2, 0, 0, 0])
    assert torch.equal(cache[0][0, 0, 1], k_last)


# ---- cache_evict_ against the reference ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sinks,recent_ratio", [(0, 0.5), (4, 0.3), (2, 1.0)])
def test_evict_matches_reference(policy, sinks, recent_ratio, dtype):
    C = 37
    cache = random_cache(6, 3, C, 64, [0, 1, C, 20, 9, 30], dtype, position_gap=3)
    budget = torch.tensor([0, 0, 10, 20, 12, 1], **I32)  # nothing, everything, none and some to evict
    got, want = clone_all(cache), clone_all(cache)
    torch.ops.squeeze.cache_evict_(*got, budget, policy, sinks, recent_ratio)
    reference.cache_evict_(*want, budget, policy, sinks, recent_ratio)
    assert_same_cache(got, want)
    assert got[2].tolist() == [0, 0, 10, 20, 9, 1]


@pytest.mark.parametrize("policy", POLICIES)
def test_evict_triton_matches_reference(policy):
    C = 4200  # the victim search scans two blocks
    cache = random_cache(2, 2, C, 64, [C, 7], device=TRITON_DEVICE)
    budget = torch.tensor([C - 4, 3], **I32, device=TRITON_DEVICE)
    got, want = clone_all(cache), clone_all(cache)
    tk.cache_evict_(*got, budget, policy, 4, 0.5)
    reference.cache_evict_(*want, budget, policy, 4, 0.5)
    assert_same_cache(got, want)


def test_triton_append_and_evict_stay_in_bounds_for_any_values(no_value_checks):
    """On the GPU cache_append_ and cache_evict_ check no lens, budget or pos value (a host sync)
    unless SQUEEZE_DEBUG=1: lens at or past the capacity or negative, budgets outside [0, C] and
    negative positions are clamped, and the kernels write nothing outside the cache's tensors.
    The host checks are switched off here as on the GPU."""
    B, Hkv, C, D = 5, 2, 6, 64
    # The out-of-range values sit in the first and last sequences, whose rows border the fences.
    fences = [fenced(t) for t in random_cache(B, Hkv, C, D, [0, C, C - 1, 1, C], device=TRITON_DEVICE)]
    cache = [view for view, _ in fences]
    cache[2].copy_(torch.tensor([-3, C, C - 1, 1, C + 7], **I32))
    tk.cache_append_(*cache, *new_tokens(B, Hkv, D, [-5, 41, 43, 44, 40], device=TRITON_DEVICE))
    assert cache[2].tolist() == [1, C, C, 2, C + 7]  # negative: slot 0; no room: nothing appended
    tk.cache_evict_(*cache, torch.tensor([-2, 0, 2, 1, C + 3], **I32, device=TRITON_DEVICE), "h2o", 1, 0.5)
    assert cache[2].tolist() == [0, 0, 2, 1, C]  # budgets clamped into [0, C]
    for _, intact in fences:
        intact()


def test_recent_window_uses_double_precision():
    # R = floor(10 * 0.7) = 7 in double precision protects positions 4..10, so the tied oldest (0)
    # goes; had 0.7 been rounded to float32 first, R = 6 would expose position 4 and its low score.
    positions = list(range(11))
    scores = [0.5] * 4 + [0.0] + [0.5] * 6
    for run, device in ((torch.ops.squeeze.cache_evict_, "cpu"), (tk.cache_evict_, TRITON_DEVICE)):
        cache = [t.to(device) for t in single_head_cache(positions, scores)]
        run(*cache, torch.tensor([10], **I32, device=device), "h2o", 0, 0.7)
        assert sorted(kept_positions(cache[2], cache[3])[(0, 0)]) == list(range(1, 11))


def test_evict_opcheck():
    cache = random_cache(2, 2, 9, 64, [9, 4])
    torch.library.opcheck(torch.ops.squeeze.cache_evict_.default,
                          (*cache, torch.tensor([5, 4], **I32), "h2o", 1, 0.5))


def test_wrapper_defaults():
    cache = random_cache(1, 1, 8, 64, [8])
    squeeze_ops.cache_evict_(*cache, 5, policy="streaming")  # sinks default 4
    assert sorted(kept_positions(cache[2], cache[3])[(0, 0)]) == [0, 1, 2, 3, 7]


# ---- bad inputs ----

def bad_appends():
    cache = random_cache(2, 2, 5, 64, [2, 4])
    token = new_tokens(2, 2, 64, [2, 4])
    full = clone_all(cache)
    full[2] = torch.tensor([2, 5], **I32)
    yield "capacity overflow", (*full, *token), "capacity overflow"
    yield "lens > C", (*cache[:2], torch.tensor([2, 6], **I32), *cache[3:], *token), "lens.*exceeds"
    yield "negative pos", (*cache, *token[:2], torch.tensor([-1, 3], **I32)), "pos: expected non-negative"
    yield "k_new dtype", (*cache, token[0].half(), *token[1:]), "k_new: expected dtype"
    yield "v_new shape", (*cache, token[0], token[1][:, :1], token[2]), "v_new: expected shape"
    yield "pos dtype", (*cache, *token[:2], token[2].long()), "pos: expected dtype"
    yield "slot_pos dtype", (*cache[:3], cache[3].long(), cache[4], *token), "slot_pos: expected dtype"
    yield "scores dtype", (*cache[:4], cache[4].half(), *token), "scores: expected dtype"
    yield "k_new layout", (*cache, token[0].transpose(1, 2).contiguous().transpose(1, 2), *token[1:]), "k_new: last dim"


def bad_evictions():
    cache = random_cache(2, 2, 5, 64, [2, 4])
    budget = torch.tensor([1, 2], **I32)
    yield "budget > C", (*cache, torch.tensor([1, 6], **I32), "h2o", 0, 0.5), "budget.*exceeds"
    yield "negative budget", (*cache, torch.tensor([-1, 2], **I32), "h2o", 0, 0.5), "budget: expected non-neg"
    yield "lens > C", (*cache[:2], torch.tensor([2, 6], **I32), *cache[3:], budget, "h2o", 0, 0.5), "lens.*exceeds"
    yield "unknown policy", (*cache, budget, "lru", 0, 0.5), "policy"
    yield "negative sinks", (*cache, budget, "streaming", -1, 0.5), "sinks"
    yield "recent_ratio", (*cache, budget, "h2o", 0, 1.5), "recent_ratio"
    yield "budget dtype", (*cache, budget.long(), "h2o", 0, 0.5), "budget: expected dtype"
    yield "slot_pos shape", (*cache[:3], cache[3][:, :, :4], cache[4], budget, "h2o", 0, 0.5), \
        "slot_pos: expected shape"
    yield "cache rank", (cache[0][0], *cache[1:], budget, "h2o", 0, 0.5), "k_cache: expected a 4-d"


@pytest.mark.parametrize("run", [torch.ops.squeeze.cache_append_, tk.cache_append_], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_appends()), ids=lambda c: c[0])
def test_bad_appends_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


@pytest.mark.parametrize("run", [torch.ops.squeeze.cache_evict_, tk.cache_evict_], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_evictions()), ids=lambda c: c[0])
def test_bad_evictions_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_append_and_evict_match_reference(policy):
    C = 700
    cache = random_cache(5, 8, C, 128, [0, 1, C - 1, 300, 650], torch.bfloat16, "cuda", position_gap=2)
    token = new_tokens(5, 8, 128, [0, 2, 1400, 600, 1300], torch.bfloat16, "cuda")
    budget = torch.tensor([0, 1, 500, 290, 651], **I32, device="cuda")
    got, want = clone_all(cache), [t.cpu() for t in cache]
    torch.ops.squeeze.cache_append_(*got, *token)
    torch.ops.squeeze.cache_evict_(*got, budget, policy, 4, 0.5)
    reference.cache_append_(*want, *(t.cpu() for t in token))
    reference.cache_evict_(*want, budget.cpu(), policy, 4, 0.5)
    assert_same_cache(got, want)


@pytest.mark.cuda
def test_cuda_append_to_a_full_cache_writes_nothing():
    """Without SQUEEZE_DEBUG the GPU path does not check lens; a full cache drops the token."""
    big = random_cache(2, 2, 8, 64, [8, 8], device="cuda")
    cache = [big[0][:, :, :6], big[1][:, :, :6], torch.tensor([6, 9], **I32, device="cuda"),
             big[3][:, :, :6], big[4][:, :, :6]]
    before = clone_all(big)
    tk.cache_append_(*cache, *new_tokens(2, 2, 64, [50, 51], device="cuda"))
    for t, b in zip(big, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)
