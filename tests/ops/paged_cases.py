"""Paged caches for the op tests: random, valid per the README's conventions (one layer's rows
in a shared pool, pages shuffled over the pool, slots in random order), with every slot a row
does not hold poisoned so that any read or write past lens shows; and views of what the rows
hold, read through their block tables."""
import pytest
import torch

from squeeze_ops import reference
from squeeze_ops.vocabulary import POLICIES  # noqa: F401  (re-exported for the tests)


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These cases are tiny and CI's cores are few and shared: intra-op threads would only add
    contention (test_cpu_kernel_runs_in_parallel covers the parallel path)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Cache(list):
    """[k_pages, v_pages, pos_pages, score_pages, block_table, lens] of one layer (a list, so it
    unpacks into the ops' arguments)."""

    @property
    def pool(self):
        return self[:4]

    @property
    def page_size(self):
        return self[0].shape[1]

    @property
    def capacity(self):
        return self[4].shape[2] * self.page_size

    def to(self, device):
        """A copy on `device` (always a copy, so that it can serve as the reference's state)."""
        return Cache(t.to(device, copy=True) for t in self)

    def clone(self):
        return Cache(t.clone() for t in self)


def random_cache(B, Hkv, lens, D, page_size=4, width=None, dtype=torch.float32, device="cpu", spare_pages=3,
                 position_gap=1, seed=None, reserve=0):
    """A layer of B sequences x Hkv KV heads in a pool of shuffled pages.

    lens: per row ([B][Hkv]) or per sequence ([B], every head alike) tokens held. reserve: a
    number of tokens (or an int [B, Hkv] tensor) each row must be able to hold besides. width:
    block table width M (default: enough pages for the longest row); each row owns
    ceil((max(lens, reserve) + 1) / page_size) pages (at most M), the rest of its table is -1. Row (b, g)
    holds positions 0, gap, 2 gap, ... shuffled over its slots, with distinct random scores;
    every other slot of the pool has NaN K/V, position -1 and score 0.
    """
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    lens = [[n] * Hkv if isinstance(n, int) else list(n) for n in lens]
    reserve = torch.as_tensor(reserve).expand(B, Hkv).tolist()
    owned = [[-(-(max(n, r) + 1) // page_size) for n, r in zip(row, res)] for row, res in zip(lens, reserve)]
    M = width if width is not None else max(max(row) for row in owned)
    P = sum(map(sum, owned)) + spare_pages
    perm = torch.randperm(P, generator=g).tolist()
    k = torch.full((P, page_size, D), float("nan"), dtype=dtype)
    v = torch.full((P, page_size, D), float("nan"), dtype=dtype)
    pos = torch.full((P, page_size), -1, dtype=torch.int32)
    score = torch.zeros(P, page_size)
    table = torch.full((B, Hkv, M), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            pages = [perm.pop() for _ in range(min(owned[b][h], M))]
            table[b, h, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
            n = lens[b][h]
            row = reference.Row((k, v, pos, score), table[b, h].tolist())
            order = torch.randperm(n, generator=g)
            for j in range(n):
                row.write(j, torch.randn(D, generator=g), torch.randn(D, generator=g),
                          int(order[j]) * position_gap, float(order[j]) / max(n, 1) + 0.01 * float(torch.rand(1, generator=g)))
    lens = torch.tensor(lens, dtype=torch.int32)
    return Cache(t.to(device) for t in (k, v, pos, score, table, lens))


def dense_cache(k, v, lens, slot_pos, scores):
    """The paged form of a padded cache [B, Hkv, C, D]: one page of C slots per row (the special
    case the padded layout is)."""
    B, Hkv, C, D = k.shape
    table = torch.arange(B * Hkv, dtype=torch.int32, device=k.device).view(B, Hkv, 1)
    return Cache([k.reshape(B * Hkv, C, D), v.reshape(B * Hkv, C, D), slot_pos.reshape(B * Hkv, C),
                  scores.reshape(B * Hkv, C), table, lens])


def rows(cache):
    """{(b, g): (positions [n], K [n, D], V [n, D], scores [n])} of what each row holds, in slot
    order, read through its block table."""
    cache = cache.to("cpu")
    out = {}
    B, Hkv = cache[4].shape[:2]
    for b in range(B):
        for h in range(Hkv):
            k, v, pos, score = reference.Row(cache.pool, cache[4][b, h].tolist()).read_all(int(cache[5][b, h]))
            out[(b, h)] = (pos, k, v, score)
    return out


def kept_positions(cache):
    """{(b, g): set of positions held}."""
    return {key: set(held[0].tolist()) for key, held in rows(cache).items()}


def scores_by_position(cache):
    """{(b, g, position): score} of the held slots."""
    return {(*key, p): s for key, held in rows(cache).items() for p, s in zip(held[0].tolist(), held[3].tolist())}


def assert_same_cache(got, want, score_tol=0.0):
    """Equal lens and, per row, equal slots (K, V, position, score), bit for bit (scores within
    score_tol); and the same positions and scores on every page slot (they are defined beyond
    lens too)."""
    got, want = got.to("cpu"), want.to("cpu")
    assert torch.equal(got[5], want[5]) and torch.equal(got[4], want[4])
    held = rows(got)
    for key, (p, k, v, s) in rows(want).items():
        gp, gk, gv, gs = held[key]
        assert torch.equal(gp, p), key
        torch.testing.assert_close(gs, s, rtol=score_tol, atol=score_tol)
        torch.testing.assert_close(gk, k, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(gv, v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[3], want[3], rtol=score_tol, atol=score_tol, equal_nan=True)



def expect_error(fn, tensors, match):
    """fn() raises a clear error whose message contains `match`, and leaves `tensors` untouched."""
    before = [t.clone() for t in tensors]
    with pytest.raises((ValueError, RuntimeError), match=match):
        fn()
    for t, b in zip(tensors, before):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)
