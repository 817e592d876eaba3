"""Prefill signals of the allocators that look at a request's attention, in plain PyTorch at
prefill (W x T work per query head; nothing on the decode path):

    observed_attention      column scores of the last W prompt queries (Coverage's signal)
    attention_perturbation  how far evicting a layer's prompt to b slots moves the residual
                            stream of the last W queries, at KNOTS + 1 budgets (Perturbation's)
    kept_order              the order in which a growing cache keeps a prompt's positions
    pad_observed            per-layer packed scores as [B, L, Hkv, T_max]
"""
import torch
import torch.nn.functional as F

# Budgets at which the Perturbation signal is measured: KNOTS + 1 evenly spaced fractions of the prompt.
KNOTS = 64


def perturbation_knots(prompt_lens, knots=KNOTS):
    """float64 [B, knots + 1]: the budgets floor(j * T / knots), j = 0..knots, at which the
    Perturbation signal is measured (0 and T included; repeated when T < knots)."""
    j = torch.arange(knots + 1, dtype=torch.float64, device=prompt_lens.device)
    return (prompt_lens.double()[:, None] * j / knots).floor()


def interpolate(curves, knots, at):
    """curves float64 [B, L, n] given at the non-decreasing knots [B, n], read at `at` [B, L, m]
    (within [knots[0], knots[-1]]) by linear interpolation. Returns float64 [B, L, m]."""
    B, L, n = curves.shape
    knots = knots[:, None, :].expand(B, L, n).contiguous()
    j = (torch.searchsorted(knots, at.contiguous(), right=True) - 1).clamp(0, n - 2)
    x0, x1 = knots.gather(-1, j), knots.gather(-1, j + 1)
    y0, y1 = curves.gather(-1, j), curves.gather(-1, j + 1)
    wide = x1 > x0
    step = torch.where(wide, (at - x0) / torch.where(wide, x1 - x0, torch.ones_like(x0)), torch.zeros_like(x0))
    return y0 + step.clamp(0, 1) * (y1 - y0)



def _last_query_attention(q, k, lse, start, n, observe, scale):
    """Attention probabilities of the last min(observe, n) queries of the prompt packed at
    [start, start + n): fp32 [H, W, n], causal (0 above the diagonal), from the prefill's lse;
    query head h reads KV head h // (H / Hkv)."""
    first = max(n - observe, 0)
    qs = q[start + first : start + n].float()  # [W, H, D]
    ks = k[start : start + n].float().repeat_interleave(q.shape[1] // k.shape[1], 1)  # [n, H, D]
    logits = scale * torch.einsum("ihd,jhd->hij", qs, ks)
    causal = torch.arange(n, device=q.device)[None, :] <= torch.arange(first, n, device=q.device)[:, None]
    return torch.exp(logits - lse[start + first : start + n].float().t()[:, :, None]).masked_fill(~causal, 0.0)


def observed_attention(q, k, lse, prompt_lens, observe, scale):
    """Column scores of the last `observe` queries of every prompt, from a prefill that computed
    another kind (e.g. H2O's all-query scores): the signal of the Coverage allocator.

        observed[j, g] = sum_{h in group g} sum_{i in the last W queries, i >= j}
                         exp(scale * q_i,h . k_j,g - lse[i, h])
    i.e. prefill_attention's scores with score_queries = W, recomputed for W queries per prompt
    from its lse (W x T work per head, plain PyTorch). q [T, H, D], k [T, Hkv, D] packed,
    lse fp32 [T, H] (prefill_attention's), prompt_lens: host list of the B lengths.
    Returns fp32 [T, Hkv].
    """
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    out = torch.zeros(q.shape[0], Hkv, dtype=torch.float32, device=q.device)
    start = 0
    for n in prompt_lens:
        p = _last_query_attention(q, k, lse, start, n, observe, scale)
        out[start : start + n] = p.sum(1).view(Hkv, group, n).sum(1).t()
        start += n
    return out


def kept_order(n, policy, scores=None):
    """The prompt positions of an n-token prompt in the order a growing cache keeps them:
    a cache of b slots keeps the first min(b, n) (reference.kept_positions; its kept sets are
    nested in b). int64 [G, n], one row per KV head for h2o (G = Hkv; scores fp32 [n, Hkv]
    are its column scores), one row for window and streaming (G = 1).

    window: the newest first. streaming: the sinks (newest first), then the newest others.
    h2o: each position's entry budget (the smallest b that keeps it) by bisection on b,
    membership counted as in kept_positions (sinks, floor(b * recent_ratio) newest, heavy
    hitters by score, ties to the larger position). A heavy hitter's test counts the middle
    positions evicted after it (_AheadCounter): O(n sqrt(n)) time and memory per KV head and
    bisection step, at prefill.
    """
    t = torch.arange(n, device=scores.device if scores is not None else None)
    s = min(policy.sinks, n)
    if policy.kind != "h2o":
        return torch.where(t < s, s - t, n - t + s).argsort()[None]
    if scores is None or scores.shape[0] != n:
        raise ValueError(f"scores: the h2o kept order needs the prompt's column scores [n={n}, Hkv]")
    orders = []
    for column in scores.t().double():
        ahead = _AheadCounter(column, s)

        def kept(b):  # int64 [n] budgets -> bool [n]: position i kept by a cache of b[i] slots
            recent_start = torch.clamp(n - torch.floor(b.double() * policy.recent_ratio).long(), min=s)
            protected = s + n - recent_start
            heavy = ahead.count(recent_start) < b - protected  # decides only for the middle positions
            full = (t < s) | (t >= recent_start) | heavy
            # Fewer slots than protected tokens: the sinks, then the newest (or the newest sinks).
            short = torch.where(b >= s, (t < s) | (t >= n - (b - s)), (t >= s - b) & (t < s))
            return (b >= n) | torch.where(b >= protected, full, short)

        lo, hi = torch.zeros_like(t), torch.full_like(t, n)  # not kept at lo, kept at hi
        for _ in range(n.bit_length() + 1):
            mid = (lo + hi) // 2
            inside = kept(mid)
            lo, hi = torch.where(inside, lo, mid), torch.where(inside, mid, hi)
        orders.append(hi.argsort())
    return torch.stack(orders)


class _AheadCounter:
    """For every position i of a prompt and an end R[i]: how many positions u in [s, R[i]) an
    h2o cache evicts after i (u ahead of i: a higher score, or an equal score and u > i).

    Ranks in eviction order (0 = kept longest) make that a 2-D dominance count, answered from
    per-block prefix histograms: with blocks of S ~ sqrt(n) positions, C[j, x] counts the
    positions in [s, j * S) of rank < x, and the block holding R[i] is compared directly.
    Memory (n / S + 1) x (n + 1) counts plus n x S per query, instead of an n x n matrix.
    """

    def __init__(self, column, s):
        n = column.shape[0]
        device = column.device
        # Descending score, ties to the larger position: a stable sort of the reversed column.
        by_rank = n - 1 - column.flip(0).argsort(descending=True, stable=True)
        self.rank = torch.empty_like(by_rank)
        self.rank[by_rank] = torch.arange(n, device=device)
        self.block = max(1, int(n ** 0.5))
        blocks = -(-n // self.block)
        pos = torch.arange(n, device=device)
        counted = (pos >= s).long()
        hist = torch.zeros(blocks, n + 1, dtype=torch.long, device=device)
        hist.index_put_((pos // self.block, self.rank + 1), counted, accumulate=True)
        # C[j, x]: positions in [s, j * S) with rank < x (row 0: none).
        self.prefix = F.pad(hist.cumsum(1).cumsum(0), (0, 0, 1, 0))
        self.s, self.n = s, n

    def count(self, end):
        """int64 [n]: for each position i, the positions u in [s, end[i]) ahead of i."""
        n, S = self.n, self.block
        j = end // S
        whole = self.prefix[j, self.rank]
        u = j[:, None] * S + torch.arange(S, device=end.device)  # [n, S]: the block holding end
        inside = (u < end[:, None]) & (u >= self.s)
        partial = (inside & (self.rank[u.clamp_max(n - 1)] < self.rank[:, None])).sum(1)
        return whole + partial


def attention_perturbation(q, k, v, lse, out_proj, residual, prompt_lens, policy, observe, scale, scores=None):
    """How far evicting a layer's prompt to b slots moves the residual stream, per prompt, at
    the budgets b_j = perturbation_knots(T)[j]: the signal of the Perturbation allocator.

        E[b, j] = mean over the last W queries i of  |Wo (o_i - o_i(b_j))|^2 / |x_i|^2
    o_i: query i's attention output over its whole prompt (all heads, [H * D]); o_i(b): the same
    attention restricted (and renormalised) to the b slots the policy keeps (kept_order, as
    reference.kept_positions with the prefill's scores; no slot: o_i(0) = 0); Wo the layer's
    output projection; x_i the residual stream after the attention is added (x_in + Wo o_i).
    E = 0 from b = T on (and for an empty prompt). Plain PyTorch at prefill: W x T x D work and
    W x T memory per query head, W x KNOTS output projections per prompt (and kept_order's
    O(T^1.5 log T) per KV head for h2o).
    q [T, H, D], k/v [T, Hkv, D] packed (keys after RoPE); lse fp32 [T, H] (prefill_attention's);
    out_proj [hidden, H * D] (the o_proj weight); residual [T, hidden] (x_in + attention);
    prompt_lens: host list of the B lengths; policy: the SequencePolicy; scores fp32 [T, Hkv]:
    the column scores the h2o cache is compressed with (h2o only).
    Returns fp32 [B, KNOTS + 1].
    """
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    out = torch.zeros(len(prompt_lens), KNOTS + 1, dtype=torch.float32, device=q.device)
    start = 0
    for row, n in enumerate(prompt_lens):
        if n == 0:  # nothing to evict: E = 0
            continue
        p = _last_query_attention(q, k, lse, start, n, observe, scale)  # [H, W, n]
        order = kept_order(n, policy, None if scores is None else scores[start : start + n]).to(q.device)
        kept = perturbation_knots(torch.tensor([n]), KNOTS)[0].long().to(q.device)  # slots kept at each knot
        # The kept-order positions between consecutive knots, padded to the longest segment
        # (lengths differ by at most one): segment sums by one batched product, never [W, T, D].
        width = -(-n // KNOTS)  # ceil(n / KNOTS): the longest segment
        slot = kept[:-1, None] + torch.arange(width, device=q.device)  # [KNOTS, width]
        in_segment = slot < kept[1:, None]
        slot = slot.clamp_max(n - 1)
        deltas = []
        for g in range(Hkv):
            first = order[min(g, order.shape[0] - 1)][slot]  # prompt positions [KNOTS, width]
            ph = p[g * group : (g + 1) * group].double()[..., first] * in_segment  # [group, W, KNOTS, width]
            vh = v[start : start + n, g].double()[first]  # [KNOTS, width, D]
            # Prefix sums over the segments (leading 0): the kept sums at every knot.
            mass = F.pad(ph.sum(-1).cumsum(-1), (1, 0))  # [group, W, KNOTS + 1]
            weighted = F.pad(torch.einsum("gwjs,jsd->gwjd", ph, vh).cumsum(-2), (0, 0, 1, 0))  # [.., KNOTS + 1, D]
            full = weighted[:, :, -1:] / mass[..., -1:, None]  # the last knot keeps the whole prompt
            deltas.append(full - weighted / mass.clamp_min(1e-300)[..., None])
        delta = torch.cat(deltas).permute(1, 2, 0, 3).reshape(p.shape[1], KNOTS + 1, -1)  # [W, KNOTS + 1, H * D]
        moved = delta @ out_proj.double().t()  # [W, KNOTS + 1, hidden]
        x = residual[start + n - p.shape[1] : start + n].double()  # [W, hidden]
        out[row] = (moved.pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-300)[:, None]).mean(0).float()
        start += n
    return out


def pad_observed(per_layer, prompt_lens, rows=None):
    """Per-layer packed column scores (L tensors [T_total, Hkv]) as fp32 [B, L, Hkv, T_max],
    zero past each prompt's end; rows: optional host list of prompt indices to take (forks)."""
    lens = list(prompt_lens)
    rows = list(range(len(lens))) if rows is None else list(rows)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    t_max = max(lens[i] for i in rows)
    stacked = torch.stack(per_layer).float()  # [L, T_total, Hkv]
    out = stacked.new_zeros(len(rows), stacked.shape[0], stacked.shape[2], t_max)
    for b, i in enumerate(rows):
        out[b, :, :, : lens[i]] = stacked[:, starts[i] : starts[i] + lens[i]].transpose(1, 2)
    return out

