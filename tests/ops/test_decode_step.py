"""decode_step_ over paged rows: the fused append + attention + scores + eviction of one layer,
against a step-by-step reference simulation (squeeze_ops.reference.decode_step_) over many steps."""
import pytest
import torch
from paged_cases import (POLICIES, assert_same_cache, dense_cache, expect_error, kept_positions, random_cache,
                         scores_by_position)
from paged_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import reference
from squeeze_ops.triton_kernels import common as tk_common
from squeeze_ops.triton_kernels import decode_step as tk

I32 = dict(dtype=torch.int32)


def step_inputs(B, H, Hkv, D, positions, dtype=torch.float32, device="cpu"):
    """q, k_new, v_new, pos for one decode step."""
    q, k_new, v_new = (torch.randn(*shape).to(dtype).to(device) for shape in ((B, H, D), (B, Hkv, D), (B, Hkv, D)))
    return q, k_new, v_new, torch.tensor(positions, **I32, device=device)


def budgets(budget, B, Hkv, device):
    b = torch.tensor(budget, **I32)
    return (b[:, None].expand(B, Hkv) if b.dim() == 1 else b).contiguous().to(device)


def simulate(run, B, H, Hkv, lens, D, budget, policy, sinks, recent_ratio, steps, page_size=4, accumulate=True,
             dtype=torch.float32, device="cpu", tol=2e-5):
    """Runs `steps` decode steps with `run` and with the reference on copies of one cache (rows
    of capacity budget + 1 at least); after every step the outputs agree and each row holds the
    same SET of positions; at the end the scores agree per position."""
    budget = budgets(budget, B, Hkv, device)
    cache = random_cache(B, Hkv, lens, D, page_size, dtype=dtype, device=device, reserve=budget.cpu())
    if not accumulate:
        cache[3].zero_()
    got, want = cache.clone(), cache.to("cpu")
    start = cache[5].max(dim=1).values.tolist()
    for step in range(steps):
        q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [n + step for n in start], dtype, device)
        args = (budget, D**-0.5, policy, sinks, recent_ratio, accumulate)
        out = run(q, k_new, v_new, pos, *got, *args)
        ref = reference.decode_step_(q.cpu(), k_new.cpu(), v_new.cpu(), pos.cpu(), *want, budget.cpu(), *args[1:])
        torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=tol, atol=tol)
        assert kept_positions(got) == kept_positions(want), f"step {step}"
    got_scores, want_scores = scores_by_position(got), scores_by_position(want)
    assert got_scores.keys() == want_scores.keys()
    for key, s in want_scores.items():
        assert got_scores[key] == pytest.approx(s, rel=1e-4, abs=1e-5), key
    return got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("H,Hkv,D,page_size", [(6, 2, 128, 4), (16, 2, 64, 1), (4, 2, 64, 16), (6, 3, 64, 7)])
def test_many_steps_keep_the_reference_set(policy, H, Hkv, D, page_size):
    lens = [[0] * Hkv, [3] * Hkv, [20] * Hkv, [26] * Hkv]
    final = simulate(torch.ops.squeeze.decode_step_, 4, H, Hkv, lens, D, budget=[0, 5, 12, 26], policy=policy,
                     sinks=2, recent_ratio=0.5, steps=40, page_size=page_size)
    assert final[5].tolist() == [[0] * Hkv, [5] * Hkv, [12] * Hkv, [26] * Hkv]


def test_per_head_budgets():
    """Each row of a sequence evicts to its own budget (per-KV-head plans)."""
    final = simulate(torch.ops.squeeze.decode_step_, 2, 6, 3, [[4, 9, 2], [15, 1, 11]], 64,
                     budget=[[3, 8, 12], [16, 2, 5]], policy="h2o", sinks=1, recent_ratio=0.5, steps=20)
    assert final[5].tolist() == [[3, 8, 12], [16, 2, 5]]


@pytest.mark.parametrize("sinks,recent_ratio", [(0, 0.0), (4, 0.25), (1, 1.0)])
def test_many_steps_h2o_parameters(sinks, recent_ratio):
    simulate(torch.ops.squeeze.decode_step_, 3, 4, 1, [1, 15, 30], 64, budget=[10, 14, 20], policy="h2o",
             sinks=sinks, recent_ratio=recent_ratio, steps=30)


def test_many_steps_with_tied_scores():
    """H2O without score accumulation: every score ties at 0, so the oldest unprotected token goes
    each time, and the cache ends up holding the sinks and the newest tokens, like StreamingLLM."""
    final = simulate(torch.ops.squeeze.decode_step_, 2, 4, 2, [0, 15], 64, budget=[9, 12], policy="h2o", sinks=3,
                     recent_ratio=0.5, steps=25, accumulate=False)
    newest = [0 + 25, 15 + 25]
    assert kept_positions(final) == {
        (b, h): set(range(3)) | set(range(newest[b] - (keep - 3), newest[b]))
        for b, keep in enumerate([9, 12]) for h in range(2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cache(dtype):
    simulate(torch.ops.squeeze.decode_step_, 2, 8, 2, [4, 19], 64, budget=[8, 10], policy="streaming", sinks=4,
             recent_ratio=0.5, steps=12, dtype=dtype, tol=2e-2)


def test_equals_the_separate_ops():
    """On the CPU the fused op and cache_append_ + decode_attention + cache_evict_ agree bit for bit."""
    B, H, Hkv, D = 3, 6, 3, 64
    budget = budgets([4, 5, 9], B, Hkv, "cpu")
    cache = random_cache(B, Hkv, [0, 6, 11], D, 4, reserve=budget)
    fused, split = cache.clone(), cache.clone()
    for step in range(6):
        q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [step, 6 + step, 11 + step])
        out = torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, *fused, budget, 0.3, "h2o", 1, 0.5, True)
        torch.ops.squeeze.cache_append_(*split, k_new, v_new, pos)
        want = torch.ops.squeeze.decode_attention(q, split[0], split[1], split[4], split[5], 0.3, split[3])
        torch.ops.squeeze.cache_evict_(*split, budget, "h2o", 1, 0.5)
        assert torch.equal(out, want)
        assert_same_cache(fused, split)


@pytest.mark.parametrize("device", ["cpu", TRITON_DEVICE])
def test_a_row_whose_budget_is_its_capacity_fills_it(device, value_checks):
    """budget = C (a row sized to every token it will hold, which never evicts): the steps that
    fit equal the reference, the one with no slot left is refused, the cache untouched."""
    run = torch.ops.squeeze.decode_step_ if device == "cpu" else tk.decode_step_
    cache = random_cache(2, 2, [9, 10], 64, 4, width=3, device=device)  # C = 12
    want = cache.to("cpu")
    budget = budgets([12, 12], 2, 2, device)
    for step in range(2):
        q, k_new, v_new, pos = step_inputs(2, 4, 2, 64, [9 + step, 10 + step], device=device)
        args = (budget, 0.125, "h2o", 1, 0.5, True)
        out = run(q, k_new, v_new, pos, *cache, *args)
        ref = reference.decode_step_(q.cpu(), k_new.cpu(), v_new.cpu(), pos.cpu(), *want, budget.cpu(), *args[1:])
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)
        assert kept_positions(cache) == kept_positions(want)
    assert cache[5].tolist() == [[11, 11], [12, 12]]
    q, k_new, v_new, pos = step_inputs(2, 4, 2, 64, [11, 12], device=device)
    expect_error(lambda: run(q, k_new, v_new, pos, *cache, budget, 0.125, "h2o", 1, 0.5, True), cache,
                 "capacity overflow")


def test_padding_rows_attend_to_nothing_stored():
    """A row of -1 pages (a padding row of a CUDA-graph batch): its new token is attended (the
    output is v_new), nothing is stored, its length goes back to its budget 0; the other rows are
    as without it."""
    for run, device in ((torch.ops.squeeze.decode_step_, "cpu"), (tk.decode_step_, TRITON_DEVICE)):
        cache = random_cache(3, 2, [5, 0, 7], 64, 4, width=3, device=device)
        cache[4][1] = -1
        alone = random_cache(3, 2, [5, 0, 7], 64, 4, width=3, device=device)
        alone[4][1] = -1
        budget = budgets([4, 0, 7], 3, 2, device)
        q, k_new, v_new, pos = step_inputs(3, 4, 2, 64, [5, 0, 7], device=device)
        before = cache.clone()
        out = run(q, k_new, v_new, pos, *cache, budget, 0.125, "h2o", 0, 0.5, True)
        torch.testing.assert_close(out[1], v_new[1].repeat_interleave(2, 0), rtol=1e-6, atol=1e-6)
        assert cache[5][1].tolist() == [0, 0]
        real = [0, 2]
        want = reference.decode_step_(q[real].cpu(), k_new[real].cpu(), v_new[real].cpu(), pos[real].cpu(),
                                      *before.to("cpu")[:4], before[4][real].cpu(), before[5][real].cpu(),
                                      budget[real].cpu(), 0.125, "h2o", 0, 0.5, True)
        torch.testing.assert_close(out[real].cpu(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_step_, tk.decode_step_], ids=["cpu", "triton"])
def test_padded_layout_as_one_page_per_row(run):
    """The padded cache [B, Hkv, C, D] viewed as one page of C slots per row: the same ops serve it."""
    device = TRITON_DEVICE if run is tk.decode_step_ else "cpu"
    B, H, Hkv, C, D = 2, 4, 2, 9, 64
    k, v = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    slot_pos = torch.full((B, Hkv, C), -1, **I32)
    slot_pos[:, :, :6] = torch.arange(6, **I32)
    cache = dense_cache(k, v, torch.full((B, Hkv), 6, **I32), slot_pos, torch.rand(B, Hkv, C)).to(device)
    want = cache.to("cpu")
    step = step_inputs(B, H, Hkv, D, [6, 6], device=device)
    budget = budgets([4, 8], B, Hkv, device)
    out = run(*step, *cache, budget, 0.125, "h2o", 1, 0.5, True)
    ref = reference.decode_step_(*(t.cpu() for t in step), *want, budget.cpu(), 0.125, "h2o", 1, 0.5, True)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)
    assert kept_positions(cache) == kept_positions(want)


def test_wrapper_defaults():
    cache = random_cache(1, 1, [5], 64, 2, width=3)
    q, k_new, v_new, pos = step_inputs(1, 2, 1, 64, [5])
    want = cache.clone()
    out = squeeze_ops.decode_step_(q, k_new, v_new, pos, *cache, budget=5)  # h2o, accumulating, sinks 0
    ref = reference.decode_step_(q, k_new, v_new, pos, *want, torch.tensor([[5]], **I32), 64**-0.5, "h2o", 0, 0.5,
                                 True)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert kept_positions(cache) == kept_positions(want)


def test_opcheck():
    cache = random_cache(2, 2, [0, 8], 64, 4, width=3)
    args = (*step_inputs(2, 4, 2, 64, [0, 8]), *cache, budgets([3, 6], 2, 2, "cpu"), 0.125, "h2o", 1, 0.5, True)
    torch.library.opcheck(torch.ops.squeeze.decode_step_.default, args)


def test_compiles_without_graph_breaks():
    """fullgraph tracing goes through the fake kernels and functionalisation of the mutated pools."""
    budget = budgets([4, 6], 2, 2, "cpu")
    cache = random_cache(2, 2, [3, 9], 64, 4, reserve=budget)

    def step(q, k_new, v_new, pos, k, v, pos_pages, score_pages, table, lens):
        return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k, v, pos_pages, score_pages, table, lens,
                                              budget, 0.125, "h2o", 1, 0.5, True) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = cache.clone()
    for i in range(3):
        inputs = step_inputs(2, 4, 2, 64, [3 + i, 9 + i])
        torch.testing.assert_close(compiled(*inputs, *cache), step(*inputs, *eager), rtol=0, atol=0)
        assert_same_cache(cache, eager)


# ---- Triton launcher, called directly (interpreter on CPU) ----

@pytest.mark.parametrize("policy,H,page_size", [("window", 2, 16), ("streaming", 6, 5), ("h2o", 8, 64)])
def test_triton_matches_reference(policy, H, page_size):
    simulate(tk.decode_step_, 2, H, 2, [0, 68], 64, budget=[3, 66], policy=policy, sinks=2, recent_ratio=0.5,
             steps=3, page_size=page_size, device=TRITON_DEVICE)


def test_triton_per_head_budgets():
    simulate(tk.decode_step_, 2, 6, 3, [[4, 9, 2], [15, 1, 11]], 64, budget=[[3, 8, 12], [16, 2, 5]],
             policy="h2o", sinks=1, recent_ratio=0.5, steps=4, device=TRITON_DEVICE)


def test_triton_stays_in_the_pool_for_any_values(no_value_checks):
    """Out-of-range lens, budgets and page ids (unchecked on the GPU without SQUEEZE_DEBUG) are
    clamped or not followed: the kernels stay inside the pools, fenced here."""
    B, H, Hkv, D = 4, 4, 2, 64
    cache = random_cache(B, Hkv, [5, 5, 5, 2], D, 2, width=3, device=TRITON_DEVICE, spare_pages=0)
    C = cache.capacity
    fences = [fenced(t) for t in cache[:4]]
    pool = [view for view, _ in fences]
    table, lens = cache[4].clone(), cache[5].clone()
    lens.copy_(torch.tensor([[C, C], [C + 7, 3], [-3, 0], [2, 2]], **I32))
    table[3, 1, 1] = 1 << 30
    budget = torch.tensor([[C + 9, C], [-2, 3], [1, 1], [1, 1]], **I32, device=TRITON_DEVICE)
    q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [50, 51, 52, 53], device=TRITON_DEVICE)
    out = torch.full_like(q, float("nan"))
    tk_common.run_decode(q, *pool[:2], table, lens, 0.125, pool[3], True, out,
                         (k_new, v_new, pos, pool[2], budget, "h2o", 1, 0.5))
    for _, intact in fences:
        intact()
    assert lens.tolist() == [[C, C], [0, 3], [1, 1], [1, 1]] and not out[2:].isnan().any()


# ---- bad inputs ----

def bad_steps():
    B, H, Hkv, D = 2, 4, 2, 64
    cache = random_cache(B, Hkv, [2, 5], D, 3, width=2)  # capacity 6
    q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [2, 5])
    budget = budgets([2, 4], B, Hkv, "cpu")
    tail = (0.125, "h2o", 1, 0.5, True)
    k, v, pos_pages, score_pages, table, lens = cache
    full = cache.clone()
    full[5] = torch.tensor([[2, 2], [6, 5]], **I32)
    yield "capacity overflow", (q, k_new, v_new, pos, *full, budget, *tail), "capacity overflow"
    yield "budget > C", (q, k_new, v_new, pos, *cache, budgets([2, 7], B, Hkv, "cpu"), *tail), "budget.*exceeds"
    yield "lens > C", (q, k_new, v_new, pos, *cache[:5], torch.tensor([[9, 1], [1, 1]], **I32), budget, *tail), \
        "lens.*exceeds"
    yield "negative lens", (q, k_new, v_new, pos, *cache[:5], torch.tensor([[-1, 1], [1, 1]], **I32), budget,
                            *tail), "lens.*non-neg"
    yield "H % Hkv", (q[:, :3], k_new, v_new, pos, *cache, budget, *tail), "q: the number of query heads"
    yield "q dtype", (q.half(), k_new, v_new, pos, *cache, budget, *tail), "q: expected dtype"
    yield "k_new shape", (q, k_new[:, :1], v_new, pos, *cache, budget, *tail), "k_new: expected shape"
    yield "unknown policy", (q, k_new, v_new, pos, *cache, budget, 0.125, "fifo", 1, 0.5, True), "policy"
    yield "inf scale", (q, k_new, v_new, pos, *cache, budget, float("inf"), "h2o", 1, 0.5, True), "scale"
    yield "lens layout", (q, k_new, v_new, pos, *cache[:5], torch.tensor([[2, 0, 2], [5, 0, 5]], **I32)[:, ::2],
                          budget, *tail), "lens: expected a contiguous"
    yield "score_pages shape", (q, k_new, v_new, pos, k, v, pos_pages, score_pages[:1], table, lens, budget,
                                *tail), "score_pages: expected shape"
    yield "expanded lens", (q, k_new, v_new, pos, k, v, pos_pages, score_pages, table,
                            torch.tensor([[2]], **I32).expand(2, 2), budget, *tail), "lens: expected a contiguous"
    yield "pos aliases pos_pages", (q, k_new, v_new, pos_pages[0, :2], k, v, pos_pages, score_pages, table, lens,
                                    budget, *tail), "pos_pages: must not share memory with pos"
    yield "k_new aliases k_pages", (q, k.view(-1, D)[:4].view(B, Hkv, D), v_new, pos, *cache, budget, *tail), \
        "k_pages: must not share memory with k_new"


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_step_, tk.decode_step_], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_steps()), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("H,Hkv,D,page_size", [(32, 8, 128, 16), (9, 3, 64, 16), (4, 4, 128, 1)])
def test_cuda_many_steps_keep_the_reference_set(policy, H, Hkv, D, page_size):
    simulate(torch.ops.squeeze.decode_step_, 4, H, Hkv, [0, 1, 280, 298], D, budget=[64, 1, 256, 298],
             policy=policy, sinks=4, recent_ratio=0.5, steps=30, page_size=page_size, dtype=torch.bfloat16,
             device="cuda", tol=2e-2)


@pytest.mark.cuda
def test_cuda_long_cache_step():
    simulate(torch.ops.squeeze.decode_step_, 2, 32, 8, [8999, 4000], 128, budget=[8000, 4096], policy="h2o",
             sinks=4, recent_ratio=0.5, steps=2, page_size=16, dtype=torch.bfloat16, device="cuda", tol=2e-2)


def cuda_step_case(steps):
    B, H, Hkv, D = 8, 32, 8, 128
    lens = [0, 1, 100, 599, 300, 512, 7, 450]
    budget = budgets([64, 1, 90, 512, 300, 511, 16, 256], B, Hkv, "cuda")
    cache = random_cache(B, Hkv, lens, D, 16, dtype=torch.bfloat16, device="cuda", reserve=budget.cpu())
    inputs = [step_inputs(B, H, Hkv, D, [n + i for n in lens], torch.bfloat16, "cuda") for i in range(steps)]
    return cache, budget, inputs


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager():
    cache, budget, inputs = cuda_step_case(6)
    tail = (budget, 128**-0.5, "h2o", 4, 0.5, True)
    eager, graphed = cache.clone(), cache.clone()
    torch.ops.squeeze.decode_step_(*inputs[0], *cache.clone(), *tail)  # compile outside the capture
    static = [t.clone() for t in inputs[0]]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = torch.ops.squeeze.decode_step_(*static, *graphed, *tail)
    for step_in in inputs:
        want = torch.ops.squeeze.decode_step_(*step_in, *eager, *tail)
        for s, t in zip(static, step_in):
            s.copy_(t)
        graph.replay()
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)
        assert_same_cache(graphed, eager)


@pytest.mark.cuda
def test_cuda_compile_fullgraph_equals_eager():
    cache, budget, inputs = cuda_step_case(4)

    def step(q, k_new, v_new, pos, k, v, pos_pages, score_pages, table, lens):
        return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k, v, pos_pages, score_pages, table, lens,
                                              budget, 128**-0.5, "h2o", 4, 0.5, True)

    compiled = torch.compile(step, fullgraph=True)
    eager = cache.clone()
    for step_in in inputs:
        torch.testing.assert_close(compiled(*step_in, *cache), step(*step_in, *eager), rtol=0, atol=0)
        assert_same_cache(cache, eager)


@pytest.mark.cuda
def test_cuda_debug_mode_checks_values(monkeypatch):
    """SQUEEZE_DEBUG=1 turns on the host-side value checks of the GPU path."""
    monkeypatch.setenv("SQUEEZE_DEBUG", "1")
    cache = random_cache(2, 2, [7, 2], 64, 4, width=2, device="cuda")
    cache[5][0] = 8
    step = step_inputs(2, 4, 2, 64, [8, 2], device="cuda")
    budget = budgets([4, 4], 2, 2, "cuda")
    expect_error(lambda: torch.ops.squeeze.decode_step_(*step, *cache, budget, 0.125, "h2o", 0, 0.5, True), cache,
                 "capacity overflow")
