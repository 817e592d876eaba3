"""decode_step_: the fused append + attention + scores + eviction of one layer, against a
step-by-step reference simulation (squeeze_ops.reference.decode_step_) over many steps."""
import pytest
import torch
from decode_cases import (POLICIES, assert_same_cache, clone_all, expect_error, kept_positions, random_cache,
                          scores_by_position)
from decode_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from squeeze_ops import reference
from squeeze_ops.triton_kernels import common as tk_common
from squeeze_ops.triton_kernels import decode_step as tk

I32 = dict(dtype=torch.int32)


def step_inputs(B, H, Hkv, D, positions, dtype=torch.float32, device="cpu"):
    """q, k_new, v_new, pos for one decode step."""
    q, k_new, v_new = (torch.randn(*shape).to(dtype).to(device) for shape in ((B, H, D), (B, Hkv, D), (B, Hkv, D)))
    return q, k_new, v_new, torch.tensor(positions, **I32, device=device)


def simulate(run, B, H, Hkv, C, D, lens, budget, policy, sinks, recent_ratio, steps, accumulate=True,
             dtype=torch.float32, device="cpu", tol=2e-5):
    """Runs `steps` decode steps with `run` and with the reference on copies of one cache; after every
    step the outputs agree and each (sequence, head) holds the same SET of positions."""
    cache = random_cache(B, Hkv, C, D, lens, dtype, device)
    if not accumulate:
        cache[4].zero_()
    got, want = clone_all(cache), [t.cpu() for t in cache]
    budget = torch.tensor(budget, **I32, device=device)
    for step in range(steps):
        q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [n + step for n in lens], dtype, device)
        args = (budget, D**-0.5, policy, sinks, recent_ratio, accumulate)
        out = run(q, k_new, v_new, pos, *got, *args)
        ref = reference.decode_step_(q.cpu(), k_new.cpu(), v_new.cpu(), pos.cpu(), *want, budget.cpu(), *args[1:])
        torch.testing.assert_close(out.float().cpu(), ref.float(), rtol=tol, atol=tol)
        assert kept_positions(got[2], got[3]) == kept_positions(want[2], want[3]), f"step {step}"
    got_scores = scores_by_position(*(t.cpu() for t in (got[2], got[3], got[4])))
    want_scores = scores_by_position(want[2], want[3], want[4])
    assert got_scores.keys() == want_scores.keys()
    for key, s in want_scores.items():
        assert got_scores[key] == pytest.approx(s, rel=1e-4, abs=1e-5), key
    return got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("H,Hkv,D", [(6, 2, 128), (16, 2, 64)])
def test_many_steps_keep_the_reference_set(policy, H, Hkv, D):
    C = 27
    final = simulate(torch.ops.squeeze.decode_step_, 4, H, Hkv, C, D, lens=[0, 3, 20, 26], budget=[0, 5, 12, 26],
                     policy=policy, sinks=2, recent_ratio=0.5, steps=40)
    assert final[2].tolist() == [0, 5, 12, 26]


@pytest.mark.parametrize("sinks,recent_ratio", [(0, 0.0), (4, 0.25), (1, 1.0)])
def test_many_steps_h2o_parameters(sinks, recent_ratio):
    simulate(torch.ops.squeeze.decode_step_, 3, 4, 1, 31, 64, lens=[1, 15, 30], budget=[10, 14, 20],
             policy="h2o", sinks=sinks, recent_ratio=recent_ratio, steps=30)


def test_many_steps_with_tied_scores():
    """H2O without score accumulation: every score ties at 0, so the oldest unprotected token goes
    each time, and the cache ends up holding the sinks and the newest tokens, like StreamingLLM."""
    final = simulate(torch.ops.squeeze.decode_step_, 2, 4, 2, 16, 64, lens=[0, 15], budget=[9, 12],
                     policy="h2o", sinks=3, recent_ratio=0.5, steps=25, accumulate=False)
    newest = [0 + 25, 15 + 25]
    assert kept_positions(final[2], final[3]) == {
        (b, h): set(range(3)) | set(range(newest[b] - (keep - 3), newest[b]))
        for b, keep in enumerate([9, 12]) for h in range(2)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cache(dtype):
    simulate(torch.ops.squeeze.decode_step_, 2, 8, 2, 20, 64, lens=[4, 19], budget=[8, 10], policy="streaming",
             sinks=4, recent_ratio=0.5, steps=12, dtype=dtype, tol=2e-2)


def test_equals_the_separate_ops():
    """On the CPU the fused op and cache_append_ + decode_attention + cache_evict_ agree bit for bit."""
    B, H, Hkv, C, D = 3, 6, 3, 12, 64
    cache = random_cache(B, Hkv, C, D, [0, 6, 11])
    budget = torch.tensor([4, 5, 9], **I32)
    fused, split = clone_all(cache), clone_all(cache)
    for step in range(6):
        q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [step, 6 + step, 11 + step])
        out = torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, *fused, budget, 0.3, "h2o", 1, 0.5, True)
        torch.ops.squeeze.cache_append_(*split, k_new, v_new, pos)
        want = torch.ops.squeeze.decode_attention(q, split[0], split[1], split[2], 0.3, split[4])
        torch.ops.squeeze.cache_evict_(*split, budget, "h2o", 1, 0.5)
        assert torch.equal(out, want)
        assert_same_cache(fused, split)


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_step_, tk.decode_step_], ids=["cpu", "triton"])
def test_strided_layouts(run):
    """K/V stored as [B, C, Hkv, D] (viewed as [B, Hkv, C, D]), slot_pos / scores as slices of wider
    rows, q sliced out of a wider tensor: only the last dimension needs to be contiguous."""
    B, H, Hkv, C, D = 2, 4, 2, 70, 64
    dense = random_cache(B, Hkv, C, D, [69, 3])
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in dense[:2]] + [dense[2].clone()]
    strided += [torch.cat([t, t[..., :5]], dim=-1)[..., :C] for t in dense[3:]]
    strided = [t.to(TRITON_DEVICE) for t in strided] if run is tk.decode_step_ else strided
    q, k_new, v_new, pos = step_inputs(B, H + 3, Hkv, D, [69, 3])
    q = q[:, 1:H + 1]
    want = clone_all(dense)
    args = (torch.tensor([60, 5], **I32), 0.125, "h2o", 1, 0.5, True)
    ref = reference.decode_step_(q, k_new, v_new, pos, *want, *args)
    on = [t.to(strided[0].device) for t in (q, k_new, v_new, pos)]
    out = run(*on, *strided, args[0].to(strided[0].device), *args[1:])
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)
    assert kept_positions(strided[2].cpu(), strided[3].cpu()) == kept_positions(want[2], want[3])


def test_wrapper_defaults():
    cache = random_cache(1, 1, 6, 64, [5])
    q, k_new, v_new, pos = step_inputs(1, 2, 1, 64, [5])
    want = clone_all(cache)
    out = squeeze_ops.decode_step_(q, k_new, v_new, pos, *cache, budget=5)  # h2o, accumulating, sinks 0
    ref = reference.decode_step_(q, k_new, v_new, pos, *want, torch.tensor([5], **I32), 64**-0.5, "h2o", 0, 0.5, True)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert kept_positions(cache[2], cache[3]) == kept_positions(want[2], want[3])


def test_opcheck():
    cache = random_cache(2, 2, 9, 64, [0, 8])
    args = (*step_inputs(2, 4, 2, 64, [0, 8]), *cache, torch.tensor([3, 6], **I32), 0.125, "h2o", 1, 0.5, True)
    torch.library.opcheck(torch.ops.squeeze.decode_step_.default, args)


def test_compiles_without_graph_breaks():
    """fullgraph tracing goes through the fake kernels and functionalisation of the mutated cache."""
    cache = random_cache(2, 2, 10, 64, [3, 9])
    budget = torch.tensor([4, 6], **I32)

    def step(q, k_new, v_new, pos, k, v, lens, slot_pos, scores):
        return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k, v, lens, slot_pos, scores, budget, 0.125,
                                              "h2o", 1, 0.5, True) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = clone_all(cache)
    for i in range(3):
        inputs = step_inputs(2, 4, 2, 64, [3 + i, 9 + i])
        torch.testing.assert_close(compiled(*inputs, *cache), step(*inputs, *eager), rtol=0, atol=0)
        assert_same_cache(cache, eager)


# ---- Triton launcher, called directly (interpreter on CPU) ----

@pytest.mark.parametrize("policy,H", [("window", 2), ("streaming", 6), ("h2o", 8)])
def test_triton_matches_reference(policy, H):
    simulate(tk.decode_step_, 2, H, 2, 70, 64, lens=[0, 68], budget=[3, 66], policy=policy, sinks=2,
             recent_ratio=0.5, steps=3, device=TRITON_DEVICE)


def test_triton_never_writes_past_the_cache():
    """Out-of-range lens and budgets (unchecked on the GPU without SQUEEZE_DEBUG) are clamped: the
    kernels stay inside the C slots. The cache is a view into a larger buffer whose tail must not change."""
    B, H, Hkv, C, D = 4, 4, 2, 6, 64
    big = random_cache(B, Hkv, C + 5, D, [C + 5] * B, device=TRITON_DEVICE)
    cache = [big[0][:, :, :C], big[1][:, :, :C], None, big[3][:, :, :C], big[4][:, :, :C]]
    cache[2] = torch.tensor([C, C + 7, -3, 2], **I32, device=TRITON_DEVICE)
    budget = torch.tensor([C + 9, -2, 1, 1], **I32, device=TRITON_DEVICE)
    tails = [t[:, :, C:].clone() for t in (big[0], big[1], big[3], big[4])]
    q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [50, 51, 52, 53], device=TRITON_DEVICE)
    out = torch.full_like(q, float("nan"))
    step = (k_new, v_new, pos, cache[3], budget, "h2o", 1, 0.5)
    tk_common.run_decode(q, cache[0], cache[1], cache[2], 0.125, cache[4], True, out, step)
    for t, tail in zip((big[0], big[1], big[3], big[4]), tails):
        torch.testing.assert_close(t[:, :, C:], tail, rtol=0, atol=0, equal_nan=True)
    assert cache[2].tolist() == [C, 0, 1, 1] and not out.isnan().any()


# ---- bad inputs ----

def bad_steps():
    B, H, Hkv, C, D = 2, 4, 2, 6, 64
    cache = random_cache(B, Hkv, C, D, [2, 5])
    q, k_new, v_new, pos = step_inputs(B, H, Hkv, D, [2, 5])
    budget = torch.tensor([2, 4], **I32)
    tail = (0.125, "h2o", 1, 0.5, True)
    full = clone_all(cache)
    full[2] = torch.tensor([2, 6], **I32)
    yield "capacity overflow", (q, k_new, v_new, pos, *full, budget, *tail), "capacity overflow"
    yield "budget = C", (q, k_new, v_new, pos, *cache, torch.tensor([2, 6], **I32), *tail), "budget.*exceeds"
    yield "lens > C", (q, k_new, v_new, pos, *cache[:2], torch.tensor([9, 1], **I32), *cache[3:], budget, *tail), \
        "lens.*exceeds"
    yield "negative lens", (q, k_new, v_new, pos, *cache[:2], torch.tensor([-1, 1], **I32), *cache[3:], budget,
                            *tail), "lens: expected non-neg"
    yield "H % Hkv", (q[:, :3], k_new, v_new, pos, *cache, budget, *tail), "q: the number of query heads"
    yield "q dtype", (q.half(), k_new, v_new, pos, *cache, budget, *tail), "q: expected dtype"
    yield "k_new shape", (q, k_new[:, :1], v_new, pos, *cache, budget, *tail), "k_new: expected shape"
    yield "unknown policy", (q, k_new, v_new, pos, *cache, budget, 0.125, "fifo", 1, 0.5, True), "policy"
    yield "lens layout", (q, k_new, v_new, pos, *cache[:2], torch.tensor([2, 0, 5, 0], **I32)[::2], *cache[3:],
                          budget, *tail), "lens: expected a contiguous"
    yield "scores shape", (q, k_new, v_new, pos, *cache[:4], cache[4][:1], budget, *tail), "scores: expected shape"


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_step_, tk.decode_step_], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_steps()), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (9, 3, 64), (4, 4, 128)])
def test_cuda_many_steps_keep_the_reference_set(policy, H, Hkv, D):
    simulate(torch.ops.squeeze.decode_step_, 4, H, Hkv, 300, D, lens=[0, 1, 280, 299], budget=[64, 1, 256, 299],
             policy=policy, sinks=4, recent_ratio=0.5, steps=30, dtype=torch.bfloat16, device="cuda", tol=2e-2)


@pytest.mark.cuda
def test_cuda_long_cache_step():
    simulate(torch.ops.squeeze.decode_step_, 2, 32, 8, 9000, 128, lens=[8999, 4000], budget=[8000, 4096],
             policy="h2o", sinks=4, recent_ratio=0.5, steps=2, dtype=torch.bfloat16, device="cuda", tol=2e-2)


def cuda_step_case(steps):
    B, H, Hkv, C, D = 8, 32, 8, 600, 128
    lens = [0, 1, 100, 599, 300, 512, 7, 450]
    cache = random_cache(B, Hkv, C, D, lens, torch.bfloat16, "cuda")
    budget = torch.tensor([64, 1, 90, 512, 300, 511, 16, 256], **I32, device="cuda")
    inputs = [step_inputs(B, H, Hkv, D, [n + i for n in lens], torch.bfloat16, "cuda") for i in range(steps)]
    return cache, budget, inputs


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager():
    cache, budget, inputs = cuda_step_case(6)
    tail = (budget, 128**-0.5, "h2o", 4, 0.5, True)
    eager, graphed = clone_all(cache), clone_all(cache)
    torch.ops.squeeze.decode_step_(*inputs[0], *clone_all(cache), *tail)  # compile outside the capture
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

    def step(q, k_new, v_new, pos, k, v, lens, slot_pos, scores):
        return torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, k, v, lens, slot_pos, scores, budget,
                                              128**-0.5, "h2o", 4, 0.5, True)

    compiled = torch.compile(step, fullgraph=True)
    eager = clone_all(cache)
    for step_in in inputs:
        torch.testing.assert_close(compiled(*step_in, *cache), step(*step_in, *eager), rtol=0, atol=0)
        assert_same_cache(cache, eager)


@pytest.mark.cuda
def test_cuda_debug_mode_checks_values(monkeypatch):
    """SQUEEZE_DEBUG=1 turns on the host-side value checks of the GPU path."""
    monkeypatch.setenv("SQUEEZE_DEBUG", "1")
    cache = random_cache(2, 2, 6, 64, [6, 2], device="cuda")
    step = step_inputs(2, 4, 2, 64, [6, 2], device="cuda")
    budget = torch.tensor([4, 4], **I32, device="cuda")
    expect_error(lambda: torch.ops.squeeze.decode_step_(*step, *cache, budget, 0.125, "h2o", 0, 0.5, True), cache,
                 "capacity overflow")
