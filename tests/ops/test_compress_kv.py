"""compress_kv_: the C++ CPU kernel and the Triton kernel (interpreter on CPU tensors here,
the GPU when there is one) against the reference; the reference against step-by-step
eviction; opcheck and bad inputs."""
import itertools
import random

import pytest
import torch

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import _checks, reference
from squeeze_ops.triton_kernels import compress_kv as triton_compress

POLICIES = ["window", "streaming", "h2o"]


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


def make_prompt(lengths, Hkv, D, dtype=torch.float32, device="cpu", ties=False):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    k = torch.randn(T, Hkv, D, device=device).to(dtype)
    v = torch.randn(T, Hkv, D, device=device).to(dtype)
    scores = torch.rand(T, Hkv, device=device)
    if ties:
        scores = (scores * 4).floor() / 4
    return k, v, scores, cu


def poisoned_cache(B, Hkv, C, D, dtype, device):
    """A cache whose every element is a sentinel, so unwritten (or wrongly written) ones show."""
    return dict(
        k_cache=torch.full((B, Hkv, C, D), float("nan"), device=device).to(dtype),
        v_cache=torch.full((B, Hkv, C, D), float("nan"), device=device).to(dtype),
        lens=torch.full((B,), -7, dtype=torch.int32, device=device),
        slot_pos=torch.full((B, Hkv, C), -9, dtype=torch.int32, device=device),
        cache_scores=torch.full((B, Hkv, C), float("nan"), device=device),
    )


def compress(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C):
    cache = poisoned_cache(cu.numel() - 1, k.shape[1], C, k.shape[2], k.dtype, k.device)
    fn(k, v, scores, cu, budget, policy, sinks, recent_ratio, *cache.values())
    return cache


def assert_same_cache(got, want):
    assert torch.equal(got["lens"].cpu(), want["lens"])
    assert torch.equal(got["slot_pos"].cpu(), want["slot_pos"])
    assert torch.equal(got["cache_scores"].cpu(), want["cache_scores"])
    # K/V: the kept rows bit for bit, the rows from lens on left untouched (still NaN).
    for name in ("k_cache", "v_cache"):
        assert torch.equal(got[name].cpu().float().nan_to_num(123.0), want[name].float().nan_to_num(123.0))


def check_against_reference(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C):
    budget = torch.tensor(budget, dtype=torch.int32, device=k.device)
    want = compress(reference.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(), budget.cpu(), policy, sinks,
                    recent_ratio, C)
    got = compress(fn, k, v, scores, cu, budget, policy, sinks, recent_ratio, C)
    assert_same_cache(got, want)
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


@pytest.mark.parametrize("policy", ["window", "streaming"])
def test_without_scores(policy):
    # window / streaming need no scores: the cache scores are then 0.
    k, v, scores, cu = make_prompt([30, 12], 2, 8)
    empty = scores[:0]
    got = check_against_reference(torch.ops.squeeze.compress_kv_, k, v, empty, cu, [10, 12], policy, 4, 0.5, 16)
    assert torch.equal(got["cache_scores"], torch.zeros(2, 2, 16))


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
        budget = [rng.randint(0, 40) for _ in lengths]
        cache = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, torch.tensor(budget, dtype=torch.int32),
                         policy, sinks, ratio, 40)
        for b, (start, n) in enumerate(zip(cu.tolist(), lengths)):
            for g in range(Hkv):
                want = evict_step_by_step(n, budget[b], policy, sinks, ratio, scores[start:start + n, g].tolist())
                held = cache["slot_pos"][b, g, : cache["lens"][b]].tolist()
                assert held == want


def test_public_wrappers():
    k, v, scores, cu = make_prompt([12, 30], 2, 16)
    k_cache, v_cache, lens, slot_pos, cache_scores = squeeze_ops.compress_kv(k, v, None, cu, 8, "streaming", 10)
    assert lens.tolist() == [8, 8]
    assert slot_pos[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, -1, -1]  # 4 sinks by default
    assert torch.equal(k_cache[1, 1, 7], k[12 + 29, 1])
    assert not cache_scores.any()
    cache = poisoned_cache(2, 2, 10, 16, torch.float32, "cpu")
    squeeze_ops.compress_kv_(k, v, scores, cu, torch.tensor([5, 9], dtype=torch.int32), "h2o", *cache.values())
    want = compress(reference.compress_kv_, k, v, scores, cu, torch.tensor([5, 9]), "h2o", 0, 0.5, 10)
    assert_same_cache(cache, want)


def test_opcheck():
    k, v, scores, cu = make_prompt([12, 0, 30], 2, 16)
    cache = poisoned_cache(3, 2, 16, 16, torch.float32, "cpu")
    budget = torch.tensor([5, 3, 16], dtype=torch.int32)
    torch.library.opcheck(torch.ops.squeeze.compress_kv_.default,
                          (k, v, scores, cu, budget, "h2o", 2, 0.5, *cache.values()))


# ---- the Triton launcher, called directly ----

TRITON_CASES = [  # lengths, budgets, capacity, policy, sinks, recent_ratio, scores
    ([7, 0, 1, 40], [3, 2, 1, 40], 40, "window", 4, 0.5, True),
    ([7, 0, 1, 40], [5, 0, 1, 9], 12, "streaming", 4, 0.5, False),
    ([5, 90, 1], [2, 30, 4], 35, "h2o", 4, 0.5, True),
    ([20, 13], [1, 13], 13, "h2o", 2, 0.7, True),
]


@pytest.mark.parametrize("lengths,budgets,C,policy,sinks,recent_ratio,with_scores", TRITON_CASES)
def test_triton_launcher_matches_reference(lengths, budgets, C, policy, sinks, recent_ratio, with_scores):
    k, v, scores, cu = make_prompt(lengths, 2, 16, device=TRITON_DEVICE, ties=True)
    if not with_scores:
        scores = scores[:0]
    check_against_reference(triton_compress.compress_kv_, k, v, scores, cu, budgets, policy, sinks, recent_ratio, C)


def test_triton_launcher_orders_scores_like_floats():
    # Negative scores, -0.0 next to +0.0 (equal: the later token wins) and large values.
    k, v, _, cu = make_prompt([12], 1, 16, device=TRITON_DEVICE)
    scores = torch.tensor([-3.0, 0.0, -0.0, 5e30, -1e-30, 2.0, -0.0, 0.0, 1e-30, -7.0, 0.5, 0.5],
                          device=TRITON_DEVICE)[:, None]
    check_against_reference(triton_compress.compress_kv_, k, v, scores, cu, [8], "h2o", 0, 0.25, 8)


def test_triton_launcher_clamps_budget_to_capacity():
    k, v, scores, cu = make_prompt([9, 30], 2, 16, device=TRITON_DEVICE)
    budget = torch.tensor([4, 50], dtype=torch.int32, device=TRITON_DEVICE)
    with _checks.forced_value_checks(False):
        got = compress(triton_compress.compress_kv_, k, v, scores, cu, budget, "h2o", 1, 0.5, 12)
    want = compress(reference.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(), torch.tensor([4, 12]), "h2o",
                    1, 0.5, 12)
    assert_same_cache(got, want)
    with pytest.raises(ValueError, match="^budget:"):
        compress(triton_compress.compress_kv_, k, v, scores, cu, budget, "h2o", 1, 0.5, 12)


@pytest.mark.parametrize("policy", ["window", "streaming", "h2o"])
@pytest.mark.parametrize("cu", [[0, 25, 3, 20], [-7, 5, 40, 20], [0, 20, 20, 100], [30, 2, -1, 0]])
def test_triton_launcher_stays_in_bounds_for_any_cu_seqlens(no_value_checks, cu, policy):
    """Without SQUEEZE_DEBUG the launcher reads no cu_seqlens value on the host (a GPU sync):
    offsets past T, negative or decreasing ones are clamped inside the kernel, which reads
    nothing outside k, v and scores (NaN fences around them would reach the cache) and writes
    nothing outside the cache."""
    k, v, scores, _ = make_prompt([20], 2, 16, device=TRITON_DEVICE)
    (k, _), (v, _), (scores, _) = (fenced(t, float("nan")) for t in (k, v, scores))
    cache = {name: fenced(t) for name, t in poisoned_cache(3, 2, 8, 16, torch.float32, TRITON_DEVICE).items()}
    cu = torch.tensor(cu, dtype=torch.int32, device=TRITON_DEVICE)
    budget = torch.tensor([4, 8, 5], dtype=torch.int32, device=TRITON_DEVICE)
    triton_compress.compress_kv_(k, v, scores, cu, budget, policy, 1, 0.5, *(view for view, _ in cache.values()))
    for _, intact in cache.values():
        intact()
    lens = cache["lens"][0]
    assert bool(((lens >= 0) & (lens <= budget)).all())
    for name in ("k_cache", "v_cache", "cache_scores"):
        kept = torch.arange(8, device=TRITON_DEVICE) < lens[:, None]  # [B, C]
        assert not cache[name][0].transpose(0, 1)[:, kept].isnan().any(), name


# ---- bad inputs ----

def bad_inputs():
    """(name, args, message start, value check) for the schema's arguments."""
    k, v, scores, cu = make_prompt([6, 10], 2, 16)
    cache = poisoned_cache(2, 2, 8, 16, torch.float32, "cpu")
    budget = torch.tensor([4, 8], dtype=torch.int32)
    ok = dict(k=k, v=v, scores=scores, cu_seqlens=cu, budget=budget, policy="h2o", sinks=2, recent_ratio=0.5,
              **cache)

    def replace(**changes):
        return tuple({**ok, **changes}.values())

    return [
        ("policy", replace(policy="lru"), "^policy:", False),
        ("h2o without scores", replace(scores=scores[:0]), "^scores: policy 'h2o'", False),
        ("scores shape", replace(scores=scores[:, :1]), "^scores:", False),
        ("scores dtype", replace(scores=scores.double()), "^scores:", False),
        ("sinks", replace(sinks=-1), "^sinks:", False),
        ("recent_ratio", replace(recent_ratio=1.5), "^recent_ratio:", False),
        ("k rank", replace(k=k[0]), "^k:", False),
        ("v dtype", replace(v=v.half()), "^v:", False),
        ("v shape", replace(v=v[:, :1]), "^v:", False),
        ("cu dtype", replace(cu_seqlens=cu.long()), "^cu_seqlens:", False),
        ("budget dtype", replace(budget=budget.long()), "^budget:", False),
        ("budget shape", replace(budget=budget[:1]), "^budget:", False),
        ("k_cache dtype", replace(k_cache=cache["k_cache"].half()), "^k_cache:", False),
        ("v_cache shape", replace(v_cache=cache["v_cache"][:, :1]), "^v_cache:", False),
        ("v_cache capacity", replace(v_cache=cache["v_cache"][:, :, :7]), "^v_cache:", False),
        ("k_cache layout", replace(k_cache=cache["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
         "^k_cache: last dim", False),
        ("lens dtype", replace(lens=cache["lens"].long()), "^lens:", False),
        ("slot_pos shape", replace(slot_pos=cache["slot_pos"][:, :, :7]), "^slot_pos:", False),
        ("cache_scores dtype", replace(cache_scores=cache["cache_scores"].half()), "^cache_scores:", False),
        ("budget > capacity", replace(budget=torch.tensor([4, 9], dtype=torch.int32)), "^budget:", True),
        ("budget < 0", replace(budget=torch.tensor([-1, 8], dtype=torch.int32)), "^budget:", True),
        ("cu total", replace(cu_seqlens=torch.tensor([0, 6, 15], dtype=torch.int32)), "^cu_seqlens:", True),
        ("cu order", replace(cu_seqlens=torch.tensor([0, 7, 6], dtype=torch.int32)), "^cu_seqlens:", True),
    ]


def assert_rejected(fn, args, message):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((RuntimeError, ValueError), match=message):
        fn(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.nan_to_num(5.0), b.nan_to_num(5.0))


@pytest.mark.parametrize("name,args,message,_", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_cpu_kernel_rejects_bad_inputs(name, args, message, _):
    assert_rejected(torch.ops.squeeze.compress_kv_, args, message)


@pytest.mark.parametrize("name,args,message,value_check", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_triton_launcher_rejects_bad_inputs(name, args, message, value_check):
    assert_rejected(triton_compress.compress_kv_, args, message)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_kernel(policy, dtype):
    # A ragged batch up to 8k tokens, ties in the scores, budgets tiny to all.
    lengths = [8192, 1, 0, 3000, 517]
    k, v, scores, cu = make_prompt(lengths, 8, 128, dtype, "cuda", ties=True)
    budget = [2048, 1, 5, 3000, 20]
    budget_gpu = torch.tensor(budget, dtype=torch.int32, device="cuda")
    got = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget_gpu, policy, 4, 0.5, 3100)
    want = compress(torch.ops.squeeze.compress_kv_, k.cpu(), v.cpu(), scores.cpu(), cu.cpu(),
                    torch.tensor(budget, dtype=torch.int32), policy, 4, 0.5, 3100)
    for name in want:
        assert torch.equal(got[name].cpu().float().nan_to_num(1.0), want[name].float().nan_to_num(1.0)), name


@pytest.mark.cuda
def test_cuda_graph_capture():
    k, v, scores, cu = make_prompt([300, 41], 2, 64, torch.float16, "cuda")
    budget = torch.tensor([64, 64], dtype=torch.int32, device="cuda")
    want = compress(torch.ops.squeeze.compress_kv_, k, v, scores, cu, budget, "h2o", 4, 0.5, 80)
    cache = poisoned_cache(2, 2, 80, 64, torch.float16, "cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.squeeze.compress_kv_(k, v, scores, cu, budget, "h2o", 4, 0.5, *cache.values())
    graph.replay()
    torch.cuda.synchronize()
    assert_same_cache({n: t.cpu() for n, t in cache.items()}, {n: t.cpu() for n, t in want.items()})
