"""compress_kv_ into paged rows: the C++ CPU kernel and the Triton kernel (interpreter on CPU
tensors here, the GPU when there is one) against the reference; the reference against
step-by-step eviction; pooled selection scores against torch's pooling; nested kept sets (the
prefill's staging); opcheck and bad inputs."""
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from paged_cases import Cache, assert_same_cache, random_cache, rows
from paged_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import _checks, reference
from squeeze_ops.triton_kernels import compress_kv as triton_compress
from squeeze_ops.vocabulary import POLICIES


def evict_step_by_step(n, budget, policy, sinks, recent_ratio, scores):
    """The eviction rule of the layer cache applied one token at a time to the full prompt
    (scores fixed): the positions that survive, ascending."""
    held = list(range(n))
    recent = int(budget * recent_ratio)
    while len(held) > budget:
        newest = max(held)
        if policy == "window":
            victim = min(held)
        else:
            non_sinks = [p for p in held if p >= sinks]
            if policy == "h2o":
                candidates = [p for p in non_sinks if p <= newest - recent]
                victim = min(candidates, key=lambda p: (scores[p], p)) if candidates else None
            else:
                victim = min(non_sinks) if non_sinks else None
            if victim is None:
                victim = min(non_sinks) if non_sinks else min(held)
        held.remove(victim)
    return held


def test_reference_equals_step_by_step_eviction():
    rng = random.Random(0)
    checked = 0
    for n, budget, sinks, ratio in itertools.product([0, 1, 2, 5, 13, 30], [0, 1, 2, 3, 6, 12, 29, 40],
                                                     [0, 1, 4, 7], [0.0, 0.3, 0.5, 0.7, 1.0]):
        # Few distinct values, so that ties are common.
        scores = torch.tensor([rng.choice([0.0, 0.25, 0.5, 1.0, 2.0]) for _ in range(n)])
        for policy in POLICIES:
            want = evict_step_by_step(n, budget, policy, sinks, ratio, scores.tolist())
            got = reference.kept_positions(n, budget, policy, sinks, ratio, scores).tolist()
            assert got == want, (n, budget, policy, sinks, ratio, scores.tolist())
            checked += 1
    assert checked == 6 * 8 * 4 * 5 * 3


def test_pooled_scores_are_torch_pooling_inside_the_sequence():
    """max pooling is max_pool1d padded with -inf; avg pooling the mean over the positions inside
    the sequence (avg_pool1d without the padding counted)."""
    col = torch.rand(23)
    for size in (1, 3, 5, 7):
        r = size // 2
        maxed = F.max_pool1d(col[None, None].double(), size, 1, r)[0, 0]
        torch.testing.assert_close(reference.pooled_scores(col, size, "max"), maxed)
        mean = F.avg_pool1d(col[None, None].double(), size, 1, r, count_include_pad=False)[0, 0]
        torch.testing.assert_close(reference.pooled_scores(col, size, "avg"), mean)
    nan = torch.tensor([0.5, float("nan"), 0.25])
    assert reference.pooled_scores(nan, 1, "max").tolist() == [0.5, float("-inf"), 0.25]


def make_prompt(lengths, Hkv, D, dtype=torch.float32, device="cpu", ties=False):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    k = torch.randn(T, Hkv, D, device=device).to(dtype)
    v = torch.randn(T, Hkv, D, device=device).to(dtype)
    scores = torch.rand(T, Hkv, device=device)
    if ties:
        scores = (scores * 4).floor() / 4
    return k, v, scores, cu


def empty_rows(B, Hkv, C, D, page_size=4, dtype=torch.float32, device="cpu"):
    """Rows of capacity >= C in a shuffled pool, every slot poisoned (NaN K/V, position -9, score
    NaN, lens -7), so that unwritten (or wrongly written) ones show."""
    cache = random_cache(B, Hkv, [0] * B, D, page_size, width=-(-C // page_size), dtype=dtype, device=device,
                         reserve=C - 1, seed=0)
    cache[2].fill_(-9)
    cache[3].fill_(float("nan"))
    cache[5].fill_(-7)
    return cache


def per_row(budget, B, Hkv, device):
    b = torch.as_tensor(budget, dtype=torch.int32)
    return (b[:, None].expand(B, Hkv) if b.dim() == 1 else b).contiguous().to(device)


def compress(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C, pool=(1, "max"), page_size=4):
    B, Hkv = cu.numel() - 1, k.shape[1]
    cache = empty_rows(B, Hkv, C, k.shape[2], page_size, k.dtype, k.device)
    fn(k, v, scores, cu, per_row(budget, B, Hkv, k.device), policy, sinks, recent_ratio, *pool, *cache)
    return cache


def check_against_reference(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C, pool=(1, "max"),
                            page_size=4):
    want = compress(reference.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(), budget, policy, sinks,
                    recent_ratio, C, pool, page_size)
    got = compress(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C, pool, page_size)
    assert_same_cache(got, want, score_tol=1e-6 if pool[1] == "avg" else 0.0)
    return got


LENGTHS = [7, 0, 1, 40, 23, 64]
BUDGET_SETS = {  # per sequence of LENGTHS; capacity 48
    "tiny": [0, 1, 1, 2, 3, 1],
    "small": [3, 5, 2, 9, 6, 20],
    "nothing evicted": [7, 0, 1, 40, 23, 48],
    "some fit": [10, 3, 48, 41, 4, 47],
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budgets", list(BUDGET_SETS), ids=list(BUDGET_SETS))
@pytest.mark.parametrize("sinks,recent_ratio", [(4, 0.5), (0, 0.0), (2, 1.0), (5, 0.3)])
def test_cpu_kernel_matches_reference(policy, budgets, sinks, recent_ratio):
    k, v, scores, cu = make_prompt(LENGTHS, 3, 16, ties=True)
    check_against_reference(torch.ops.squeeze.compress_kv_, k, v, scores, cu, BUDGET_SETS[budgets], policy, sinks,
                            recent_ratio, 48)


@pytest.mark.parametrize("pool", [(3, "max"), (5, "avg"), (7, "max")])
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_cpu_kernel_pooled_scores_and_page_sizes(pool, page_size):
    k, v, scores, cu = make_prompt(LENGTHS, 2, 16)
    budget = torch.tensor([[3, 7], [0, 0], [1, 0], [9, 30], [6, 12], [20, 5]], dtype=torch.int32)
    check_against_reference(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, "h2o", 1, 0.25, 48, pool,
                            page_size)


def test_pooling_keeps_neighbours_together():
    """A block of moderate scores beats an isolated spike once pooled (the digits of a number)."""
    k, v, _, cu = make_prompt([20], 1, 16)
    scores = torch.full((20, 1), 0.01)
    scores[5] = 1.0  # a lone spike
    scores[12:15] = 0.6  # a block
    kept = {}
    for pool in ((1, "max"), (3, "avg")):
        cache = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, [3], "h2o", 0, 0.0, 8, pool)
        kept[pool] = sorted(rows(cache)[(0, 0)][0].tolist())
    assert kept[(1, "max")] == [5, 13, 14] and kept[(3, "avg")] == [12, 13, 14]  # ties: the later token


@pytest.mark.parametrize("policy", ["window", "streaming"])
def test_without_scores(policy):
    # window / streaming need no scores: the cache scores are then 0.
    k, v, scores, cu = make_prompt([30, 12], 2, 8)
    got = check_against_reference(torch.ops.squeeze.compress_kv_, k, v, scores[:0], cu, [10, 12], policy, 4, 0.5, 16)
    assert all(not held[3].any() for held in rows(got).values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_half_precision_and_strided(dtype):
    k, v, scores, cu = make_prompt([50, 9], 4, 64, dtype)
    kv = torch.stack([k, v], 2)  # k, v as strided views of one [T, Hkv, 2, D] tensor
    check_against_reference(torch.ops.squeeze.compress_kv_, kv[:, :, 0], kv[:, :, 1], scores, cu, [20, 9], "h2o", 4,
                            0.5, 24)


def test_kept_set_is_step_by_step_eviction():
    # The kernel's slots hold exactly the positions that eviction one token at a time keeps.
    lengths, Hkv = [1, 17, 33, 8, 60], 2
    k, v, scores, cu = make_prompt(lengths, Hkv, 8, ties=True)
    rng = random.Random(1)
    for policy, sinks, ratio in itertools.product(POLICIES, [0, 3, 6], [0.0, 0.5, 1.0]):
        budget = torch.tensor([[rng.randint(0, 40) for _ in range(Hkv)] for _ in lengths], dtype=torch.int32)
        cache = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, policy, sinks, ratio, 40)
        held = rows(cache)
        for b, (start, n) in enumerate(zip(cu.tolist(), lengths)):
            for g in range(Hkv):
                want = evict_step_by_step(n, int(budget[b, g]), policy, sinks, ratio, scores[start:start + n, g].tolist())
                assert held[(b, g)][0].tolist() == want


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("pool", [(1, "max"), (5, "avg")])
def test_kept_sets_are_nested_across_budgets(policy, pool):
    """Compressing to a larger budget U and then evicting to b keeps exactly what compressing to b
    keeps (the same slots' positions, K/V and scores as a set): a prefill may stage a layer at the
    largest budget an allocator can give and shrink it once the plan is known."""
    lengths, Hkv = [1, 17, 33, 8, 60, 45], 2
    k, v, scores, cu = make_prompt(lengths, Hkv, 8, ties=True)
    rng = random.Random(2)
    for sinks, ratio in itertools.product([0, 2, 6], [0.0, 0.3, 0.5, 1.0]):
        small = torch.tensor([[rng.randint(0, 40) for _ in range(Hkv)] for _ in lengths], dtype=torch.int32)
        large = (small + torch.randint(0, 20, small.shape, dtype=torch.int32)).clamp_max(47)
        staged = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, large, policy, sinks, ratio, 48, pool)
        torch.ops.squeeze.cache_evict_(*staged, small, policy, sinks, ratio)
        direct = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, small, policy, sinks, ratio, 48, pool)
        got, want = rows(staged), rows(direct)
        for key in want:
            assert sorted(got[key][0].tolist()) == want[key][0].tolist(), (key, sinks, ratio)
            order = got[key][0].argsort()
            torch.testing.assert_close(got[key][1][order], want[key][1])
            torch.testing.assert_close(got[key][3][order], want[key][3])


def test_public_wrapper_defaults():
    k, v, scores, cu = make_prompt([12, 30], 2, 16)
    cache = empty_rows(2, 2, 10, 16)
    squeeze_ops.compress_kv_(k, v, None, cu, 8, "streaming", *cache)
    held = rows(cache)
    assert cache[5].tolist() == [[8, 8], [8, 8]]
    assert held[(0, 0)][0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # 4 sinks by default
    assert torch.equal(held[(1, 1)][1][7].float(), k[12 + 29, 1])
    want = empty_rows(2, 2, 10, 16)
    squeeze_ops.compress_kv_(k, v, scores, cu, torch.tensor([[5, 5], [9, 9]], dtype=torch.int32), "h2o", *cache)
    reference.compress_kv_(k, v, scores, cu, torch.tensor([[5, 5], [9, 9]]), "h2o", 0, 0.5, 1, "max", *want)
    assert_same_cache(cache, want)


def test_opcheck():
    k, v, scores, cu = make_prompt([12, 0, 30], 2, 16)
    cache = empty_rows(3, 2, 16, 16)
    budget = per_row([5, 3, 16], 3, 2, "cpu")
    torch.library.opcheck(torch.ops.squeeze.compress_kv_.default,
                          (k, v, scores, cu, budget, "h2o", 2, 0.5, 3, "avg", *cache))


# ---- the Triton launcher, called directly ----

TRITON_CASES = [  # lengths, budgets, capacity, policy, sinks, recent_ratio, scores, pool, page size
    ([7, 0, 1, 40], [3, 2, 1, 40], 40, "window", 4, 0.5, True, (1, "max"), 4),
    ([7, 0, 1, 40], [5, 0, 1, 9], 12, "streaming", 4, 0.5, False, (1, "max"), 1),
    ([5, 90, 1], [2, 30, 4], 35, "h2o", 4, 0.5, True, (5, "avg"), 16),
    ([20, 13], [[1, 4], [13, 2]], 13, "h2o", 2, 0.7, True, (3, "max"), 3),
]


@pytest.mark.parametrize("lengths,budgets,C,policy,sinks,recent_ratio,with_scores,pool,page_size", TRITON_CASES)
def test_triton_launcher_matches_reference(lengths, budgets, C, policy, sinks, recent_ratio, with_scores, pool,
                                           page_size):
    k, v, scores, cu = make_prompt(lengths, 2, 16, device=TRITON_DEVICE, ties=True)
    if not with_scores:
        scores = scores[:0]
    check_against_reference(triton_compress.compress_kv_, k, v, scores, cu, budgets, policy, sinks, recent_ratio, C,
                            pool, page_size)


def test_triton_launcher_orders_scores_like_floats():
    # Negative scores, -0.0 next to +0.0 (equal: the later token wins), large values and NaN (-inf).
    k, v, _, cu = make_prompt([12], 1, 16, device=TRITON_DEVICE)
    scores = torch.tensor([-3.0, 0.0, -0.0, 5e30, -1e-30, float("nan"), -0.0, 0.0, 1e-30, -7.0, 0.5, 0.5],
                          device=TRITON_DEVICE)[:, None]
    for run in (triton_compress.compress_kv_, torch.ops.squeeze.compress_kv_):
        check_against_reference(run, k, v, scores, cu, [8], "h2o", 0, 0.25, 8)
        check_against_reference(run, k, v, scores, cu, [10], "h2o", 0, 0.0, 12)  # the NaN token kept last


def test_triton_launcher_clamps_budget_to_capacity():
    k, v, scores, cu = make_prompt([9, 30], 2, 16, device=TRITON_DEVICE)
    budget = torch.tensor([4, 50], dtype=torch.int32, device=TRITON_DEVICE)
    with _checks.forced_value_checks(False):
        got = compress(triton_compress.compress_kv_, k, v, scores, cu, budget, "h2o", 1, 0.5, 12)
    want = compress(reference.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(), [4, 12], "h2o", 1, 0.5, 12)
    assert_same_cache(got, want)
    with pytest.raises(ValueError, match="^budget:"):
        compress(triton_compress.compress_kv_, k, v, scores, cu, budget, "h2o", 1, 0.5, 12)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cu", [[0, 25, 3, 20], [-7, 5, 40, 20], [0, 20, 20, 100], [30, 2, -1, 0]])
def test_triton_launcher_stays_in_bounds_for_any_cu_seqlens_and_page_ids(no_value_checks, cu, policy):
    """Without value checks the launcher reads no cu_seqlens or page id on the host (a GPU sync):
    offsets past T, negative or decreasing ones are clamped inside the kernel, page ids outside
    the pool are not followed; it reads nothing outside k, v and scores (NaN fences around them
    would reach the rows) and writes nothing outside the pool and lens."""
    k, v, scores, _ = make_prompt([20], 2, 16, device=TRITON_DEVICE)
    (k, _), (v, _), (scores, _) = (fenced(t, float("nan")) for t in (k, v, scores))
    cache = empty_rows(3, 2, 8, 16, device=TRITON_DEVICE)
    cache[4][2, 1, 1] = 99
    fences = [fenced(t) for t in cache]
    views = Cache(view for view, _ in fences)
    cu = torch.tensor(cu, dtype=torch.int32, device=TRITON_DEVICE)
    budget = per_row([4, 8, 5], 3, 2, TRITON_DEVICE)
    triton_compress.compress_kv_(k, v, scores, cu, budget, policy, 1, 0.5, 3, "max", *views)
    for _, intact in fences:
        intact()
    lens = views[5]
    assert bool(((lens >= 0) & (lens <= budget)).all())
    for key, (pos, keys, values, held_scores) in rows(views).items():
        if key != (2, 1):  # its second page is no page: read as zeros, not NaN
            assert not keys.isnan().any() and not values.isnan().any() and not held_scores.isnan().any(), key


# ---- bad inputs ----

def bad_inputs():
    """(name, args, message start) for the schema's arguments."""
    k, v, scores, cu = make_prompt([6, 10], 2, 16)
    cache = empty_rows(2, 2, 8, 16)
    budget = per_row([4, 8], 2, 2, "cpu")
    names = ("k_pages", "v_pages", "pos_pages", "score_pages", "block_table", "lens")
    ok = dict(k=k, v=v, scores=scores, cu_seqlens=cu, budget=budget, policy="h2o", sinks=2, recent_ratio=0.5,
              pool_size=1, pool_mode="max", **dict(zip(names, cache)))
    i32 = dict(dtype=torch.int32)

    def replace(**changes):
        return tuple({**ok, **changes}.values())

    return [
        ("policy", replace(policy="lru"), "^policy:"),
        ("h2o without scores", replace(scores=scores[:0]), "^scores: policy 'h2o'"),
        ("scores shape", replace(scores=scores[:, :1]), "^scores:"),
        ("scores dtype", replace(scores=scores.double()), "^scores:"),
        ("sinks", replace(sinks=-1), "^sinks:"),
        ("recent_ratio", replace(recent_ratio=1.5), "^recent_ratio:"),
        ("pool size", replace(pool_size=4), "^pool_size:"),
        ("pool mode", replace(pool_mode="sum"), "^pool_mode:"),
        ("k rank", replace(k=k[0]), "^k:"),
        ("v dtype", replace(v=v.half()), "^v:"),
        ("v shape", replace(v=v[:, :1]), "^v:"),
        ("cu dtype", replace(cu_seqlens=cu.long()), "^cu_seqlens:"),
        ("cu layout", replace(cu_seqlens=torch.tensor([0, 9, 6, 9, 16, 9], **i32)[::2]), "^cu_seqlens:"),
        ("budget dtype", replace(budget=budget.long()), "^budget:"),
        ("budget shape", replace(budget=budget[:1]), "^budget:"),
        ("k_pages dtype", replace(k_pages=cache[0].half()), "^k_pages:"),
        ("v_pages shape", replace(v_pages=cache[1][:, :1]), "^v_pages:"),
        ("k_pages layout", replace(k_pages=cache[0].transpose(1, 2).contiguous().transpose(1, 2)), "^k_pages: last"),
        ("lens dtype", replace(lens=cache[5].long()), "^lens:"),
        ("table shape", replace(block_table=cache[4][:1]), "^block_table:"),
        ("pos_pages shape", replace(pos_pages=cache[2][:, :3]), "^pos_pages:"),
        ("score_pages dtype", replace(score_pages=cache[3].half()), "^score_pages:"),
        ("k_pages aliases v_pages", replace(v_pages=cache[0]), "^k_pages: must not share memory with v_pages"),
        ("expanded lens", replace(lens=torch.zeros(1, 1, **i32).expand(2, 2)), "^lens: expected a contiguous"),
        ("budget > capacity", replace(budget=per_row([4, 9], 2, 2, "cpu")), "^budget:"),
        ("budget < 0", replace(budget=per_row([-1, 8], 2, 2, "cpu")), "^budget:"),
        ("cu total", replace(cu_seqlens=torch.tensor([0, 6, 15], **i32)), "^cu_seqlens:"),
        ("cu order", replace(cu_seqlens=torch.tensor([0, 7, 6], **i32)), "^cu_seqlens:"),
        ("page id", replace(block_table=cache[4].masked_fill(cache[4] == cache[4][0, 0, 0], 1000)), "^block_table:"),
    ]


def assert_rejected(fn, args, message):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((RuntimeError, ValueError), match=message):
        fn(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.nan_to_num(5.0), b.nan_to_num(5.0))


@pytest.mark.parametrize("run", [torch.ops.squeeze.compress_kv_, triton_compress.compress_kv_], ids=["cpu", "triton"])
@pytest.mark.parametrize("name,args,message", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_bad_inputs_raise_and_leave_inputs_untouched(run, name, args, message):
    assert_rejected(run, args, message)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_kernel(policy, dtype):
    # A ragged batch up to 8k tokens, ties in the scores, budgets tiny to all.
    lengths = [8192, 1, 0, 3000, 517]
    k, v, scores, cu = make_prompt(lengths, 8, 128, dtype, "cuda", ties=True)
    budget = [2048, 1, 5, 3000, 20]
    for pool in ((1, "max"), (7, "avg")):
        got = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, policy, 4, 0.5, 3100, pool, 16)
        want = compress(torch.ops.squeeze.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(), budget, policy, 4,
                        0.5, 3100, pool, 16)
        assert_same_cache(got, want, score_tol=1e-6)


@pytest.mark.cuda
def test_cuda_graph_capture():
    k, v, scores, cu = make_prompt([300, 41], 2, 64, torch.float16, "cuda")
    budget = per_row([64, 64], 2, 2, "cuda")
    want = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, "h2o", 4, 0.5, 80)
    cache = empty_rows(2, 2, 80, 64, dtype=torch.float16, device="cuda")
    cache[4].copy_(want[4])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.squeeze.compress_kv_(k, v, scores, cu, budget, "h2o", 4, 0.5, 1, "max", *cache)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_cache(cache, want)
