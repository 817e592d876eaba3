"""cache_append_ and cache_evict_ over paged rows: C++ CPU kernels, Triton kernels (interpreter
on CPU, GPU when present) and fake kernels against squeeze_ops.reference; the eviction rule pinned
on small cases."""
import pytest
import torch
from paged_cases import POLICIES, assert_same_cache, expect_error, kept_positions, random_cache, rows
from paged_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

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


def rows_of(B, Hkv, budgets):
    return torch.tensor(budgets, **I32).view(B, Hkv) if not isinstance(budgets, torch.Tensor) else budgets


# ---- cache_append_ ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_append_matches_reference(dtype, page_size):
    cache = random_cache(4, 3, [0, 1, [10, 3, 0], 5], 64, page_size, dtype=dtype)
    token = new_tokens(4, 3, 64, [0, 1, 10, 5], dtype)
    got, want = cache.clone(), cache.clone()
    torch.ops.squeeze.cache_append_(*got, *token)
    reference.cache_append_(*want, *token)
    assert_same_cache(got, want)
    assert got[5].tolist() == [[1] * 3, [2] * 3, [11, 4, 1], [6] * 3]


def test_append_triton_matches_reference():
    cache = random_cache(3, 2, [0, 8, [4, 1]], 64, 3, device=TRITON_DEVICE)
    token = new_tokens(3, 2, 64, [7, 8, 4], device=TRITON_DEVICE)
    got, want = cache.clone(), cache.clone()
    tk.cache_append_(*got, *token)
    reference.cache_append_(*want, *token)
    assert_same_cache(got, want)


def test_append_to_no_page_is_dropped():
    """A row whose slot lies on no page (-1: e.g. a padding row) stores nothing; its length still
    grows. Only the other row's new slot changes in the pool."""
    for run, device in ((torch.ops.squeeze.cache_append_, "cpu"), (tk.cache_append_, TRITON_DEVICE)):
        cache = random_cache(2, 1, [0, 3], 64, 4, device=device)
        cache[4][0] = -1
        before = cache.clone()
        run(*cache, *new_tokens(2, 1, 64, [0, 3], device=device))
        assert cache[5].tolist() == [[1], [4]]
        changed = (cache[2] != before[2]).nonzero().tolist()
        assert changed == [[int(cache[4][1, 0, 0]), 3]] and rows(cache)[(1, 0)][0].tolist()[-1] == 3


def test_append_opcheck():
    cache = random_cache(2, 2, [0, 3], 64, 4)
    torch.library.opcheck(torch.ops.squeeze.cache_append_.default, (*cache, *new_tokens(2, 2, 64, [0, 3])))


# ---- the eviction rule, pinned on small hand-made cases ----

def single_row_cache(positions, scores, page_size=3, extra=2):
    """One sequence, one KV head, D 64, holding `positions` with `scores` in slot order."""
    n = len(positions)
    cache = random_cache(1, 1, [n + extra], 64, page_size)
    cache[5][0, 0] = n
    row = reference.Row(cache.pool, cache[4][0, 0].tolist())
    for j, (p, s) in enumerate(zip(positions, scores)):
        row.write(j, pos=p, score=s)
    for j in range(n, row.capacity):
        row.write(j, pos=-1, score=0.0)
    return cache


def evict_to(cache, budget, policy, sinks, recent_ratio, run=torch.ops.squeeze.cache_evict_):
    run(*cache, torch.tensor([[budget]], **I32, device=cache[0].device), policy, sinks, recent_ratio)
    return sorted(kept_positions(cache)[(0, 0)])


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
    for run, device in ((torch.ops.squeeze.cache_evict_, "cpu"), (tk.cache_evict_, TRITON_DEVICE)):
        cache = single_row_cache(positions, [score_of[p] for p in positions]).to(device)
        assert evict_to(cache, 4, policy, sinks, recent_ratio, run) == kept


def test_nan_scores_evict_first():
    """NaN counts as -inf: a NaN-scored token is the first h2o victim, on every path."""
    positions = [0, 1, 2, 3, 4, 5]
    scores = [0.5, float("nan"), 0.1, 0.9, float("nan"), 0.7]
    for run, device in ((torch.ops.squeeze.cache_evict_, "cpu"), (tk.cache_evict_, TRITON_DEVICE),
                        (reference.cache_evict_, "cpu")):
        cache = single_row_cache(positions, scores).to(device)
        assert evict_to(cache, 3, "h2o", 0, 0.0, run) == [0, 3, 5]  # NaNs (1, 4) then the lowest (2) go


def test_h2o_ties_evict_the_oldest():
    """Equal scores: the smallest position outside the protected set goes first."""
    positions = [4, 9, 0, 7, 2, 5, 1, 8, 3, 6]
    cache = single_row_cache(positions, [0.5] * 10)
    # sinks 1, R = floor(5 * 0.4) = 2 newest (8, 9); among 1..7 (all tied) the oldest go: 1, 2, 3, 4, 5.
    assert evict_to(cache, 5, "h2o", 1, 0.4) == [0, 6, 7, 8, 9]


def test_fallback_when_everything_is_protected():
    # sinks 3 cover 0..2 and R = floor(2 * 1.0) = 2 covers the newest: no regular candidate is left.
    # Fallback: the oldest non-sink first (3, then 4, ...), then the oldest sinks.
    cache = single_row_cache([4, 0, 3, 1, 2], [0.1, 0.9, 0.2, 0.8, 0.3])
    assert evict_to(cache.clone(), 2, "h2o", 3, 1.0) == [1, 2]
    assert evict_to(cache.clone(), 4, "h2o", 3, 1.0) == [0, 1, 2, 4]
    assert evict_to(cache.clone(), 1, "streaming", 5, 0.5) == [4]


def test_eviction_moves_the_last_slot_into_the_victim():
    cache = single_row_cache([3, 0, 2, 1], [0.4, 0.3, 0.2, 0.1], page_size=2)
    k_last = rows(cache)[(0, 0)][1][3].clone()
    torch.ops.squeeze.cache_evict_(*cache, torch.tensor([[3]], **I32), "window", 0, 0.5)
    assert cache[5].tolist() == [[3]]
    row = reference.Row(cache.pool, cache[4][0, 0].tolist())
    assert [row.read(j)[2] for j in range(6)] == [3, 1, 2, -1, -1, -1]  # position 0 (slot 1) evicted, slot 3 in
    assert [row.read(j)[3] for j in range(6)] == pytest.approx([0.4, 0.1, 0.2, 0, 0, 0])
    assert torch.equal(row.read(1)[0], k_last)


# ---- cache_evict_ against the reference ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sinks,recent_ratio", [(0, 0.5), (4, 0.3), (2, 1.0)])
def test_evict_matches_reference(policy, sinks, recent_ratio, dtype):
    lens = [0, 1, [36, 30, 36], 20, [9, 0, 9], 30]
    cache = random_cache(6, 3, lens, 64, 5, dtype=dtype, position_gap=3)
    budget = torch.tensor([[0] * 3, [0] * 3, [10, 30, 36], [20] * 3, [12] * 3, [1, 30, 2]], **I32)
    got, want = cache.clone(), cache.clone()
    torch.ops.squeeze.cache_evict_(*got, budget, policy, sinks, recent_ratio)
    reference.cache_evict_(*want, budget, policy, sinks, recent_ratio)
    assert_same_cache(got, want)
    assert got[5].tolist() == [[0] * 3, [0] * 3, [10, 30, 36], [20] * 3, [9, 0, 9], [1, 30, 2]]


@pytest.mark.parametrize("policy", POLICIES)
def test_evict_triton_matches_reference(policy):
    C = 4200  # the victim search scans two blocks
    cache = random_cache(2, 2, [C, 7], 64, 64, device=TRITON_DEVICE)
    budget = torch.tensor([[C - 4, C - 2], [3, 7]], **I32, device=TRITON_DEVICE)
    got, want = cache.clone(), cache.clone()
    tk.cache_evict_(*got, budget, policy, 4, 0.5)
    reference.cache_evict_(*want, budget, policy, 4, 0.5)
    assert_same_cache(got, want)


def test_triton_append_and_evict_stay_in_the_pool_for_any_values(no_value_checks):
    """On the GPU cache_append_ and cache_evict_ check no lens, budget, pos or page id (a host
    sync) unless SQUEEZE_DEBUG=1: lens at or past the capacity or negative, budgets outside
    [0, C], negative positions are clamped, page ids outside the pool are no page, and the
    kernels write nothing outside the pools. The host checks are switched off here as on the GPU."""
    B, Hkv, D = 5, 2, 64
    cache = random_cache(B, Hkv, [0, 7, 6, 1, 7], D, 4, width=2, device=TRITON_DEVICE, spare_pages=0)
    C = cache.capacity
    fences = [fenced(t) for t in cache[:4]]
    pool = [view for view, _ in fences]
    table, lens = cache[4].clone(), cache[5].clone()
    lens.copy_(torch.tensor([[-3, 0], [C, C], [C - 1, 6], [1, 1], [C + 7, 4]], **I32))
    table[3, 0, 0], table[4, 1, 1] = -9, 1 << 20  # no page
    tk.cache_append_(*pool, table, lens, *new_tokens(B, Hkv, D, [-5, 41, 43, 44, 40], device=TRITON_DEVICE))
    assert lens.tolist() == [[1, 1], [C, C], [C, 7], [2, 2], [C + 7, 5]]  # negative: slot 0; no room: nothing
    tk.cache_evict_(*pool, table, lens, torch.tensor([[-2, 0], [0, 1], [2, 2], [1, 1], [C + 3, 9]], **I32,
                                                     device=TRITON_DEVICE), "h2o", 1, 0.5)
    assert lens.tolist() == [[0, 0], [0, 1], [2, 2], [1, 1], [C, 5]]  # budgets clamped into [0, C]
    for _, intact in fences:
        intact()


def test_recent_window_uses_double_precision():
    # R = floor(10 * 0.7) = 7 in double precision protects positions 4..10, so the tied oldest (0)
    # goes; had 0.7 been rounded to float32 first, R = 6 would expose position 4 and its low score.
    positions = list(range(11))
    scores = [0.5] * 4 + [0.0] + [0.5] * 6
    for run, device in ((torch.ops.squeeze.cache_evict_, "cpu"), (tk.cache_evict_, TRITON_DEVICE)):
        cache = single_row_cache(positions, scores).to(device)
        assert evict_to(cache, 10, "h2o", 0, 0.7, run) == list(range(1, 11))


def test_evict_opcheck():
    cache = random_cache(2, 2, [9, 4], 64, 4)
    torch.library.opcheck(torch.ops.squeeze.cache_evict_.default,
                          (*cache, torch.tensor([[5, 4], [4, 4]], **I32), "h2o", 1, 0.5))


def test_wrapper_defaults():
    cache = random_cache(1, 1, [8], 64, 4)
    squeeze_ops.cache_evict_(*cache, 5, policy="streaming")  # sinks default 4
    assert sorted(kept_positions(cache)[(0, 0)]) == [0, 1, 2, 3, 7]


# ---- bad inputs ----

def bad_appends():
    cache = random_cache(2, 2, [2, 4], 64, 3, width=2)  # capacity 6
    token = new_tokens(2, 2, 64, [2, 4])
    full = cache.clone()
    full[5] = torch.tensor([[2, 2], [6, 4]], **I32)
    k, v, pos_pages, score_pages, table, lens = cache
    yield "capacity overflow", (*full, *token), "capacity overflow"
    yield "lens > C", (k, v, pos_pages, score_pages, table, torch.tensor([[2, 2], [7, 4]], **I32), *token), \
        "lens.*exceeds"
    yield "negative pos", (*cache, *token[:2], torch.tensor([-1, 3], **I32)), "pos: expected non-negative"
    yield "k_new dtype", (*cache, token[0].half(), *token[1:]), "k_new: expected dtype"
    yield "v_new shape", (*cache, token[0], token[1][:, :1], token[2]), "v_new: expected shape"
    yield "pos dtype", (*cache, *token[:2], token[2].long()), "pos: expected dtype"
    yield "pos_pages dtype", (k, v, pos_pages.long(), score_pages, table, lens, *token), "pos_pages: expected dtype"
    yield "score_pages dtype", (k, v, pos_pages, score_pages.half(), table, lens, *token), "score_pages: expected dt"
    yield "k_new layout", (*cache, token[0].transpose(1, 2).contiguous().transpose(1, 2), *token[1:]), \
        "k_new: last dim"
    yield "k is v", (k, k, pos_pages, score_pages, table, lens, *token), "k_pages: must not share memory with v_pages"
    yield "expanded pool", (k[:1].expand_as(k), v, pos_pages, score_pages, table, lens, *token), \
        "k_pages: a written tensor must not overlap itself"
    yield "page id", (k, v, pos_pages, score_pages, table.masked_fill(table == table[1, 0, 0], -2), lens, *token), \
        "block_table: expected page ids"


def bad_evictions():
    cache = random_cache(2, 2, [2, 4], 64, 3, width=2)
    budget = torch.tensor([[1, 1], [2, 2]], **I32)
    k, v, pos_pages, score_pages, table, lens = cache
    yield "budget > C", (*cache, torch.tensor([[1, 1], [7, 2]], **I32), "h2o", 0, 0.5), "budget.*exceeds"
    yield "negative budget", (*cache, torch.tensor([[-1, 1], [2, 2]], **I32), "h2o", 0, 0.5), "budget.*non-neg"
    yield "lens > C", (k, v, pos_pages, score_pages, table, torch.tensor([[2, 2], [7, 4]], **I32), budget, "h2o", 0,
                       0.5), "lens.*exceeds"
    yield "unknown policy", (*cache, budget, "lru", 0, 0.5), "policy"
    yield "negative sinks", (*cache, budget, "streaming", -1, 0.5), "sinks"
    yield "recent_ratio", (*cache, budget, "h2o", 0, 1.5), "recent_ratio"
    yield "budget dtype", (*cache, budget.long(), "h2o", 0, 0.5), "budget: expected dtype"
    yield "budget shape", (*cache, budget[:, :1], "h2o", 0, 0.5), "budget: expected shape"
    yield "budget is lens", (*cache, lens, "h2o", 0, 0.5), "lens: must not share memory with budget"
    yield "pos_pages shape", (k, v, pos_pages[:, :2], score_pages, table, lens, budget, "h2o", 0, 0.5), \
        "pos_pages: expected shape"
    yield "pool rank", (k[0], v, pos_pages, score_pages, table, lens, budget, "h2o", 0, 0.5), "k_pages: expected a 3-d"


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
    cache = random_cache(5, 8, [0, 1, 699, 300, 650], 128, 16, dtype=torch.bfloat16, device="cuda", position_gap=2)
    token = new_tokens(5, 8, 128, [0, 2, 1400, 600, 1300], torch.bfloat16, "cuda")
    budget = torch.tensor([0, 1, 500, 290, 651], **I32, device="cuda")[:, None].expand(5, 8).contiguous()
    got, want = cache.clone(), cache.to("cpu")
    torch.ops.squeeze.cache_append_(*got, *token)
    torch.ops.squeeze.cache_evict_(*got, budget, policy, 4, 0.5)
    reference.cache_append_(*want, *(t.cpu() for t in token))
    reference.cache_evict_(*want, budget.cpu(), policy, 4, 0.5)
    assert_same_cache(got, want)


@pytest.mark.cuda
def test_cuda_append_to_a_full_row_writes_nothing():
    """Without SQUEEZE_DEBUG the GPU path does not check lens; a full row drops the token."""
    cache = random_cache(2, 2, [7, 7], 64, 4, width=2, device="cuda")
    cache[5].copy_(torch.tensor([[8, 9], [8, 8]], **I32))
    before = cache.clone()
    tk.cache_append_(*cache, *new_tokens(2, 2, 64, [50, 51], device="cuda"))
    for t, b in zip(cache[:4], before[:4]):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)
