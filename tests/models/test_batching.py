"""Continuous batching on the page pool with a tiny random Llama: sequences admitted and retired
in the middle of decoding get exactly the tokens and logits they get alone; a full pool queues
requests and refuses the impossible ones; stop tokens; padded decode widths; CUDA graphs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from squeeze_ops.engine.allocators import CalibratedHeads, HeadGains, SimilarityWeighted  # noqa: E402
from squeeze_ops.engine.batching import ContinuousBatcher, DecodeGraphs  # noqa: E402
from squeeze_ops.engine.cache import SqueezeKVCache  # noqa: E402
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings  # noqa: E402
from squeeze_ops.engine.pool import PagePool, PoolExhausted  # noqa: E402
from squeeze_ops.models.llama import LlamaRunner  # noqa: E402

L, H, HKV, D = 4, 6, 2, 16


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=112, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=HKV, head_dim=D, max_position_embeddings=256, rms_norm_eps=1e-5)
    return LlamaRunner(transformers.LlamaForCausalLM(config).eval())


def heads_allocator():
    values = tuple(tuple(float((3 * layer + h) % 5) for h in range(HKV)) for layer in range(L))
    return CalibratedHeads(HeadGains("tiny", L, HKV, "h2o", 0.3, values))


def requests():
    g = torch.Generator().manual_seed(3)
    settings = [None, SqueezeSettings(b_init=0.5, allocator=SimilarityWeighted(cap=2.0)),
                SqueezeSettings.uniform(b_init=0.3), SqueezeSettings(b_init=0.4, allocator=heads_allocator()),
                SqueezeSettings.squeeze(b_init=0.4, p=0.5)]
    return [(torch.randint(0, 101, (n,), generator=g), s, m)
            for n, s, m in zip([13, 30, 7, 21, 40], settings, [5, 9, 3, 12, 4])]


def alone(runner, policy, prompt, settings, steps):
    """Logits [steps, V] of one sequence decoded alone, greedy from its prefill."""
    cache, _, first = runner.start([prompt], policy, settings, steps)
    logits = [first[0]]
    for _ in range(steps):
        logits.append(runner.decode(cache, logits[-1].argmax()[None])[0])
    return torch.stack(logits)


@pytest.mark.parametrize("policy", [SequencePolicy.h2o(), SequencePolicy.streaming(2),
                                    SequencePolicy.h2o(score_queries=8, pool_size=3)], ids=lambda p: p.describe())
def test_admitting_and_retiring_mid_decode_changes_nobody(runner, policy):
    """Sequences admitted while others decode, and others retired under them, see exactly the
    logits they see alone (fp32, CPU): every row is computed from its own pages."""
    reqs = requests()
    want = [alone(runner, policy, p, s, 6) for p, s, _ in reqs]
    pool = PagePool(400, 4, D, torch.float32, "cpu")
    cache = SqueezeKVCache(pool, L, HKV, policy)
    got = {}
    last = {}

    def admit(which):
        _, ids, first = runner.start([reqs[i][0] for i in which], policy, [reqs[i][1] for i in which], 6, cache=cache)
        for i, seq, logits in zip(which, ids, first):
            got[i], last[seq] = [logits], i

    def step():
        tokens = torch.stack([got[last[seq]][-1].argmax() for seq in cache.ids])
        for seq, logits in zip(cache.ids, runner.decode(cache, tokens)):
            got[last[seq]].append(logits)

    admit([0, 1])
    step()
    step()
    admit([2, 3])
    step()
    cache.retire([seq for seq, i in last.items() if i == 0])
    step()
    admit([4])
    while cache.batch:
        step()
        done = [seq for seq in cache.ids if len(got[last[seq]]) == 7]
        cache.retire(done)
    assert pool.free_pages == pool.num_pages
    for i, logits in got.items():
        n = len(logits)
        torch.testing.assert_close(torch.stack(logits), want[i][:n], rtol=1e-5, atol=1e-5)


def test_batcher_queues_what_the_pool_cannot_hold_and_matches_alone(runner):
    policy = SequencePolicy.h2o()
    reqs = requests()
    want = [runner.generate([p], policy, s, m)[0][0] for p, s, m in reqs]
    pool = PagePool(90, 8, D, torch.float32, "cpu")
    batcher = ContinuousBatcher(runner, SqueezeKVCache(pool, L, HKV, policy))
    ids = [batcher.submit(p, s, m) for p, s, m in reqs]
    seen_queue = False
    while batcher.queue or batcher.running:
        batcher.step()
        seen_queue |= bool(batcher.queue) and bool(batcher.running)
    assert seen_queue  # some requests had to wait for pages
    assert pool.free_pages == pool.num_pages
    for i, rid in enumerate(ids):
        assert torch.equal(batcher.finished[rid], want[i]), i
    with pytest.raises(PoolExhausted, match="needs .* pages, the pool has 90"):
        batcher.submit(torch.zeros(500, dtype=torch.long), None, 8)


def test_batcher_stops_at_a_stop_token(runner):
    policy = SequencePolicy.window()
    prompt = torch.arange(12)
    tokens = runner.generate([prompt], policy, None, 8)[0][0]
    stop = int(tokens[3])
    first = tokens.tolist().index(stop)
    batcher = ContinuousBatcher(runner, SqueezeKVCache(PagePool(100, 4, D, torch.float32, "cpu"), L, HKV, policy))
    rid = batcher.submit(prompt, None, 8, stop=(stop,))
    assert batcher.run()[rid].tolist() == tokens[: first + 1].tolist()


def test_a_padded_decode_width_equals_the_batch(runner):
    """runner.decode over more rows than the batch (padding rows, as a CUDA graph replays them)
    gives the batch's logits and leaves its rows as a decode of the batch alone does."""
    policy = SequencePolicy.h2o()
    prompts = [torch.arange(15), torch.arange(9)]
    plain, _, first = runner.start(prompts, policy, SqueezeSettings.uniform(b_init=0.5), 3)
    padded, _, _ = runner.start(prompts, policy, SqueezeSettings.uniform(b_init=0.5), 3)
    tokens = first.argmax(-1)
    want = runner.decode(plain, tokens)
    got = runner.decode(padded, torch.cat([tokens, torch.zeros(3, dtype=torch.long)]))
    torch.testing.assert_close(got[:2], want, rtol=1e-5, atol=1e-5)  # the dense layers' sums may reorder
    assert torch.equal(padded.lens[:, :2], plain.lens[:, :2]) and (padded.lens[:, 2:5] == 0).all()
    with pytest.raises(ValueError, match="^tokens: expected one per active sequence"):
        runner.decode(padded, tokens[:1])


@pytest.mark.cuda
def test_cuda_graph_replay_equals_eager(runner):
    model = transformers.LlamaForCausalLM(runner_config(runner)).cuda().half().eval()
    gpu = LlamaRunner(model)
    policy = SequencePolicy.h2o()
    prompts = [torch.randint(0, 101, (n,), device="cuda") for n in (30, 17, 45)]
    settings = SqueezeSettings.uniform(b_init=0.4)
    eager_cache, _, first = gpu.start(prompts, policy, settings, 8)
    graph_cache, _, _ = gpu.start(prompts, policy, settings, 8)
    graphs = DecodeGraphs(gpu, graph_cache, widths=(4, 8))
    tokens = first.argmax(-1)
    for _ in range(6):
        want = gpu.decode(eager_cache, tokens)
        got = graphs.decode(tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        tokens = want.argmax(-1)


def runner_config(runner):
    return transformers.LlamaConfig(
        vocab_size=101, hidden_size=96, intermediate_size=112, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=HKV, head_dim=D, max_position_embeddings=256, rms_norm_eps=1e-5)
