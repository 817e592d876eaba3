"""Engine layer: policies and settings as data, the one-allocation cache layout and its byte
accounting, budget planning per sequence, prompt forking, compression and decode steps
through the ops."""
import pytest
import torch

from squeeze_ops.engine.allocators import Fixed, Uniform
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import plan_budgets
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings
from squeeze_ops.vocabulary import DEFAULT_K, DEFAULT_P

L, HKV, D = 5, 2, 16


def test_policies_are_plain_data():
    assert SequencePolicy.streaming() == SequencePolicy("streaming", sinks=4)
    assert SequencePolicy.h2o().recent_ratio == 0.5 and SequencePolicy.h2o().needs_scores
    assert not SequencePolicy.window().needs_scores
    assert [SequencePolicy.window().min_budget, SequencePolicy.streaming(4).min_budget,
            SequencePolicy.h2o().min_budget] == [1, 5, 2]
    assert SequencePolicy("streaming").sinks == 4 and SequencePolicy("h2o").sinks == 0
    for bad in (dict(kind="lru"), dict(sinks=-1), dict(recent_ratio=1.5), dict(score_queries=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SequencePolicy(**{"kind": "h2o", **bad})


def test_settings_are_plain_data():
    assert SqueezeSettings.uniform(b_init=0.2) == SqueezeSettings(b_init=0.2, allocator=Uniform())
    assert SqueezeSettings(b_init=0.2) == SqueezeSettings.squeeze(b_init=0.2, p=DEFAULT_P, k=DEFAULT_K)
    assert SqueezeSettings.uniform(base_tokens=64).is_uniform and SqueezeSettings.squeeze(b_init=0.2, p=1.0).is_uniform
    assert not SqueezeSettings.squeeze(b_init=0.2, p=0.5).is_uniform
    assert SqueezeSettings.fixed(torch.tensor([3, 4])) == SqueezeSettings(base_tokens=1, allocator=Fixed((3, 4)))
    assert len({SqueezeSettings.fixed([3, 4]), SqueezeSettings.fixed((3, 4))}) == 1  # hashable, one key
    with pytest.raises(ValueError, match="exactly one"):
        SqueezeSettings()
    with pytest.raises(ValueError, match="exactly one"):
        SqueezeSettings(b_init=0.2, base_tokens=10)
    for bad in (dict(b_init=0.0), dict(base_tokens=0)):
        with pytest.raises(ValueError):
            SqueezeSettings(**bad)
    for bad in (dict(p=0.0), dict(k=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SqueezeSettings.squeeze(b_init=0.2, **bad)


def _record(lens, dtype=torch.float32, scores=True):
    """A prefill record with random prompt K/V, scores and similarity sums."""
    record = PrefillRecord.start(lens, L, "cpu")
    record.needs = PrefillNeeds(score_queries=0 if scores else -1)
    total = sum(lens)
    for _ in range(L):
        s = torch.rand(total, HKV) * 4 if scores else torch.empty(0)
        record.add_layer(torch.randn(total, HKV, D, dtype=dtype), torch.randn(total, HKV, D, dtype=dtype), s)
    record.cos_sum.copy_(torch.rand(L, 1) * torch.tensor(lens, dtype=torch.float32))
    return record


def _prompt_of(record, b, layer):
    start, end = record.cu_seqlens[b].item(), record.cu_seqlens[b + 1].item()
    return record.keys[layer][start:end], record.values[layer][start:end]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_allocation_and_exact_byte_accounting(dtype):
    lens = [9, 4, 13]
    record = _record(lens, dtype)
    settings = [SqueezeSettings.squeeze(base_tokens=5, p=0.5), SqueezeSettings.uniform(base_tokens=3), None]
    cache = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, max_new_tokens=6)
    budgets = cache.budgets
    assert cache.capacities == (budgets.max(dim=0).values + 1).tolist()
    # Every layer's K and V are views of the one allocation, back to back, no overlap.
    base, esize = cache.kv.data_ptr(), cache.kv.element_size()
    offset = 0
    for layer, cap in enumerate(cache.capacities):
        for t in (cache.k_cache[layer], cache.v_cache[layer]):
            assert t.shape == (3, HKV, cap, D) and t.is_contiguous() and t.dtype == dtype
            assert t.untyped_storage().data_ptr() == cache.kv.untyped_storage().data_ptr()
            assert t.data_ptr() == base + offset
            offset += t.numel() * esize
        assert cache.slot_pos[layer].shape == cache.scores[layer].shape == (3, HKV, cap)
    mem = cache.memory()
    assert offset == mem.kv_total == cache.kv.untyped_storage().nbytes()
    assert mem.kv_total == sum(cap * 2 * HKV * D * esize * 3 for cap in cache.capacities) == sum(mem.kv_per_layer)
    index_bytes = cache.lens[0].untyped_storage().nbytes()
    assert all(t.untyped_storage().nbytes() == index_bytes for t in cache.lens + cache.slot_pos)
    assert mem.metadata == index_bytes + cache.scores[0].untyped_storage().nbytes()
    assert mem.full_cache == L * 3 * 2 * HKV * (13 + 6) * D * esize
    assert mem.steady == mem.kv_total + mem.metadata
    assert mem.prefill_peak == record.nbytes + mem.steady  # no fork: the record is read in place
    assert "vs full cache" in mem.summary()


def test_budgets_follow_each_sequence_settings():
    lens = [40, 25]
    record = _record(lens)
    squeeze = SqueezeSettings.squeeze(b_init=0.3, p=0.5)
    settings = [squeeze, SqueezeSettings.uniform(b_init=0.3), None]
    cache = SqueezeKVCache.build(record, SequencePolicy.window(), settings, max_new_tokens=4, source=[0, 1, 1])
    direct, labels, _, _ = plan_budgets(record.cos_sum[:, :1].contiguous(), torch.tensor([40], dtype=torch.int32),
                                        b_init=0.3, p=0.5, k=3, min_budget=1)
    assert torch.equal(cache.planned[0], direct[0].to(torch.int32))
    assert torch.equal(cache.labels[0], labels[0].to(torch.int32))
    uniform, _, _, _ = plan_budgets(record.cos_sum[:, 1:].contiguous(), torch.tensor([25], dtype=torch.int32),
                                    b_init=0.3, p=1.0, k=3, min_budget=1)
    assert torch.equal(cache.planned[1], uniform[0].to(torch.int32))
    assert len(set(cache.planned[1].tolist())) == 1  # p = 1: the same budget in every layer
    assert torch.equal(cache.planned[2], torch.full((L,), 25 + 4, dtype=torch.int32))  # full cache
    assert (cache.labels[2] == -1).all() and cache.centroids[2].isnan().all()
    assert torch.equal(cache.budgets, torch.minimum(cache.planned, torch.tensor([[44], [29], [29]])))
    assert torch.allclose(cache.similarity, (record.cos_sum / torch.tensor([40.0, 25.0])).t()[[0, 1, 1]])


def test_budgets_are_capped_at_what_a_layer_can_hold():
    record = _record([20])
    record.cos_sum[0] = 0.0  # one clearly important layer: the others are squeezed hard
    free = SqueezeKVCache.build(record, SequencePolicy.window(), SqueezeSettings.squeeze(b_init=1.2, p=0.3), 5)
    assert free.planned.max() > 25  # the faithful plan gives one layer more than it can ever hold
    assert free.budgets.max() <= 25 and free.capacities == (free.budgets.max(0).values + 1).tolist()
    assert free.diagnostics[0].messages and "wasted budget" in free.diagnostics[0].messages[0]
    with pytest.warns(UserWarning, match="wasted budget"):
        SqueezeKVCache.build(record, SequencePolicy.window(), SqueezeSettings.squeeze(b_init=1.2, p=0.3), 5, warn=True)


@pytest.mark.parametrize("policy", [SequencePolicy.window(), SequencePolicy.streaming(2), SequencePolicy.h2o()])
def test_build_compresses_every_layer_and_forks_prompts(policy):
    lens = [11, 6]
    record = _record(lens)
    settings = SqueezeSettings.uniform(base_tokens=5)
    forked = SqueezeKVCache.build(record, policy, settings, 3, source=[1, 0, 1])
    plain = SqueezeKVCache.build(record, policy, settings, 3)
    assert forked.memory().prefill_peak > forked.memory().steady + record.nbytes  # the forked copy counts
    for layer in range(L):
        assert forked.lens[layer].tolist() == [5, 5, 5]
        for row, b in ((0, 1), (1, 0), (2, 1)):
            held = forked.slot_pos[layer][row]
            assert torch.equal(held, plain.slot_pos[layer][b])
            k, v = _prompt_of(record, b, layer)
            for h in range(HKV):
                pos = held[h, :5].long()
                assert torch.equal(forked.k_cache[layer][row, h, :5], k[pos, h])
                assert torch.equal(forked.v_cache[layer][row, h, :5], v[pos, h])
            assert (held[:, 5:] == -1).all()
    if policy.kind == "window":
        assert forked.slot_pos[0][0, 0, :5].tolist() == [1, 2, 3, 4, 5]  # newest 5 of 6
        assert forked.slot_pos[0][1, 0, :5].tolist() == [6, 7, 8, 9, 10]  # newest 5 of 11


def test_full_cache_keeps_the_prompt_in_order():
    record = _record([7, 3])
    cache = SqueezeKVCache.build(record, SequencePolicy.window(), None, 2)
    assert cache.capacities == [10] * L
    for layer in range(L):
        assert cache.lens[layer].tolist() == [7, 3]
        for b, n in enumerate([7, 3]):
            k, _ = _prompt_of(record, b, layer)
            assert torch.equal(cache.slot_pos[layer][b, :, :n], torch.arange(n, dtype=torch.int32).expand(HKV, n))
            assert torch.equal(cache.k_cache[layer][b, :, :n], k.transpose(0, 1))


@pytest.mark.parametrize("policy", [SequencePolicy.window(), SequencePolicy.streaming(2), SequencePolicy.h2o()])
def test_decode_steps_hold_budgets_and_track_positions(policy):
    lens = [9, 5]
    record = _record(lens)
    cache = SqueezeKVCache.build(record, policy, [SqueezeSettings.uniform(base_tokens=4), None], 6)
    heads = 2 * HKV
    for step in range(6):
        q = torch.randn(2, heads, D)
        out = cache.attend(0, q, torch.randn(2, HKV, D), torch.randn(2, HKV, D), D ** -0.5)
        assert out.shape == (2, heads, D) and torch.isfinite(out).all()
        for layer in range(1, L):  # the other layers see the same token
            cache.attend(layer, q, torch.randn(2, HKV, D), torch.randn(2, HKV, D), D ** -0.5)
        cache.advance()
        assert cache.positions.tolist() == [9 + step + 1, 5 + step + 1]
        assert cache.lens[0].tolist() == [4, 5 + step + 1]
        newest = cache.slot_pos[0][0].max(dim=1).values
        assert (newest == 9 + step).all()
    assert cache.slot_pos[0][1, :, :11].sort(dim=1).values.tolist() == [list(range(11))] * HKV


def test_build_rejects_bad_requests():
    record = _record([6, 4], scores=False)
    settings = SqueezeSettings.uniform(base_tokens=3)
    with pytest.raises(ValueError, match="record: the prefill recorded"):
        SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 2)
    with pytest.raises(ValueError, match="source"):
        SqueezeKVCache.build(record, SequencePolicy.window(), settings, 2, source=[0, 2])
    with pytest.raises(ValueError, match="settings"):
        SqueezeKVCache.build(record, SequencePolicy.window(), [settings], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SqueezeKVCache.build(record, SequencePolicy.window(), settings, -1)
    with pytest.raises(TypeError, match="policy"):
        SqueezeKVCache.build(record, "window", settings, 2)
    with pytest.raises(ValueError, match="prompt_lens"):
        PrefillRecord.start([3, 0], L, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("settings", [SqueezeSettings.squeeze(b_init=0.3, p=0.5), SqueezeSettings.fixed([[3, 9]] * L)],
                         ids=["per-layer", "per-head"])
def test_decode_step_never_syncs_on_gpu(settings):
    record = _record([33, 17], dtype=torch.float16)
    for name in ("keys", "values", "scores"):
        setattr(record, name, [t.cuda() for t in getattr(record, name)])
    record.cu_seqlens, record.cos_sum = record.cu_seqlens.cuda(), record.cos_sum.cuda()
    cache = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 4)
    q, kv = torch.randn(2, 2 * HKV, D, device="cuda", dtype=torch.float16), torch.randn(2, HKV, D, device="cuda",
                                                                                       dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(L):
            out = cache.attend(layer, q, kv, kv, D ** -0.5)
        cache.advance()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
