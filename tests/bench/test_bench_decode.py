"""The decode benchmark's helpers on the CPU, so that its table compares like with like: every
layout it times holds the same K/V as the padded cache (shuffled pages included), and the
plain-PyTorch step it times against computes the op's step."""
import pytest
import torch

from bench import bench_decode
from bench.common import paged_layer

B, H, Hkv, L, D = 3, 6, 3, 40, 16
SCALE = 0.25


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, D, generator=g)
    k, v = (torch.randn(B, Hkv, L, D, generator=g) for _ in range(2))
    lens = torch.randint(0, L + 1, (B, Hkv), generator=g, dtype=torch.int32)
    return q, k, v, lens, g


@pytest.mark.parametrize("page_size", [None, 1, 16, 64])
def test_every_layout_holds_the_padded_rows(case, page_size):
    q, k, v, lens, g = case
    kp, vp, pos, sp, table = paged_layer(k, v, lens, page_size, g)
    S = L + 1 if page_size is None else page_size
    assert kp.shape[1] == S and table.shape == (B, Hkv, -(-(L + 1) // S))
    owned = (table >= 0).sum(-1)
    assert torch.equal(owned, torch.clamp(-(-(lens.long() + 1) // S), max=table.shape[2]))
    ids = table[table >= 0]
    assert ids.unique().numel() == ids.numel() == kp.shape[0]  # every page belongs to one row
    assert int((pos >= 0).sum()) == int(lens.sum())
    scores = torch.zeros(B, Hkv, L)
    want = bench_decode.torch_decode_attention(q, k, v, lens, SCALE, scores)
    torch.testing.assert_close(torch.ops.squeeze.decode_attention(q, kp, vp, table, lens, SCALE, sp), want)
    # The accumulated score of each held slot, read back through the block table.
    slot = torch.arange(L)
    page = table.long().gather(2, (slot // S).expand(B, Hkv, L))
    held = slot < lens.long()[..., None]
    torch.testing.assert_close(sp.view(-1)[(page * S + slot % S)[held]], scores[held])
    assert torch.equal(pos.view(-1)[(page * S + slot % S)[held]], slot.expand(B, Hkv, L)[held].int())


def test_plain_torch_step_is_the_op_step():
    """Three steady-state h2o steps (append, scores, one eviction per row) over the padded cache
    the plain way and by decode_step_ over its one-page-per-row view: same outputs, lens, slots."""
    g = torch.Generator().manual_seed(2)
    C = L + 1
    k, v = (torch.randn(B, Hkv, C, D, generator=g) for _ in range(2))
    lens = torch.randint(L // 2, L, (B, Hkv), generator=g, dtype=torch.int32)
    slot_pos = torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).contiguous()
    slot_pos.masked_fill_(slot_pos >= lens[..., None], -1)
    scores = torch.rand(B, Hkv, C, generator=g).masked_fill_(slot_pos < 0, 0.0)
    mine = [t.clone() for t in (k, v, slot_pos, scores, lens)]
    pages = [k.view(B * Hkv, C, D), v.view(B * Hkv, C, D), slot_pos.view(B * Hkv, C), scores.view(B * Hkv, C),
             torch.arange(B * Hkv, dtype=torch.int32).view(B, Hkv, 1), lens]
    budget = lens.clone()
    for step in range(3):
        q = torch.randn(B, H, D, generator=g)
        k_new, v_new = (torch.randn(B, Hkv, D, generator=g) for _ in range(2))
        pos = torch.full((B,), L + step, dtype=torch.int32)
        want = torch.ops.squeeze.decode_step_(q, k_new, v_new, pos, *pages, budget, SCALE, "h2o",
                                              bench_decode.SINKS, bench_decode.RECENT_RATIO, True)
        got = bench_decode.torch_decode_step(q, k_new, v_new, pos, *mine[:4], mine[4], budget, SCALE)
        torch.testing.assert_close(got, want)
        assert torch.equal(mine[4], lens) and torch.equal(mine[2], slot_pos)
        torch.testing.assert_close(mine[3], scores)
        held = slot_pos >= 0
        assert torch.equal(mine[0][held], k[held]) and torch.equal(mine[1][held], v[held])


def test_main_runs_on_cpu(capsys, monkeypatch):
    monkeypatch.setattr(bench_decode, "QUICK_SHAPES", bench_decode.QUICK_SHAPES[:1])
    bench_decode.main(["--quick"])
    out = capsys.readouterr().out
    assert "| B2 L64 H4/2 D64 | U[L/4,L] | float32 | no | step p64 |" in out
    assert "of step dense (<= 1.05:" in out and "of attn (<= 1.05:" in out and "of copy (>= 90%:" in out
