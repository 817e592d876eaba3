"""The readable specification: every op in plain PyTorch, computed in float32/float64.

Kernels are tested against these functions; they follow the SqueezeAttention paper
(arXiv 2404.04793) and the H2O / StreamingLLM policies as docs/METHOD.md describes them.
"""
import torch

# ---- layer dimension ----

# Cosine of a zero vector: norms are clamped to COS_EPS (the convention of
# torch.nn.functional.cosine_similarity), so cos(0, v) = 0.
COS_EPS = 1e-8


def _cosine(a, b):
    """Per-row cosine similarity over the last dim, norms clamped to COS_EPS."""
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(COS_EPS) * b.norm(dim=-1).clamp_min(COS_EPS))


def add_cossim(residual, attn_out, cu_seqlens, cos_sum):
    """residual <- residual + attn_out (rounded to residual's dtype); for every sequence b,
    cos_sum[b] += sum over its tokens t of cos(old residual_t, new residual_t).

    The layer-importance measurement of SqueezeAttention (paper section 3.2): the residual
    stream entering a layer vs the same stream after the attention residual add. Returns the
    new residual in float32 (the value the norm of add_rmsnorm_cossim reads).
    """
    old = residual.to(torch.float32, copy=True)
    new = (old + attn_out.float()).to(residual.dtype)
    residual.copy_(new)
    new = new.float()
    cos = _cosine(old.double(), new.double())
    for b in range(cu_seqlens.numel() - 1):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        cos_sum[b] += cos[start:end].sum().float()
    return new


def add_rmsnorm_cossim(residual, attn_out, weight, cu_seqlens, cos_sum, eps):
    """add_cossim, then the next RMSNorm of the block on the new residual:
    out = new * rsqrt(mean(new^2) + eps) * weight, computed in float32, in residual's dtype."""
    new = add_cossim(residual, attn_out, cu_seqlens, cos_sum)
    rstd = torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + eps)
    return (new * rstd * weight.float()).to(residual.dtype)


def _optimal_groups(values, counts, k):
    """Optimal partition of the distinct sorted `values` (weights `counts`) into k contiguous
    groups, minimising the weighted within-group sum of squares. Returns the k + 1 group
    boundaries (indices into values). Ties: the smallest split wins."""
    m = len(values)
    W, S, Q = [0.0], [0.0], [0.0]
    for v, w in zip(values, counts):
        W.append(W[-1] + w)
        S.append(S[-1] + w * v)
        Q.append(Q[-1] + w * v * v)

    def cost(i, j):  # sum of squares of items [i, j) around their mean
        s = S[j] - S[i]
        return (Q[j] - Q[i]) - s * s / (W[j] - W[i])

    inf = float("inf")
    D = [[0.0] + [inf] * m] + [[inf] * (m + 1) for _ in range(k)]
    split = [[0] * (m + 1) for _ in range(k + 1)]
    for c in range(1, k + 1):
        for j in range(c, m + 1):
            for i in range(c - 1, j):
                v = D[c - 1][i] + cost(i, j)
                if v < D[c][j]:
                    D[c][j], split[c][j] = v, i
    bounds = [m]
    for c in range(k, 0, -1):
        bounds.append(split[c][bounds[-1]])
    return bounds[::-1]


def kmeans1d(x, k):
    """Exact optimal 1-D K-Means of every row of x (fp32 [B, N]) into k groups.

    Optimal 1-D clusters are contiguous in sorted order, so a DP over the sorted distinct
    values (weighted by multiplicity: equal values share a group) finds the global optimum.
    Groups are numbered 0..k-1 by ascending centroid. With m < k distinct values only m groups
    are used (labels 0..m-1) and the centroids of groups m..k-1 are NaN.
    Returns labels int32 [B, N], centroids fp32 [B, k].
    """
    B, N = x.shape
    labels = torch.empty(B, N, dtype=torch.int32)
    centroids = torch.full((B, k), float("nan"))
    for b in range(B):
        values, item, counts = torch.unique(x[b].double(), return_inverse=True, return_counts=True)
        kk = min(k, len(values))
        bounds = _optimal_groups(values.tolist(), counts.tolist(), kk)
        group_of_item = torch.empty(len(values), dtype=torch.int32)
        for g in range(kk):
            group_of_item[bounds[g]:bounds[g + 1]] = g
            members = slice(bounds[g], bounds[g + 1])
            centroids[b, g] = (values[members] * counts[members]).sum() / counts[members].sum()
        labels[b] = group_of_item[item]
    return labels, centroids


def layer_budgets(sim, base, p, k, min_budget, max_budget):
    """SqueezeAttention's per-layer budgets (the formula of the authors' code).

    sim fp32 [B, L]: mean cosine similarity of each layer (high = the layer changed little);
    base fp32 [B]: uniform budget per layer in tokens (b_init * BASE). Each row is clustered by
    kmeans1d into k groups; the top group G (label k-1, the most similar layers) gets
    floor(p * base), every other layer floor(base * (L - p|G|) / (L - |G|)), which conserves the
    total up to the floors. If G is empty or holds every layer, all layers get floor(base).
    Then max(min_budget, .) and, if given, min(max_budget[b], .).
    Returns budgets int32 [B, L], labels int32 [B, L], centroids fp32 [B, k].
    """
    B, L = sim.shape
    labels, centroids = kmeans1d(sim, k)
    budgets = torch.empty(B, L, dtype=torch.int32)
    for b in range(B):
        in_top = labels[b] == k - 1
        top = int(in_top.sum())
        base_b = base[b].double()
        if top in (0, L):
            squeezed = other = base_b.floor()
        else:
            squeezed = (p * base_b).floor()
            other = (base_b * (L - p * top) / (L - top)).floor()
        # int32 budgets: a formula past 2**31 - 1 (a huge p or base) saturates there.
        row = torch.where(in_top, squeezed, other).clamp(min_budget, 2**31 - 1)
        if max_budget is not None:
            row = row.clamp_max(int(max_budget[b]))
        budgets[b] = row.to(torch.int32)
    return budgets, labels, centroids

# ---- prefill ----


def _prefill_sequences(cu_seqlens):
    """(start, end) token range of every sequence of a packed batch."""
    cu = [int(c) for c in cu_seqlens]
    return list(zip(cu[:-1], cu[1:]))


def prefill_attention(q, k, v, cu_seqlens, max_seqlen, scale, score_queries):
    """Causal attention over packed sequences, with the probabilities materialised (small T).

    Sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]; i, j are positions inside it;
    query head h reads KV head g = h // (H // Hkv):
        p[h, i, j]   = softmax_j(scale * q_i . k_j) over keys j <= i
        out[i, h]    = sum_j p[h, i, j] v_j
        lse[i, h]    = log sum_{j <= i} exp(scale * q_i . k_j)
        scores[j, g] = sum_{h in group g} sum_{i in window} p[h, i, j]
    where the window holds every query of the sequence (score_queries == 0, H2O) or its last
    W queries (score_queries == W > 0, SnapKV's observation window); score_queries < 0 computes
    no scores (an empty [0, Hkv] tensor). max_seqlen only sizes the kernels' grids.
    q [T, H, D], k/v [T, Hkv, D] -> out [T, H, D], lse [T, H], scores [T, Hkv], all float32.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.zeros(T, H, dtype=torch.float64)
    scores = torch.zeros(T if score_queries >= 0 else 0, Hkv, dtype=torch.float64)
    for start, end in _prefill_sequences(cu_seqlens):
        n = end - start
        if n == 0:
            continue
        qs = q[start:end].double().transpose(0, 1)  # [H, n, D]
        ks = k[start:end].double().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start:end].double().transpose(0, 1).repeat_interleave(group, 0)
        logits = scale * qs @ ks.transpose(1, 2)  # [H, query, key]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        # Keys after a query get exactly 0, also when a NaN or Inf input poisons the query's row.
        p = torch.softmax(logits, -1).masked_fill(~causal, 0.0)
        out[start:end] = (p @ vs).transpose(0, 1)
        lse[start:end] = torch.logsumexp(logits, -1).T
        if score_queries >= 0:
            first = 0 if score_queries == 0 else max(n - score_queries, 0)
            mass = p[:, first:, :].sum(1)  # [H, key]
            scores[start:end] = mass.view(Hkv, group, n).sum(1).T
    return out.float(), lse.float(), scores.float()


def score_key(scores):
    """Scores as the policies compare them: NaN counts as -inf (it is kept last, evicted first)."""
    return torch.nan_to_num(scores.double(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def pooled_scores(col, pool_size, pool_mode):
    """The column scores [n] of one (sequence, KV head) pooled over neighbouring positions, as
    SnapKV selects by: position j takes the max ("max") or the mean ("avg") of the scores at
    positions j - r .. j + r inside the sequence, r = pool_size // 2 (pool_size 1: unchanged).
    NaN counts as -inf (score_key). Returns float64 [n]."""
    col = score_key(col)
    r = pool_size // 2
    if r == 0:
        return col
    n = col.shape[0]
    out = torch.empty_like(col)
    for j in range(n):
        window = col[max(j - r, 0) : min(j + r + 1, n)]
        out[j] = window.max() if pool_mode == "max" else window.mean()
    return out


def kept_positions(n, budget, policy, sinks, recent_ratio, scores=None):
    """Positions (ascending) that a cache of `budget` slots keeps of an n-token prompt: the
    set that evicting one token at a time from the full prompt would leave (scores fixed).

    window: the newest `budget`. streaming: the first `sinks`, then the newest.
    h2o: the first `sinks`, the R = floor(budget * recent_ratio) newest, and the rest of the
    budget to the highest `scores` (float [n]; NaN counts as -inf) among the others, ties to
    the larger position.
    When the protected tokens alone exceed the budget, eviction takes the oldest non-sink
    first and, once only sinks remain, the oldest sink: what is left is the sinks, then the
    newest, or only the newest `budget` sinks.
    """
    if n <= budget:
        return torch.arange(n)
    if policy == "window":
        return torch.arange(n - budget, n)
    n_sinks = min(sinks, n)
    if policy == "h2o":
        recent = int(budget * recent_ratio)  # floor: both factors are >= 0
        recent_start = max(n - recent, n_sinks)
        protected = n_sinks + (n - recent_start)
        if budget >= protected:
            newest_first = torch.arange(n_sinks, recent_start).flip(0)
            order = torch.sort(score_key(scores[newest_first]), descending=True, stable=True).indices
            heavy = newest_first[order[: budget - protected]].sort().values
            return torch.cat([torch.arange(n_sinks), heavy, torch.arange(recent_start, n)])
    if budget >= n_sinks:
        return torch.cat([torch.arange(n_sinks), torch.arange(n - (budget - n_sinks), n)])
    return torch.arange(n_sinks - budget, n_sinks)


class Row:
    """One row (a sequence, layer and KV head) of a paged KV cache, read and written through
    its block table: slot j lives at page table[j // S], offset j % S, S the page size. A page
    id outside [0, P) is no page: its slots read as empty (K and V zero, position -1, score 0)
    and writes to them are dropped. pool = (k_pages [P, S, D], v_pages, pos_pages [P, S],
    score_pages [P, S]); table: the row's int page ids [M]."""

    def __init__(self, pool, table):
        self.k_pages, self.v_pages, self.pos_pages, self.score_pages = pool
        self.table = [int(p) for p in table]
        self.P, self.S, self.D = self.k_pages.shape

    @property
    def capacity(self):
        return len(self.table) * self.S

    def _at(self, j):
        page = self.table[j // self.S]
        return (page, j % self.S) if 0 <= page < self.P else None

    def read_all(self, n):
        """(K [n, D] float64, V [n, D] float64, positions int64 [n], scores float64 [n]) of slots
        0 .. n-1, as they read."""
        j = torch.arange(n)
        page = torch.tensor(self.table, dtype=torch.int64)[j // self.S] if n else j
        on = (page >= 0) & (page < self.P)
        page, at = page.clamp(0, max(self.P - 1, 0)), j % self.S
        zero = torch.zeros(n, self.D, dtype=torch.float64)
        k = torch.where(on[:, None], self.k_pages[page, at].double().cpu(), zero) if n else zero
        v = torch.where(on[:, None], self.v_pages[page, at].double().cpu(), zero) if n else zero
        pos = torch.where(on, self.pos_pages[page, at].long().cpu(), -1) if n else j
        score = torch.where(on, self.score_pages[page, at].double().cpu(), 0.0) if n else torch.zeros(0).double()
        return k, v, pos, score

    def read(self, j):
        """(K [D] float64, V [D] float64, position, score) of slot j."""
        at = self._at(j)
        if at is None:
            zero = torch.zeros(self.D, dtype=torch.float64)
            return zero, zero, -1, 0.0
        return (self.k_pages[at].double().cpu(), self.v_pages[at].double().cpu(), int(self.pos_pages[at]),
                float(self.score_pages[at]))

    def write(self, j, k=None, v=None, pos=None, score=None):
        at = self._at(j)
        if at is None:
            return
        for pages, value in ((self.k_pages, k), (self.v_pages, v), (self.pos_pages, pos), (self.score_pages, score)):
            if value is not None:
                pages[at] = value if not isinstance(value, torch.Tensor) else value.to(pages.dtype)

    def move(self, src, dst):
        """Slot src's K, V, position and score into slot dst (as they read)."""
        k, v, pos, score = self.read(src)
        self.write(dst, k, v, pos, score)


def _rows(pool, block_table):
    """The rows of a call: {(b, g): Row} for block_table [B, Hkv, M]."""
    B, Hkv = block_table.shape[:2]
    return {(b, g): Row(pool, block_table[b, g].tolist()) for b in range(B) for g in range(Hkv)}


def compress_kv_(k, v, scores, cu_seqlens, budget, policy, sinks, recent_ratio, pool_size, pool_mode,
                 k_pages, v_pages, pos_pages, score_pages, block_table, lens):
    """Builds one layer's rows from a packed prompt, in place: per (sequence b, KV head g) the
    kept_positions() of the prompt under budget[b, g], by the column scores pooled over
    pool_size neighbours (pooled_scores), in ascending position in slots 0 .. lens[b, g] - 1,
    with their K, V, position and (pooled) score (0 when `scores` is the empty [0, Hkv]
    tensor); lens[b, g] = min(seq_len, budget[b, g]); the later slots of the row's capacity
    get position -1 and score 0, their K/V are left as they were. Writes go through the rows'
    block tables (Row).
    k/v [T, Hkv, D]; scores [T, Hkv] or [0, Hkv]; budget, lens [B, Hkv]; block_table [B, Hkv, M].
    """
    has_scores = scores.shape[0] > 0
    pool = (k_pages, v_pages, pos_pages, score_pages)
    for b, (start, end) in enumerate(_prefill_sequences(cu_seqlens)):
        n = end - start
        for g in range(k.shape[1]):
            row = Row(pool, block_table[b, g].tolist())
            keep = int(budget[b, g])
            col = pooled_scores(scores[start:end, g], pool_size, pool_mode) if has_scores else None
            kept = kept_positions(n, keep, policy, sinks, recent_ratio, col)
            for slot, p in enumerate(kept.tolist()):
                row.write(slot, k[start + p, g], v[start + p, g], p, float(col[p]) if has_scores else 0.0)
            for slot in range(len(kept), row.capacity):
                row.write(slot, pos=-1, score=0.0)
            lens[b, g] = min(n, keep)

# ---- decode ----


def _attend(q, keys, values, scale):
    """Softmax attention of the G query heads q [G, D] over keys/values [n, D] (float64): out
    [G, D] (zeros for n = 0) and the probabilities [G, n]."""
    if keys.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros(q.shape[0], 0, dtype=torch.float64)
    p = torch.softmax(scale * q @ keys.t(), dim=-1)
    return p @ values, p


def decode_attention(q, k_pages, v_pages, block_table, lens, scale, score_pages=None):
    """One query token per sequence over the first lens[b, g] slots of each of its rows.

    out[b, h] = sum_{j < lens[b, g]} p[b, h, j] V[b, g, j],
    p[b, h, :] = softmax_j(scale * q[b, h] . K[b, g, j]),   g = h // G, G = H // Hkv,
    K/V[b, g, j] read through row (b, g)'s block table (Row). A row with lens 0 gives zeros.
    With score_pages, every read slot's score += the sum of p over the G query heads of its
    KV head (H2O's accumulated attention mass). Computed in float64; out in q's dtype.
    """
    B, H, D = q.shape
    Hkv = block_table.shape[1]
    G = H // Hkv
    pool = (k_pages, v_pages, k_pages.new_zeros(k_pages.shape[:2], dtype=torch.int32),
            score_pages if score_pages is not None else k_pages.new_zeros(k_pages.shape[:2], dtype=torch.float32))
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for (b, g), row in _rows(pool, block_table).items():
        n = int(lens[b, g])
        keys, values, _, scores = row.read_all(n)
        out[b, g * G : (g + 1) * G], p = _attend(q[b, g * G : (g + 1) * G].double().cpu(), keys, values, scale)
        if score_pages is not None:
            for j, score in enumerate((scores + p.sum(0)).tolist()):
                row.write(j, score=score)
    return out.to(q.device, q.dtype)


def cache_append_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, k_new, v_new, pos):
    """Write one new token per sequence into every row of it: for row (b, g), slot lens[b, g]
    gets K/V k_new/v_new[b, g], position pos[b], score 0 (through the block table; dropped on
    no page); then lens[b, g] += 1. Every row must have a free slot."""
    pool = (k_pages, v_pages, pos_pages, score_pages)
    for (b, g), row in _rows(pool, block_table).items():
        row.write(int(lens[b, g]), k_new[b, g], v_new[b, g], int(pos[b]), 0.0)
        lens[b, g] += 1


def recent_count(budget, recent_ratio):
    """H2O's recent window: the floor(budget * recent_ratio) newest positions are protected (both
    non-negative, so int() is the floor; computed in double precision like every kernel)."""
    return int(budget * recent_ratio)


def eviction_victim(positions, scores, policy, sinks, recent):
    """The slot to evict from one row holding `positions` / `scores` (lists, one per valid
    slot, in slot order).

    window: the oldest token. streaming: the oldest token that is not a sink (position < sinks).
    h2o: the lowest score (NaN counts as -inf) among tokens that are neither sinks nor among
    the `recent` newest positions (position > max position - recent), ties -> the oldest.
    When no token qualifies (the protected set covers everything): the oldest non-sink, else
    the oldest token. Equal keys resolve to the first slot.
    """
    slots = range(len(positions))
    if policy == "window":
        candidates = list(slots)
    elif policy == "streaming":
        candidates = [j for j in slots if positions[j] >= sinks]
    else:
        newest = max(positions)
        candidates = [j for j in slots if sinks <= positions[j] <= newest - recent]
    if candidates:
        if policy == "h2o":
            key = score_key(torch.tensor(scores, dtype=torch.float64)).tolist()
            return min(candidates, key=lambda j: (key[j], positions[j], j))
        return min(candidates, key=lambda j: (positions[j], j))
    non_sinks = [j for j in slots if positions[j] >= sinks]
    return min(non_sinks or slots, key=lambda j: (positions[j], j))


def _evict_row(row, n, keep, policy, sinks, recent_ratio):
    """Evicts from a row holding n tokens until it holds min(n, keep): each round picks
    eviction_victim among the first n slots (as they read) and moves the last slot into it;
    the freed last slot gets position -1 and score 0. Returns the tokens kept."""
    recent = recent_count(keep, recent_ratio)
    while n > keep:
        _, _, positions, scores = row.read_all(n)
        victim = eviction_victim(positions.tolist(), scores.tolist(), policy, sinks, recent)
        last = n - 1
        if victim != last:
            row.move(last, victim)
        row.write(last, pos=-1, score=0.0)
        n -= 1
    return n


def cache_evict_(k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, policy, sinks, recent_ratio):
    """Evict, per row (b, g), one token at a time while lens[b, g] > budget[b, g] (_evict_row);
    then lens[b, g] = min(lens[b, g], budget[b, g])."""
    pool = (k_pages, v_pages, pos_pages, score_pages)
    for (b, g), row in _rows(pool, block_table).items():
        lens[b, g] = _evict_row(row, int(lens[b, g]), int(budget[b, g]), policy, sinks, recent_ratio)


def decode_step_(q, k_new, v_new, pos, k_pages, v_pages, pos_pages, score_pages, block_table, lens, budget, scale,
                 policy, sinks, recent_ratio, accumulate_scores):
    """One decode step of one layer, per row (b, g) holding n = lens[b, g] tokens: the G query
    heads of KV head g attend over the row's n cached slots and the new token (k_new/v_new[b,
    g], taken from the inputs), the new token is written into slot n (position pos[b]; dropped
    on no page), with accumulate_scores every cached slot's score += its probability summed
    over the G heads and the new slot's score = the new token's (else 0), lens = n + 1, and
    the row is evicted to budget[b, g] (cache_evict_). Where slot n lies on a page this equals
    cache_append_, decode_attention and cache_evict_ in sequence. Returns out [B, H, D]."""
    B, H, D = q.shape
    Hkv = block_table.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, D, dtype=torch.float64)
    pool = (k_pages, v_pages, pos_pages, score_pages)
    for (b, g), row in _rows(pool, block_table).items():
        n = int(lens[b, g])
        keys, values, _, scores = row.read_all(n)
        keys = torch.cat([keys, k_new[b, g].double().cpu()[None]])
        values = torch.cat([values, v_new[b, g].double().cpu()[None]])
        out[b, g * G : (g + 1) * G], p = _attend(q[b, g * G : (g + 1) * G].double().cpu(), keys, values, scale)
        mass = p.sum(0)
        if accumulate_scores:
            for j, score in enumerate((scores + mass[:n]).tolist()):
                row.write(j, score=score)
        row.write(n, k_new[b, g], v_new[b, g], int(pos[b]), float(mass[n]) if accumulate_scores else 0.0)
        lens[b, g] = _evict_row(row, n + 1, int(budget[b, g]), policy, sinks, recent_ratio)
    return out.to(q.device, q.dtype)
