"""The memory benchmark's harness on a toy model on the CPU (the real run loads SmolLM2): the
numbers of its table are what the caches hold, recounted here from the rows' budgets, and the
prefill-peak comparison runs both paths."""
import pytest
import torch

from bench import bench_e2e, bench_memory
from squeeze_ops.engine.policies import SqueezeSettings, prefill_needs

STEPS = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _ = bench_e2e.build_model(bench_e2e.TOY, "cpu", torch.float32, use_transformers=False)
    runner = bench_e2e.LlamaRunner(model)
    tokens = torch.randint(0, bench_e2e.TOY.vocab, (400,))
    prompts = bench_memory.workload(tokens, 5, 20, 60)
    needs = prefill_needs(bench_memory.POLICIES["h2o"], [SqueezeSettings.uniform(b_init=0.3)])
    yield runner, prompts, bench_memory.prefill_groups(runner, prompts, needs, 2)
    torch.set_num_threads(threads)


def settings_of(policy):
    return [("full", None), ("uniform 30%", SqueezeSettings.uniform(b_init=0.3)),
            ("squeeze p0.5 30%", SqueezeSettings.squeeze(b_init=0.3, p=0.5))]


def test_workload_is_disjoint_windows():
    tokens = torch.arange(1000)
    prompts = bench_memory.workload(tokens, 4, 50, 200, seed=3)
    assert all(50 <= len(p) <= 200 for p in prompts)
    assert torch.equal(torch.cat(prompts), tokens[: sum(map(len, prompts))])


@pytest.mark.parametrize("page_size", [1, 16])  # decoded at 16 only
@pytest.mark.parametrize("label,settings", settings_of("h2o"))
def test_row_is_what_the_cache_holds(setup, page_size, label, settings):
    runner, prompts, records = setup
    L, Hkv, D = runner.num_layers, runner.num_kv_heads, runner.head_dim
    pool = bench_memory.full_pool(runner, prompts, STEPS, page_size)
    cache = bench_memory.admit(runner, pool, bench_memory.POLICIES["h2o"], records, settings, STEPS)
    assert cache.batch == len(prompts)
    row = bench_memory.memory_row(cache.memory(), len(prompts) * L * Hkv, page_size)
    budgets = cache.budgets.view(len(prompts), L, -1).expand(-1, -1, Hkv).long()
    horizon = torch.tensor([len(p) + STEPS for p in prompts])[:, None, None]
    pages = -(-torch.where(budgets >= horizon, horizon, budgets + 1) // page_size)
    slot_mib = 2 * D * 4 / bench_memory.MIB
    assert row["held_MiB"] == pytest.approx(int(budgets.sum()) * slot_mib)
    assert row["allocated_MiB"] == pytest.approx(int(pages.sum()) * page_size * slot_mib)
    assert row["mean_budget"] == pytest.approx(float(budgets.double().mean()))
    assert 1 <= row["alloc/held"] <= row["bound"]
    full = sum(L * Hkv * -(-(len(p) + STEPS) // page_size) * page_size for p in prompts)
    assert row["paged_full_MiB"] == pytest.approx(full * slot_mib)
    padded = sum(len(prompts) * Hkv * (int(budgets[:, layer].max()) + 1) for layer in range(L))
    assert row["padded_MiB"] == pytest.approx(padded * slot_mib)
    if settings is None:  # the full cache holds every row's horizon
        assert row["alloc_vs_full"] == "100.0%" and torch.equal(budgets, horizon.expand_as(budgets))
    if page_size == bench_memory.DECODE_PAGE_SIZE:
        bench_memory.decode_some(runner, cache, records, STEPS)  # raises if decoding allocated or a row is off
    cache.retire(cache.ids)
    assert pool.free_pages == pool.num_pages


def test_table_and_peaks(setup):
    runner, prompts, records = setup
    rows = bench_memory.run_table(runner, records, prompts, STEPS, [16, 64], 16, 2, settings_of, log=lambda line: None)
    assert [(r["policy"], r["settings"], r["page"]) for r in rows] == [
        (p, label, S) for S in (16, 64) for p in bench_memory.POLICIES for label, _ in settings_of(p)]
    peaks = bench_memory.prefill_peaks(runner, prompts[:2], bench_memory.POLICIES["h2o"],
                                       SqueezeSettings.uniform(b_init=0.3), STEPS)
    (_, reported_staged, staged, reserved_kv), (_, reported, counted, recorded_kv) = peaks
    assert reported_staged == staged  # the staged rows + the largest layer's prompt K/V and scores
    assert reported == counted  # the record path: the record + the admitted rows
    assert staged < counted and reserved_kv == recorded_kv  # same rows admitted, a smaller peak
    text = bench_memory.markdown(rows, peaks, {"date": "today"}, "python -m bench.bench_memory", 60.0, prompts,
                                 (0.5, 0.7), STEPS, 2)
    assert text.count("\n| h2o |") == 6 and "Peak counted, reservation / record:" in text
    assert f"admitted for {STEPS + 1} new tokens each ({STEPS} decode steps)" in text
