"""Engine layer: policies and settings as data, the page pool, the paged cache (admission,
forks, reservations, decode steps, retirement, refusals) and its byte accounting."""
import pytest
import torch

from squeeze_ops import reference
from squeeze_ops.engine.allocators import Fixed, SimilarityWeighted, Uniform
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.engine.planner import plan_budgets
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings, prefill_needs
from squeeze_ops.engine.pool import PagePool, PoolExhausted
from squeeze_ops.vocabulary import DEFAULT_K, DEFAULT_P

L, HKV, D, GROUP = 5, 2, 16, 2
POLICIES = [SequencePolicy.window(), SequencePolicy.streaming(2), SequencePolicy.h2o(),
            SequencePolicy.h2o(sinks=1, score_queries=4, pool_size=3, pool_mode="avg")]


def test_policies_are_plain_data():
    assert SequencePolicy.streaming() == SequencePolicy("streaming", sinks=4)
    assert SequencePolicy("streaming").sinks == 4 and SequencePolicy("h2o").sinks == 0
    assert SequencePolicy.h2o().recent_ratio == 0.5 and SequencePolicy.h2o().needs_scores
    assert not SequencePolicy.window().needs_scores
    assert [SequencePolicy.window().min_budget, SequencePolicy.streaming(4).min_budget,
            SequencePolicy.h2o().min_budget] == [1, 5, 2]
    assert "max-pooled over 5" in SequencePolicy.h2o(pool_size=5).describe()
    for bad in (dict(kind="lru"), dict(sinks=-1), dict(recent_ratio=1.5), dict(score_queries=-2),
                dict(pool_size=4), dict(pool_mode="sum")):
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
    with pytest.raises(TypeError, match="^allocator:"):
        SqueezeSettings(b_init=0.2, allocator="uniform")


def test_settings_name_the_field_of_a_wrong_type_or_value():
    for bad in (dict(b_init="0.2"), dict(b_init=True), dict(base_tokens="64")):
        with pytest.raises(TypeError, match=f"^{next(iter(bad))}:"):
            SqueezeSettings(**bad)
    for bad in (dict(b_init=float("inf")), dict(b_init=float("nan")), dict(base_tokens=float("inf"))):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}:"):
            SqueezeSettings(**bad)
    for bad in (dict(p="0.3"), dict(k=2.5), dict(k="3")):
        with pytest.raises(TypeError, match=f"^{next(iter(bad))}:"):
            SqueezeSettings.squeeze(b_init=0.2, **bad)
    with pytest.raises(ValueError, match="^p:"):
        SqueezeSettings.squeeze(b_init=0.2, p=float("inf"))
    with pytest.raises(TypeError, match="^recent_ratio:"):
        SequencePolicy.h2o(recent_ratio="0.5")
    with pytest.raises(TypeError, match="^gamma:"):
        SimilarityWeighted(gamma="1")


# ---- the pool ----

def test_pool_hands_out_free_pages_only_and_refuses_when_short():
    pool = PagePool(6, 4, D, torch.float32, "cpu")
    a = pool.allocate(4)
    assert sorted(a) == [0, 1, 2, 3] and pool.free_pages == 2
    with pytest.raises(PoolExhausted, match="3 pages needed, 2 of 6 free"):
        pool.allocate(3)
    assert pool.free_pages == 2  # a refusal takes nothing
    pool.pos[a[0]] = 7
    pool.release(a[:1])
    b = pool.allocate(3)
    assert a[0] in b and not set(b) & set(a[1:])  # never a live page
    assert (pool.pos[a[0]] == -1).all()  # released pages come back cleared


# ---- the cache ----

def test_a_grown_pool_keeps_its_pages_and_hands_out_the_new_ones_last():
    pool = PagePool(3, 2, D, torch.float32, "cpu")
    held = pool.allocate(2)
    pool.k[held] = 1.0
    pool.pos[held] = 7
    pool.grow(4)
    assert pool.num_pages == 7 and pool.free_pages == 5 and (pool.k[held] == 1.0).all() and (pool.pos[held] == 7).all()
    assert (pool.pos[3:] == -1).all() and (pool.score[3:] == 0).all()
    assert pool.allocate(5) == [2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="^count"):
        pool.grow(-1)


def _record(lens, dtype=torch.float32, scores=True, observe=0, policy=None):
    """A prefill record with random prompt K/V, scores and similarity sums; its needs are those
    of `policy` when given."""
    needs = prefill_needs(policy) if policy is not None else PrefillNeeds(0 if scores else -1, observe)
    record = PrefillRecord.start(lens, L, "cpu", needs)
    total = sum(lens)
    for _ in range(L):
        s = torch.rand(total, HKV) * 4 if scores else torch.empty(0, HKV)
        record.add_layer(torch.randn(total, HKV, D, dtype=dtype), torch.randn(total, HKV, D, dtype=dtype), s)
        if observe:
            record.observed.append(torch.rand(total, HKV))
    record.cos_sum.copy_(torch.rand(L, 1) * torch.tensor(lens, dtype=torch.float32))
    return record


def _prompt_of(record, b, layer):
    start, end = record.cu_seqlens[b].item(), record.cu_seqlens[b + 1].item()
    return record.keys[layer][start:end], record.values[layer][start:end], record.scores[layer][start:end]


def _row(cache, b, layer, h):
    """(positions, K, V, scores) that row (b, layer, h) holds, in slot order."""
    row = reference.Row(cache.pool.tensors, cache.tables[layer, b, h].tolist())
    k, v, pos, score = row.read_all(int(cache.lens[layer, b, h]))
    return pos, k, v, score


def _pool(pages=400, page_size=4, dtype=torch.float32):
    return PagePool(pages, page_size, D, dtype, "cpu")


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_rows_hold_their_budget_in_their_own_pages(page_size):
    lens = [9, 4, 13]
    record = _record(lens)
    settings = [SqueezeSettings.squeeze(base_tokens=5, p=0.5), SqueezeSettings.uniform(base_tokens=3), None]
    cache = SqueezeKVCache(_pool(page_size=page_size), L, HKV, SequencePolicy.h2o())
    ids = cache.admit(record, settings, max_new_tokens=6)
    assert ids == [0, 1, 2] and cache.batch == 3
    horizon = torch.tensor(lens) + 6
    budgets = cache.row_budget[:, :3]
    owned = [p for seq in cache._seqs for pages in seq.pages.values() for p in pages]
    assert len(owned) == len(set(owned)) == cache.pool.num_pages - cache.pool.free_pages  # no page shared
    for b, seq in enumerate(cache._seqs):
        for (layer, h), pages in seq.pages.items():
            budget = int(budgets[layer, b, h])
            slots = int(horizon[b]) if budget >= horizon[b] else budget + 1
            assert len(pages) == -(-slots // page_size)
            assert cache.tables[layer, b, h, : len(pages)].tolist() == pages
            assert (cache.tables[layer, b, h, len(pages):] == -1).all()
    assert (budgets[:, 2] == 13 + 6).all()  # the full cache
    assert (budgets[:, 1] == 3).all() and cache.lens[:, 1].max() == 3


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_admission_compresses_every_layer_and_forks_prompts(policy):
    lens = [11, 6]
    record = _record(lens, policy=policy)
    settings = SqueezeSettings.uniform(base_tokens=5)
    forked = SqueezeKVCache.build(record, policy, settings, 3, source=[1, 0, 1])
    assert forked.lens.tolist() == [[[5] * HKV] * 3] * L
    for layer in range(L):
        for row, b in ((0, 1), (1, 0), (2, 1)):
            k, v, s = _prompt_of(record, b, layer)
            for h in range(HKV):
                col = reference.pooled_scores(s[:, h], policy.pool_size, policy.pool_mode)
                want = reference.kept_positions(lens[b], 5, policy.kind, policy.sinks, policy.recent_ratio, col)
                pos, keys, values, scores = _row(forked, row, layer, h)
                assert pos.tolist() == want.tolist()
                assert torch.equal(keys.float(), k[want, h]) and torch.equal(values.float(), v[want, h])
                if policy.needs_scores:
                    torch.testing.assert_close(scores.float(), col[want].float())
    if policy.kind == "window":
        assert _row(forked, 0, 0, 0)[0].tolist() == [1, 2, 3, 4, 5]  # newest 5 of 6


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
@pytest.mark.parametrize("settings", [SqueezeSettings.uniform(b_init=0.4),
                                      SqueezeSettings(b_init=0.3, allocator=SimilarityWeighted(cap=2.0)),
                                      SqueezeSettings.squeeze(b_init=0.3, p=0.5)], ids=["uniform", "weighted", "squeeze"])
def test_a_reservation_holds_what_the_record_path_holds(policy, settings):
    """Compressing each layer into reserved rows at its staging budget as the prefill goes, then
    evicting to the plan, leaves every row as compressing the full prompt to the plan does (the
    kept sets are nested); the surplus pages go back."""
    lens = [23, 9, 31]
    record = _record(lens, policy=policy)
    direct = SqueezeKVCache(_pool(), L, HKV, policy)
    direct.admit(record, settings, 4)
    staged = SqueezeKVCache(_pool(), L, HKV, policy)
    reserved = staged.reserve(lens, settings, 4)
    before = staged.pool.free_pages
    streamed = PrefillRecord.start(lens, L, "cpu", record.needs, reserved)
    streamed.cos_sum.copy_(record.cos_sum)
    for layer in range(L):
        streamed.add_layer(record.keys[layer], record.values[layer], record.scores[layer])
    assert not streamed.keys  # nothing kept beyond the layer at hand
    staged.admit(streamed, settings, 4)
    assert staged.pool.free_pages >= before and staged.memory().pages == direct.memory().pages
    assert torch.equal(staged.row_budget, direct.row_budget) and torch.equal(staged.lens, direct.lens)
    for b in range(3):
        for layer in range(L):
            for h in range(HKV):
                got, want = _row(staged, b, layer, h), _row(direct, b, layer, h)
                order = got[0].argsort()
                assert torch.equal(got[0][order], want[0])
                assert torch.equal(got[1][order], want[1]) and torch.equal(got[3][order], want[3])
    # The peaks: the staged rows and one layer's prompt K/V and scores, against every layer's
    # K/V and scores and the rows as planned.
    layer = max(sum(t.numel() * t.element_size() for t in (record.keys[i], record.values[i], record.scores[i]))
                for i in range(L))
    staged_pages = staged.pool.num_pages - before
    assert staged.memory().prefill_peak == staged.pool.kv_bytes(staged_pages) + layer
    assert direct.memory().prefill_peak == record.nbytes + direct.pool.kv_bytes(direct.memory().pages)


def test_reservations_check_what_is_admitted():
    lens = [8, 5]
    record = _record(lens)
    cache = SqueezeKVCache(_pool(), L, HKV, SequencePolicy.window())
    reserved = cache.reserve(lens, None, 3)
    streamed = PrefillRecord.start(lens, L, "cpu", reserved=reserved)
    for layer in range(L - 1):
        streamed.add_layer(record.keys[layer], record.values[layer], record.scores[layer])
    with pytest.raises(ValueError, match="4 of 5 layers"):
        cache.admit(streamed, None, 3)
    streamed.add_layer(record.keys[-1], record.values[-1], record.scores[-1])
    with pytest.raises(ValueError, match="reserved: all 5 layers"):
        streamed.add_layer(record.keys[-1], record.values[-1], record.scores[-1])
    with pytest.raises(ValueError, match="record: compressed into a reservation for other"):
        cache.admit(streamed, SqueezeSettings.uniform(base_tokens=2), 3)
    free = cache.pool.free_pages
    reserved.release()
    assert cache.pool.free_pages == cache.pool.num_pages > free
    with pytest.raises(ValueError, match="reserved: reserved for prompts"):
        PrefillRecord.start([8, 6], L, "cpu", reserved=cache.reserve(lens, None, 3))


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
    assert len(set(cache.planned[1].tolist())) == 1  # uniform: the same budget in every layer
    assert torch.equal(cache.planned[2], torch.full((L,), 25 + 4, dtype=torch.int32))  # full cache
    assert (cache.labels[2] == -1).all() and cache.centroids[2].isnan().all()
    assert torch.equal(cache.budgets, torch.minimum(cache.planned, torch.tensor([[44], [29], [29]])))
    assert torch.allclose(cache.similarity, (record.cos_sum / torch.tensor([40.0, 25.0])).t()[[0, 1, 1]])


def test_budgets_are_capped_at_what_a_layer_can_hold():
    record = _record([20])
    record.cos_sum[0] = 0.0  # one clearly important layer: the others are squeezed hard
    free = SqueezeKVCache.build(record, SequencePolicy.window(), SqueezeSettings.squeeze(b_init=1.2, p=0.3), 5)
    assert free.planned.max() > 25  # the faithful plan gives one layer more than it can ever hold
    assert free.budgets.max() <= 25
    assert free.diagnostics[0][0].messages and "wasted budget" in free.diagnostics[0][0].messages[0]
    with pytest.warns(UserWarning, match="wasted budget"):
        SqueezeKVCache.build(record, SequencePolicy.window(), SqueezeSettings.squeeze(b_init=1.2, p=0.3), 5, warn=True)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_decode_steps_hold_budgets_track_positions_and_stop_at_the_horizon(policy):
    lens = [9, 5]
    record = _record(lens, policy=policy)
    cache = SqueezeKVCache.build(record, policy, [SqueezeSettings.uniform(base_tokens=4), None], 6)
    for step in range(6):
        width = cache.begin_step()
        q = torch.randn(2, HKV * GROUP, D)
        for layer in range(L):
            out = cache.attend(layer, q, torch.randn(2, HKV, D), torch.randn(2, HKV, D), D ** -0.5)
            assert out.shape == (2, HKV * GROUP, D) and torch.isfinite(out).all()
        cache.advance(width)
        cache.end_step()
        assert cache.positions.tolist() == [9 + step + 1, 5 + step + 1]
        assert cache.lens[0, :2].tolist() == [[4] * HKV, [5 + step + 1] * HKV]
        assert (_row(cache, 0, 0, 0)[0].max() == 9 + step)
    assert sorted(_row(cache, 1, 0, 0)[0].tolist()) == list(range(11))  # the full cache holds everything
    with pytest.raises(ValueError, match="^max_new_tokens: sequences \\[0, 1\\]"):
        cache.begin_step()


def test_retirement_frees_pages_and_reuse_reads_nothing_stale():
    """A sequence admitted into a retired one's pages holds exactly what it holds in a fresh pool."""
    lens = [12, 7, 9]
    record = _record(lens)
    policy, settings = SequencePolicy.h2o(), SqueezeSettings.uniform(base_tokens=6)
    cache = SqueezeKVCache(_pool(pages=60), L, HKV, policy)
    first = cache.admit(record, settings, 2, source=[0, 1])
    free = cache.pool.free_pages
    cache.retire([first[0]])
    assert cache.pool.free_pages > free and cache.batch == 1 and cache.ids == [first[1]]
    assert (cache.tables[:, 1] == -1).all() and (cache.lens[:, 1] == 0).all()  # a padding row now
    (late,) = cache.admit(record, settings, 2, source=[2])
    alone = SqueezeKVCache.build(record, policy, settings, 2, source=[2])
    for layer in range(L):
        for h in range(HKV):
            got, want = _row(cache, 1, layer, h), _row(alone, 0, layer, h)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="^ids:"):
        cache.retire([first[0]])


def _decode(cache, inputs):
    """One decode step of every layer; inputs: per row (q [H, D], k [Hkv, D], v [Hkv, D]) of
    every layer. Returns the outputs [L, B, H, D]."""
    width = cache.begin_step()
    outs = []
    for layer in range(L):
        q, k, v = (torch.stack([row[layer][i] for row in inputs]) for i in range(3))
        outs.append(cache.attend(layer, q, k, v, D ** -0.5))
    cache.advance(width)
    cache.end_step()
    return torch.stack(outs)


def _step_inputs(rows):
    return [[(torch.randn(HKV * GROUP, D), torch.randn(HKV, D), torch.randn(HKV, D)) for _ in range(L)]
            for _ in range(rows)]


@pytest.mark.parametrize("policy", [SequencePolicy.h2o(), SequencePolicy.streaming(2)], ids=["h2o", "streaming"])
def test_reorder_forks_rows_that_continue_like_their_source(policy):
    """Beam search's reorder: rows [1, 1, 0] of a cache decoded 3 steps continue exactly like
    a cache that decoded sequences 1, 1, 0 from the start (admitted as forks); sequence 2's
    pages go back to the pool, the fork's pages are its own."""
    lens = [9, 6, 11]
    record = _record(lens, policy=policy)
    settings = [SqueezeSettings.uniform(base_tokens=4), None, SqueezeSettings.uniform(base_tokens=5)]
    cache = SqueezeKVCache(_pool(), L, HKV, policy)
    ids = cache.admit(record, settings, 6)
    twin = SqueezeKVCache(_pool(), L, HKV, policy)
    twin.admit(record, [settings[1], settings[1], settings[0]], 6, source=[1, 1, 0])
    for _ in range(3):
        inputs = _step_inputs(3)
        _decode(cache, inputs)
        _decode(twin, [inputs[1], inputs[1], inputs[0]])
    free, pages = cache.pool.free_pages, cache.memory().pages
    new_ids = cache.reorder(torch.tensor([1, 1, 0]))
    assert new_ids[0] == ids[1] and new_ids[2] == ids[0] and new_ids[1] not in ids
    assert cache.ids == new_ids and cache.batch == 3
    held = [sum(len(p) for p in s.pages.values()) for s in cache._seqs]
    assert cache.memory().pages == sum(held) and cache.pool.free_pages == free + pages - sum(held)
    owned = [p for s in cache._seqs for pages in s.pages.values() for p in pages]
    assert len(owned) == len(set(owned))
    for _ in range(3):
        inputs = _step_inputs(3)
        got, want = _decode(cache, inputs), _decode(twin, inputs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(cache.lens[:, :3], twin.lens[:, :3]) and torch.equal(cache.positions, twin.positions)
    for b in range(3):
        for layer in range(L):
            for h in range(HKV):
                assert all(torch.equal(x, y) for x, y in zip(_row(cache, b, layer, h), _row(twin, b, layer, h)))


def test_reorder_selects_repeats_and_refuses_before_any_change():
    lens = [8, 5]
    record = _record(lens)
    policy, settings = SequencePolicy.h2o(), SqueezeSettings.uniform(base_tokens=4)
    cache = SqueezeKVCache(_pool(pages=2 * L * HKV * 2 + 1), L, HKV, policy)  # 2 pages a row, one spare
    ids = cache.admit(record, settings, 3)
    state = [t.clone() for t in (cache.tables, cache.lens, cache.row_budget, cache.positions)]
    with pytest.raises(ValueError, match="^rows: \\[2\\]"):
        cache.reorder([0, 2])
    with pytest.raises(PoolExhausted, match="rows \\[0, 0, 1\\] need 60 pages, 1 are free and 40 held"):
        cache.reorder([0, 0, 1])  # a third sequence's pages do not fit
    after = (cache.tables, cache.lens, cache.row_budget, cache.positions)
    assert cache.ids == ids and all(torch.equal(a, b) for a, b in zip(state, after))
    assert cache.reorder([1]) == [ids[1]] and cache.batch == 1
    assert (cache.tables[:, 1] == -1).all() and (cache.lens[:, 1] == 0).all()  # a padding row now
    with pytest.raises(PoolExhausted, match="need 60 pages, 21 are free and 20 held"):
        cache.reorder([0, 0, 0])
    forks = cache.reorder([0, 0])  # the pages sequence 0 gave back hold a copy of sequence 1
    assert forks[0] == ids[1] and forks[1] not in ids and cache.batch == 2 and cache.pool.free_pages == 1
    cache.reorder([0, 1, 1], grow=True)  # 60 pages needed, 41 in the pool: it grows by 19
    assert cache.pool.num_pages == 60 and cache.pool.free_pages == 0 and cache.batch == 3
    assert cache.reorder([]) == [] and cache.pool.free_pages == cache.pool.num_pages


def test_a_full_pool_refuses_and_changes_nothing():
    lens = [30, 30]
    record = _record(lens)
    cache = SqueezeKVCache(_pool(pages=30), L, HKV, SequencePolicy.window())
    cache.admit(record, SqueezeSettings.uniform(base_tokens=4), 2, source=[0])
    tables, free = cache.tables.clone(), cache.pool.free_pages
    with pytest.raises(PoolExhausted, match="pool:"):
        cache.admit(record, None, 2, source=[1])
    with pytest.raises(PoolExhausted, match="pool:"):
        cache.reserve([30], None, 2)
    assert cache.pool.free_pages == free and cache.batch == 1 and torch.equal(cache.tables, tables)


def test_padding_rows_leave_the_batch_unchanged():
    """A decode over more rows than the batch (the width of a CUDA graph): the padding rows store
    nothing and the active rows are as in a decode over the batch alone."""
    record = _record([9, 5])
    settings = SqueezeSettings.uniform(base_tokens=4)
    plain = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 3)
    padded = SqueezeKVCache.build(record, SequencePolicy.h2o(), settings, 3)
    for mine, theirs in zip(padded.pool.tensors, plain.pool.tensors):
        mine.copy_(theirs)  # the same pages (allocation is deterministic) with the same contents
    assert torch.equal(padded.tables, plain.tables)
    q, k = torch.randn(2, HKV * GROUP, D), torch.randn(2, HKV, D)
    width = padded.begin_step(5)
    assert width == 5 and padded.tables.shape[1] >= 5 and (padded.tables[:, 2:5] == -1).all()
    for layer in range(L):
        pad = torch.randn(3, HKV * GROUP, D)
        got = padded.attend(layer, torch.cat([q, pad]), torch.cat([k, k[:1].expand(3, -1, -1)]),
                            torch.cat([k, k[:1].expand(3, -1, -1)]), D ** -0.5)
        want = plain.attend(layer, q, k, k, D ** -0.5)
        torch.testing.assert_close(got[:2], want, rtol=0, atol=0)
    assert (padded.lens[:, 2:5] == 0).all()
    for after, now in zip(padded.pool.tensors, plain.pool.tensors):
        # The same writes as the unpadded step, none from the padding (free slots hold whatever
        # torch.empty gave, NaN included, copied alike).
        torch.testing.assert_close(after, now, rtol=0, atol=0, equal_nan=True)


def test_memory_report_compares_like_with_like():
    lens = [40, 17, 63]
    record = _record(lens)
    settings = [SqueezeSettings.uniform(b_init=0.3), SqueezeSettings.uniform(b_init=0.3), None]
    cache = SqueezeKVCache(_pool(page_size=8), L, HKV, SequencePolicy.window())
    cache.admit(record, settings, 5)
    mem, pool = cache.memory(), cache.pool
    assert mem.pages == pool.num_pages - pool.free_pages
    assert mem.kv_allocated == mem.pages * 2 * 8 * D * 4 and mem.slots_allocated == mem.pages * 8
    assert mem.slots_budget == L * HKV * (12 + 5 + 68)
    assert mem.paged_full == L * HKV * (-(-45 // 8) + -(-22 // 8) + -(-68 // 8)) * 2 * 8 * D * 4
    assert mem.padded == sum(3 * HKV * (68 + 1) * 2 * D * 4 for _ in range(L))  # the full row pads them all
    assert mem.slots_allocated <= mem.slots_budget + cache.batch * L * HKV * 8  # at most one page more per row
    assert sum(mem.kv_per_layer) == mem.kv_allocated
    assert "vs paged full cache" in mem.summary()


def test_admission_rejects_bad_requests():
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
    with pytest.raises(ValueError, match="max_new_tokens"):
        SqueezeKVCache.build(record, SequencePolicy.window(), settings, [2, 3, 4])
    with pytest.raises(TypeError, match="policy"):
        SqueezeKVCache.build(record, "window", settings, 2)
    with pytest.raises(TypeError, match="settings"):
        SqueezeKVCache.build(record, SequencePolicy.window(), "uniform", 2)
    with pytest.raises(ValueError, match="prompt_lens"):
        PrefillRecord.start([3, 0], L, "cpu")
    cache = SqueezeKVCache(_pool(), L, HKV + 1, SequencePolicy.window())
    with pytest.raises(ValueError, match="record: 2 KV heads"):
        cache.admit(record, settings, 2)


def test_decode_never_reads_the_host(monkeypatch):
    record = _record([9, 4])
    cache = SqueezeKVCache.build(record, SequencePolicy.streaming(2), SqueezeSettings.uniform(b_init=0.5), 3)
    width = cache.begin_step()
    for name in ("item", "tolist", "__bool__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host read in the decode step"))
    q, k = torch.randn(2, HKV * GROUP, D), torch.randn(2, HKV, D)
    out = cache.attend(0, q, k, k, D ** -0.5)
    cache.advance(width)
    monkeypatch.undo()
    assert out.shape == (2, HKV * GROUP, D) and torch.isfinite(out).all()


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
    width = cache.begin_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(L):
            out = cache.attend(layer, q, kv, kv, D ** -0.5)
        cache.advance(width)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_a_full_row_sized_to_its_horizon_decodes_to_it():
    """A row whose budget covers its horizon owns ceil(horizon / S) pages; with the horizon on a
    page boundary its capacity is exactly its budget, and every admitted step still runs (the
    row fills up without evicting); one more is refused."""
    record = _record([13, 5])
    cache = SqueezeKVCache(_pool(page_size=4), L, HKV, SequencePolicy.h2o())
    cache.admit(record, None, 3)  # horizons 16 and 8: multiples of the page size
    assert cache.tables.shape[-1] == 4 and cache.row_budget[0, :, 0].tolist() == [16, 8]
    for _ in range(3):
        cache.begin_step()
        for layer in range(L):
            cache.attend(layer, torch.randn(2, HKV * GROUP, D), torch.randn(2, HKV, D), torch.randn(2, HKV, D), 0.25)
        cache.advance(2)
        cache.end_step()
    assert (cache.lens == torch.tensor([16, 8], dtype=torch.int32)[None, :, None]).all()
    with pytest.raises(ValueError, match="max_new_tokens"):
        cache.begin_step()
