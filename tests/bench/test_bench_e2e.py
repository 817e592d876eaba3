"""The end-to-end harness (bench/bench_e2e.py) run on the CPU at toy sizes, so that it cannot rot:
requests stream through ContinuousBatcher on the paged engine, and the numbers it reports are
checked against what the caches hold and what a plain generate produces."""
import math
from types import SimpleNamespace

import pytest
import torch

from bench import bench_e2e as e2e
from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings
from squeeze_ops.engine.pool import PagePool
from squeeze_ops.models.llama import LlamaRunner

SHAPE = e2e.TOY  # 4 layers, hidden 256, 4 / 2 heads, D 64, MLP 512, vocab 1000
T, G, S = 24, 4, 16
POOL = 1 << 20  # 126 pages of 16 slots: about five sequences of the full cache
SLOT = 2 * SHAPE.head_dim * 4  # K + V bytes of one slot, fp32


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


def _cache(runner, policy):
    pool = PagePool(POOL // e2e.page_bytes(runner, S), S, SHAPE.head_dim, torch.float32, "cpu")
    return SqueezeKVCache(pool, SHAPE.layers, SHAPE.kv_heads, policy)


def test_workload_is_deterministic_and_ragged():
    workload = e2e.Workload(T, G, SHAPE.vocab)
    requests = [workload.request(i) for i in range(40)]
    for i, (prompt, new) in enumerate(requests):
        assert T // 2 <= len(prompt) <= 3 * T // 2 and G // 2 <= new <= 3 * G // 2
        assert torch.equal(prompt, workload.request(i)[0])
    assert len({len(p) for p, _ in requests}) > 5 and len({tuple(p.tolist()) for p, _ in requests}) == 40


def test_full_cache_serves_what_generate_gives(runner):
    """The paged full cache under continuous batching: each finished request's tokens are those of
    a plain generate of its prompt alone, and the peak's memory is the rows' horizons."""
    workload = e2e.Workload(T, G, SHAPE.vocab)
    cache = _cache(runner, SequencePolicy.window())
    result = e2e.serve(runner, cache, workload, None, queue=3, window=6, use_graphs=False, fill_steps=20)
    assert result["filled"] and result["captures"] == 0
    assert len(result["outputs"]) >= 4 and result["decode_tokens"] >= 6
    for i, tokens in result["outputs"].items():
        prompt, new = workload.request(i)
        want, _ = runner.generate([prompt], SequencePolicy.window(), None, new)
        assert torch.equal(tokens, want[0]), i
    report = result["report"]
    assert report.slots_budget * SLOT <= report.kv_allocated == report.paged_full <= POOL
    assert report.pages * SLOT * S == report.kv_allocated


def test_row_reports_what_the_caches_hold(runner):
    workload = e2e.Workload(T, G, SHAPE.vocab)
    settings = SqueezeSettings.squeeze(b_init=0.3, p=e2e.SQUEEZE_P)
    row, result = e2e.run_row(runner, SHAPE, workload, e2e.POLICIES["h2o"], settings, POOL, S, None, 4, False)
    report, peak = result["report"], result["peak_batch"]
    assert row["peak_batch"] == peak and row["requests"] == len(result["outputs"]) and row["filled"] == "yes"
    assert row["held_MiB_seq"] * e2e.MIB * peak == pytest.approx(report.slots_budget * SLOT)
    assert row["alloc_MiB_seq"] * e2e.MIB * peak == pytest.approx(report.kv_allocated)
    assert row["alloc_vs_full"] == pytest.approx(report.kv_allocated / report.paged_full) and row["alloc_vs_full"] < 0.6
    assert 1 <= row["alloc_vs_held"] <= 1 + S / row["mean_budget"]
    assert row["decode_tok_s"] == pytest.approx(result["decode_tokens"] / result["decode_s"])
    per_seq = SHAPE.layers * 2 * SHAPE.kv_heads * (round(row["mean_budget"]) + 1) * SHAPE.head_dim * 4
    assert row["ideal_batch"] == POOL // per_seq and row["ideal_tok_s"] > 0


def test_grid_rows_against_the_full_cache(runner):
    workload = e2e.Workload(T, G, SHAPE.vocab)
    jobs = e2e.grid([0.3], ["h2o", "streaming"])[:3]
    assert [(label, policy) for label, policy, _ in jobs] == [
        ("full", "window"), ("squeeze p0.35 30%", "h2o"), ("uniform 30%", "h2o")]
    lines = []
    rows, skipped = e2e.run_grid(runner, SHAPE, workload, jobs, POOL, S, None, 4, False, log=lines.append)
    assert skipped == [] and len(lines) == 3
    full, squeezed, uniform = rows
    assert full["x_full"] == full["ideal_x"] == 1.0 and full["alloc_vs_full"] == 1.0
    for r in (squeezed, uniform):
        assert r["peak_batch"] > full["peak_batch"] and r["held_MiB_seq"] < 0.5 * full["held_MiB_seq"]
        assert r["x_full"] == pytest.approx(r["decode_tok_s"] / full["decode_tok_s"])
        assert r["target"] == ">= 2.2x" and all(math.isfinite(r[k]) for k in ("decode_tok_s", "ideal_tok_s"))
    assert e2e.verdicts(rows)[0].startswith("h2o squeeze p0.35 30%: ")


def test_time_limit_skips_rows(runner):
    jobs = e2e.grid([0.3], ["h2o"])
    rows, skipped = e2e.run_grid(runner, SHAPE, e2e.Workload(T, G, SHAPE.vocab), jobs, POOL, S, None, 4, False,
                                 time_limit=0.0, log=lambda line: None)
    assert rows == [] and skipped == ["full", "h2o squeeze p0.35 30%", "h2o uniform 30%"]


def test_clock_leaves_captures_out():
    """A step is a capture the first time it uses a width at a table version, or when it grew the
    tables itself (DecodeGraphs captures then); past every width it runs eagerly."""
    clock = e2e.DecodeClock("cpu")
    fake = SimpleNamespace(widths=[1, 2, 4], cache=SimpleNamespace(version=7))

    def decode(tokens):
        if len(tokens) == 3 and fake.cache.version == 7:
            fake.cache.version = 9  # begin_step grew the tables: a new version, captured at once
        return tokens

    fake.decode = decode
    stand_in = clock.graphs(fake)
    for batch in (1, 1, 3, 3, 2, 5):
        stand_in.decode(torch.zeros(batch))
    assert [(b, c) for b, _, c in clock.steps] == [(1, True), (1, False), (3, True), (3, False), (2, True),
                                                   (5, False)]


def test_verdicts():
    rows = [dict(path="h2o squeeze p0.35 30%", budget=0.3, x_full=2.4), dict(path="full", budget=None, x_full=1.0),
            dict(path="h2o uniform 30%", budget=0.3, x_full=1.9), dict(path="h2o uniform 20%", budget=0.2, x_full=3)]
    assert e2e.verdicts(rows) == [
        "h2o squeeze p0.35 30%: 2.40x the paged full cache's decode tok/s vs >= 2.2x: met",
        "h2o uniform 30%: 1.90x the paged full cache's decode tok/s vs >= 2.2x: NOT met"]


def test_main_runs_on_cpu(capsys):
    e2e.main(["--quick", "--device", "cpu", "--no-transformers", "--policies", "streaming", "--window", "3",
              "--new-tokens", "4", "--prompt", "32"])
    out = capsys.readouterr().out
    assert "| streaming squeeze p0.35 30% |" in out and "| full |" in out and "total" in out


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


@pytest.mark.cuda
def test_quick_grid_on_the_gpu_runs_in_cuda_graphs():
    """The toy grid on the GPU in bf16: the decode steps replay CUDA graphs (captures left out of
    the timing), the pool fills, and the ideal bound runs in a graph too."""
    torch.manual_seed(0)
    model, _ = e2e.build_model(SHAPE, "cuda", torch.bfloat16, use_transformers=False)
    gpu_runner = LlamaRunner(model)
    jobs = e2e.grid([0.3], ["h2o", "streaming"])[:3]
    rows, skipped = e2e.run_grid(gpu_runner, SHAPE, e2e.Workload(T, G, SHAPE.vocab), jobs, POOL, S, None, 8, True,
                                 log=lambda line: None)
    assert skipped == [] and len(rows) == 3
    assert all(r["mode"] == "cuda graphs" and r["filled"] == "yes" and r["decode_tok_s"] > 0 for r in rows)
    assert all(r["ideal_tok_s"] > 0 for r in rows)
