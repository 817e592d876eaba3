"""The end-to-end throughput harness (bench/bench_e2e.py) run on the CPU at toy sizes, so that it
cannot rot: the full-cache baseline and the squeezed caches decode through the engine, the max
batch is found against a small memory limit, and the numbers it reports are checked against
what the caches really hold."""
import math

import pytest
import torch

from bench import bench_e2e as e2e
from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.models.llama import LlamaRunner
from squeeze_ops.engine.policies import SqueezeSettings

SHAPE = e2e.TOY  # 4 layers, hidden 256, 4 / 2 heads, D 64, MLP 512, vocab 1000
T, STEPS = 40, 4
LIMIT = 4 * e2e.MIB
FP32 = 4


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine's cores are shared: oversubscribed OpenMP threads make each matmul
    tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    model, _ = e2e.build_model(SHAPE, "cpu", torch.float32, use_transformers=False)
    return LlamaRunner(model)


def _harness(runner, limit=LIMIT, log=None):
    return e2e.Harness(runner, SHAPE, "cpu", e2e.Memory("cpu", limit), STEPS, use_graph=False,
                       log=log if log is not None else (lambda line: None))


def _per_layer_slot_bytes():
    """K + V bytes of one slot in one layer, and the side tables' (int32 position + fp32 score)."""
    return 2 * SHAPE.kv_heads * SHAPE.head_dim * FP32, SHAPE.kv_heads * 8


def test_grid_end_to_end(runner):
    lines = []
    harness = _harness(runner, log=lines.append)
    rows = e2e.run_grid(harness, [(T, "full"), (T, 0.3), (T, 0.5)], ["sdpa"], ["h2o"])
    assert [(r["path"], r["batch_kind"]) for r in rows] == [
        ("full sdpa (baseline)", "max"), ("squeeze h2o 30%", "max"), ("squeeze h2o 30%", "common"),
        ("squeeze h2o 50%", "max"), ("squeeze h2o 50%", "common")]
    assert harness.skipped == [] and len(lines) == 1 + len(rows)  # the prefill line, then one per run
    for r in rows:
        for key in ("step_ms", "rest_ms", "attn_ms", "tok_s", "x_base", "kv_mib_seq", "saved_pct"):
            assert math.isfinite(r[key]), (key, r)
        assert r["step_ms"] > 0 and r["rest_ms"] > 0 and r["tok_s"] > 0
        assert r["tokens"] == r["batch"] * STEPS
        assert r["tok_s"] == pytest.approx(r["tokens"] / (r["step_ms"] * STEPS / 1e3))
        assert r["attn_ms"] == pytest.approx(r["step_ms"] - r["rest_ms"])
        assert r["mode"] == "eager (cpu)"
    full, sq30, sq30_common, sq50, sq50_common = rows

    # The baseline: dense K/V of T + STEPS + 1 slots (the warm-up step's included), the largest
    # batch whose cache and step temporaries fit in the limit.
    kv_slot, meta_slot = _per_layer_slot_bytes()
    slots = T + STEPS + 1
    full_kv = SHAPE.layers * slots * kv_slot
    assert full["kv_mib_seq"] * e2e.MIB == full_kv
    temporaries = e2e.step_temporaries(SHAPE, FP32, 4 * SHAPE.heads * (SHAPE.head_dim + 1) + slots)
    assert full["batch"] == LIMIT // (full_kv + temporaries) and full["tries"] == 1
    assert full["x_base"] == 1.0

    # Squeezed: exactly the bytes of its per-layer capacities (budget + 1), a larger max batch,
    # and the common batch = the baseline's max batch.
    for r, budget in ((sq30, 0.3), (sq50, 0.5)):
        caps = r["capacities"]
        assert len(caps) == SHAPE.layers and r["budget"] == budget
        assert r["kv_mib_seq"] * e2e.MIB == sum(caps) * (kv_slot + meta_slot) + SHAPE.layers * 4
        # A layer's capacity is the largest of the two prompts' budgets + 1.
        assert sum(caps) == pytest.approx(r["alloc_x"] * (r["plan_tokens"] + SHAPE.layers))
        assert r["alloc_x"] >= 1.0
        assert r["batch"] > full["batch"]
        assert r["batch"] * r["kv_mib_seq"] * e2e.MIB <= LIMIT
    # The planner conserves the total budget: L * b_init * T tokens per sequence, less the floors.
    assert SHAPE.layers * (0.3 * T - 1) <= sq30["plan_tokens"] <= SHAPE.layers * 0.3 * T
    assert sq30_common["batch"] == sq50_common["batch"] == full["batch"]
    assert sq30["kv_mib_seq"] < sq50["kv_mib_seq"] < full["kv_mib_seq"]
    assert sq30["kv_mib_seq"] < 0.5 * full["kv_mib_seq"]
    full_tokens_kv = SHAPE.layers * (T + STEPS) * kv_slot
    assert sq30["saved_pct"] == pytest.approx(100 * (1 - sq30["kv_mib_seq"] * e2e.MIB / full_tokens_kv))
    assert sq30["saved_pct"] > 60
    # x_base is against the baseline at its max batch (max rows) or at the same batch (common rows).
    assert sq30["x_base"] == pytest.approx(sq30["tok_s"] / full["tok_s"])
    assert sq30_common["x_base"] == pytest.approx(sq30_common["tok_s"] / full["tok_s"])


def test_dense_baseline_attends_like_the_library(runner):
    """Over the same prefill and tokens, the dense cache (exact masked SDPA) and a SqueezeKVCache
    without budgets give the same logits: the baseline writes and reads the right slots."""
    record, first = e2e.prefill(runner, T, 2, SHAPE.vocab)
    assert e2e.full_cache_agreement(runner, record, first, "sdpa", 6, "cpu") < 1e-5


def test_tiled_cache_equals_the_engine_fork(runner):
    record, _ = e2e.prefill(runner, T, 2, SHAPE.vocab)
    policy, settings = e2e.POLICIES["h2o"], SqueezeSettings.squeeze(b_init=0.3, p=e2e.SQUEEZE_P)
    small = SqueezeKVCache.build(e2e._record_on(record, "cpu"), policy, settings, STEPS)
    tiled = e2e.tile_cache(small, 5, T + STEPS)
    forked = SqueezeKVCache.build(record, policy, settings, STEPS, source=[0, 1, 0, 1, 0])
    assert tiled.capacities == forked.capacities
    for layer in range(SHAPE.layers):
        for name in ("lens", "slot_pos", "scores"):
            assert torch.equal(getattr(tiled, name)[layer], getattr(forked, name)[layer]), name
        held = forked.slot_pos[layer] >= 0  # K/V of empty slots are unspecified
        for name in ("k_cache", "v_cache"):
            assert torch.equal(getattr(tiled, name)[layer][held], getattr(forked, name)[layer][held]), name
    for name in ("budgets", "planned", "positions", "labels"):
        assert torch.equal(getattr(tiled, name), getattr(forked, name)), name
    for field in ("kv_total", "metadata", "full_cache", "kv_per_layer"):
        assert getattr(tiled.memory(), field) == getattr(forked.memory(), field), field


def test_max_batch_search_shrinks_after_out_of_memory():
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 37:
            raise e2e.OutOfMemory("too big")
        return "ok"

    assert e2e.find_max_batch(10, 400, run) == (36, "ok", 3)
    assert tried == [40, 38, 36]
    tried.clear()
    with pytest.raises(RuntimeError, match="no batch fits"):
        e2e.find_max_batch(10, 1000, run)  # 100, 97, 94, 91, 88: five tries, none fits
    assert tried == [100, 97, 94, 91, 88]


def test_cpu_memory_limit_raises_like_the_allocator():
    memory = e2e.Memory("cpu", 1000)
    assert memory.available() == 1000
    memory.check(1000)
    with pytest.raises(e2e.OutOfMemory):
        memory.check(1001)
    with pytest.raises(ValueError, match="limit"):
        e2e.Memory("cpu")


def test_grid_order_and_verdicts():
    assert e2e.make_grid([2048, 4096], [0.3, 0.2, 0.5]) == [
        (2048, "full"), (2048, 0.3), (2048, 0.2), (4096, "full"), (4096, 0.3), (2048, 0.5)]
    rows = [dict(prompt=2048, path="squeeze h2o 30%", budget=0.3, batch_kind="max", batch=800, x_base=2.3,
                 saved_pct=64.0),
            dict(prompt=2048, path="squeeze h2o 30%", budget=0.3, batch_kind="common", batch=228, x_base=1.7,
                 saved_pct=71.0),
            dict(prompt=4096, path="squeeze h2o 30%", budget=0.3, batch_kind="max", batch=400, x_base=1.0,
                 saved_pct=71.0)]
    assert e2e.verdicts(rows) == [
        "squeeze h2o 30% at the max batch (800): 2.30x vs >= 2.2x: met; 64.0% KV saved vs >= 65%: NOT met",
        "squeeze h2o 30% at the common batch (228): 1.70x vs >= 1.8x: NOT met"]


def test_main_runs_on_cpu(capsys):
    e2e.main(["--quick", "--device", "cpu", "--no-transformers", "--steps", "2", "--prompts", "24",
              "--policies", "streaming", "--memory-limit-mib", "1"])
    out = capsys.readouterr().out
    assert "full cache sdpa vs SqueezeKVCache without budgets, 4 steps" in out
    assert "squeeze streaming 30%" in out and "total" in out


def test_tensor_model_matches_transformers_layout():
    transformers = pytest.importorskip("transformers")
    hf, source = e2e.build_model(SHAPE, "cpu", torch.float32)
    assert source.startswith(f"transformers {transformers.__version__}")
    ours, theirs = LlamaRunner(e2e._tensor_model(SHAPE, "cpu", torch.float32)), LlamaRunner(hf)
    for attr in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "eps", "scale", "rope_scaling"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq)
    for a, b in zip(ours.layers, theirs.layers):
        assert {k: getattr(v, "shape", v) for k, v in a.items() if k != "act"} == \
            {k: getattr(v, "shape", v) for k, v in b.items() if k != "act"}
    assert ours.embed.shape == theirs.embed.shape and ours.lm_head.shape == theirs.lm_head.shape


def test_a_failing_provider_is_left_out_loudly(runner, monkeypatch, capsys):
    def broken(q, k, v, cache, scale):
        raise RuntimeError("this build has no such kernel")

    monkeypatch.setitem(e2e.FULL_PROVIDERS, "broken", broken)
    harness = _harness(runner)
    rows = e2e.run_grid(harness, [(T, "full")], ["broken", "sdpa"], ["h2o"])
    assert [r["path"] for r in rows] == ["full sdpa (baseline)"]
    assert "full-cache provider broken FAILED" in capsys.readouterr().err


def test_time_limit_skips_jobs(runner):
    harness = e2e.Harness(runner, SHAPE, "cpu", e2e.Memory("cpu", LIMIT), STEPS, use_graph=False, time_limit=0.0,
                          log=lambda line: None)
    assert e2e.run_grid(harness, [(T, "full"), (T, 0.3)], ["sdpa"], ["h2o"]) == []
    assert harness.skipped == [f"T {T} full sdpa", f"T {T} squeeze h2o 30% (no baseline)"]


@pytest.mark.cuda
def test_quick_grid_on_the_gpu_runs_in_cuda_graphs():
    """The toy grid on the GPU in bf16: both flash baselines and the library's decode step are
    captured in CUDA graphs, and the exact baseline attends like the library."""
    torch.manual_seed(0)
    model, _ = e2e.build_model(SHAPE, "cuda", torch.bfloat16, use_transformers=False)
    gpu_runner = LlamaRunner(model)
    harness = e2e.Harness(gpu_runner, SHAPE, "cuda", e2e.Memory("cuda", 16 * e2e.MIB), STEPS)
    prompt = harness.prompt(T)
    assert e2e.full_cache_agreement(gpu_runner, prompt.record, prompt.first, "fa2_varlen", 4, "cuda") < 5e-2
    rows = e2e.run_grid(harness, [(T, "full"), (T, 0.3)], ["sdpa_flash", "fa2_varlen"], ["h2o", "streaming"])
    assert len(rows) == 6 and harness.skipped == []
    assert all(r["mode"] == "cuda graph" for r in rows), [(r["path"], r["mode"]) for r in rows]
    assert all(math.isfinite(r["tok_s"]) and r["tok_s"] > 0 for r in rows)
