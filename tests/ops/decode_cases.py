"""Layer caches for the decode tests: random, valid per the README's conventions, with slots in
random order and the unused slots poisoned so that any read or write past lens shows."""
import pytest
import torch

from squeeze_ops import _checks


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These cases are tiny and CI's cores are few and shared: intra-op threads would only add
    contention (test_cpu_kernel_runs_in_parallel covers the parallel path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_cache(B, Hkv, C, D, lens, dtype=torch.float32, device="cpu", position_gap=1):
    """k_cache, v_cache, lens, slot_pos, scores. Sequence b holds lens[b] tokens at distinct positions
    (0, gap, 2 gap, ... shuffled over the slots) with distinct random scores; slots >= lens have
    slot_pos -1, score 0 and NaN K/V."""
    k = torch.full((B, Hkv, C, D), float("nan"), dtype=dtype)
    v = torch.full((B, Hkv, C, D), float("nan"), dtype=dtype)
    slot_pos = torch.full((B, Hkv, C), -1, dtype=torch.int32)
    scores = torch.zeros(B, Hkv, C)
    for b, n in enumerate(lens):
        k[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
        v[b, :, :n] = torch.randn(Hkv, n, D).to(dtype)
        for h in range(Hkv):
            slot_pos[b, h, :n] = (torch.randperm(n) * position_gap).int()
            scores[b, h, :n] = torch.randperm(n).float() / max(n, 1) + 0.01 * torch.rand(n)
    lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (k, v, lens, slot_pos, scores)]


def clone_all(tensors):
    return [t.clone() for t in tensors]


def valid_view(cache):
    """What a cache holds by contract: lens, and per (sequence, head) the K/V/slot_pos/score of the
    valid slots, plus slot_pos and scores everywhere (they are defined beyond lens too)."""
    k, v, lens, slot_pos, scores = cache
    rows = []
    for b, n in enumerate(lens.tolist()):
        rows += [k[b, :, :n], v[b, :, :n]]
    return [lens, slot_pos, scores] + rows


def assert_same_cache(got, want):
    for g, w in zip(valid_view(got), valid_view(want)):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0, equal_nan=True)


def kept_positions(lens, slot_pos):
    """{(b, h): set of positions held}."""
    return {(b, h): set(slot_pos[b, h, :n].tolist()) for b, n in enumerate(lens.tolist())
            for h in range(slot_pos.shape[1])}


def scores_by_position(lens, slot_pos, scores):
    """{(b, h, position): score} for the valid slots."""
    out = {}
    for b, n in enumerate(lens.tolist()):
        for h in range(slot_pos.shape[1]):
            for p, s in zip(slot_pos[b, h, :n].tolist(), scores[b, h, :n].tolist()):
                out[(b, h, p)] = s
    return out


def expect_error(fn, tensors, match):
    """fn() raises a clear error whose message contains `match`, and leaves `tensors` untouched."""
    before = clone_all(tensors)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn()
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


POLICIES = _checks.POLICIES
