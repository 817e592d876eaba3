"""The engine-facing KV cache of SqueezeAttention: sequences whose every (layer, KV head) row
holds its own budget of tokens in pages of one PagePool, admitted and retired between decode
steps while the others keep decoding.

    prefill, per layer l (runner):                      PrefillRecord
        prefill_attention (+ column scores)       ->    the layer's K/V, or, with a reservation,
                                                        compress_kv_ into the reserved rows at
                                                        the largest budget the allocator can give
        add_rmsnorm_cossim (attention epilogue)   ->    cos_sum[l, b] += sum_t cos(x_in, x_mid)
    SqueezeKVCache.admit(record, settings, max_new_tokens):
        allocate(cos_sum, settings.allocator)     ->    budgets per (sequence, layer, KV head)
        pages for each row: ceil((budget + 1) / S)      (one host read: the page counts)
        compress_kv_ per layer (or cache_evict_ of the reserved rows to their budgets, the
        surplus pages back to the pool)
    per decode token, per layer: SqueezeKVCache.attend -> decode_step_ (append, attend, evict)
    then SqueezeKVCache.advance()                 ->    positions += 1
    SqueezeKVCache.retire(ids)                    ->    pages back to the pool

A row = (sequence, layer, KV head) owns ceil((budget + 1) / S) pages from admission to
retirement (the +1: the slot the new token takes before eviction brings the row back to its
budget), or ceil(horizon / S) when its budget covers its horizon (prompt + tokens to
generate: nothing is ever evicted). So a decode step allocates nothing. Active sequences
occupy the rows 0 .. B-1 of the device tables (retirement moves the last one into the hole);
the rows past them are padding rows (page ids -1, length and budget 0): they attend to their
own new token only and store nothing, so a CUDA graph captured at a larger batch replays
over them unchanged.

Keys are cached after RoPE at their original positions (no re-numbering inside the cache);
`positions` holds each sequence's next position explicitly, since rows hold different numbers
of tokens. A decode step reads nothing back to the host.
"""
import itertools
import warnings
from dataclasses import dataclass, field, replace

import torch

from .allocators.base import describe
from .planner import allocate, diagnose
from .policies import NO_SCORES, PrefillNeeds, SequencePolicy, prefill_needs
from .pool import PagePool, PoolExhausted
from .signals import attention_perturbation, observed_attention, pad_observed


@dataclass
class PrefillRecord:
    """What a full-attention prefill of B prompts leaves for the cache.

    prompt_lens: host list of the B prompt lengths; cu_seqlens int32 [B+1] on the device.
    cos_sum:     fp32 [L, B], per layer and prompt the sum over its tokens of cos(x_in, x_mid),
                 accumulated in place by add_rmsnorm_cossim.
    keys/values: per layer, the packed prompt K/V [T_total, Hkv, D] (keys after RoPE); empty
                 when the layers were compressed into a reservation as they came (`reserved`).
    scores:      per layer, the column scores fp32 [T_total, Hkv] the policy compresses by
                 (empty when none were computed, or when compressed into a reservation).
    observed:    per layer, column scores of each prompt's last `needs.observe` queries
                 fp32 [T_total, Hkv] (the Coverage allocator's signal; empty when not asked).
    perturbation: {SequencePolicy: per layer fp32 [B, KNOTS + 1]}, the attention_perturbation
                 curves of the last `needs.observe` queries for the policies asked.
    needs:       the PrefillNeeds this prefill recorded (the cache refuses a record that lacks
                 what its policy and settings read).
    reserved:    the Reservation whose rows took each layer's K/V, or None.
    """

    prompt_lens: list
    cu_seqlens: torch.Tensor
    cos_sum: torch.Tensor
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    observed: list = field(default_factory=list)
    needs: PrefillNeeds = PrefillNeeds()
    perturbation: dict = field(default_factory=dict)
    reserved: object = None

    @classmethod
    def start(cls, prompt_lens, num_layers, device, needs=PrefillNeeds(), reserved=None):
        """An empty record for prompts of `prompt_lens` tokens (each >= 1)."""
        prompt_lens = [int(n) for n in prompt_lens]
        if not prompt_lens or min(prompt_lens) < 1:
            raise ValueError(f"prompt_lens: expected a non-empty list of lengths >= 1, got {prompt_lens}")
        if reserved is not None and reserved.prompt_lens != prompt_lens:
            raise ValueError(f"reserved: reserved for prompts of {reserved.prompt_lens} tokens, got {prompt_lens}")
        cu = torch.zeros(len(prompt_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(prompt_lens), 0)
        cos_sum = torch.zeros(num_layers, len(prompt_lens), dtype=torch.float32, device=device)
        return cls(prompt_lens, cu.to(device), cos_sum, needs=needs, reserved=reserved)

    def add_layer(self, k, v, scores):
        """The next layer's packed K/V [T_total, Hkv, D] and column scores: kept, or compressed
        into the reservation's rows at once (then dropped: the prefill's peak holds one layer)."""
        if self.reserved is not None:
            self.reserved.compress(k, v, scores, self.cu_seqlens)
        else:
            self.keys.append(k)
            self.values.append(v)
            self.scores.append(scores)

    def attend(self, q, k, v, scale):
        """The next layer's prefill attention with what the needs ask recorded: prefill_attention
        (causal over each prompt, softmax(scale * q.k)) computing the column scores the policy
        compresses by (or, without those, the observed ones), the layer's K/V and scores added
        (add_layer), the observed scores appended when asked.
        q [T_total, H, D], k/v [T_total, Hkv, D] packed by cu_seqlens (keys after RoPE).
        Returns (out [T_total, H, D] in q's dtype, lse fp32 [T_total, H], the policy's scores
        fp32 [T_total, Hkv] or None): what add_perturbation reads."""
        needs = self.needs
        scored = needs.score_queries != NO_SCORES
        # Without policy scores, the op computes the observed ones in the same pass.
        op_queries = needs.score_queries if scored else (needs.observe or NO_SCORES)
        out, lse, col_scores = torch.ops.squeeze.prefill_attention(q, k, v, self.cu_seqlens, self.max_seqlen, scale,
                                                                   op_queries)
        self.add_layer(k, v, col_scores if scored else col_scores[:0])
        if needs.observe:
            self.observed.append(col_scores if op_queries == needs.observe
                                 else observed_attention(q, k, lse, self.prompt_lens, needs.observe, scale))
        return out, lse, (col_scores if scored else None)

    def add_perturbation(self, q, k, v, lse, scores, out_proj, residual, scale):
        """The layer's attention_perturbation curve for every policy the needs list (nothing when
        none): q, k, v, lse, scores as attend took and returned them; out_proj [hidden, H * D]
        the layer's output projection; residual [T_total, hidden] the stream after the
        attention is added."""
        for policy in self.needs.perturb:
            self.perturbation.setdefault(policy, []).append(attention_perturbation(
                q, k, v, lse, out_proj, residual, self.prompt_lens, policy, self.needs.observe, scale, scores))

    @property
    def layers_added(self):
        return self.reserved.layers if self.reserved is not None else len(self.keys)

    @property
    def num_layers(self):
        return self.cos_sum.shape[0]

    @property
    def max_seqlen(self):
        return max(self.prompt_lens)

    @property
    def similarity(self):
        """Mean cosine similarity per prompt and layer, fp32 [B, L]."""
        lens = torch.tensor(self.prompt_lens, dtype=torch.float32, device=self.cos_sum.device)
        return (self.cos_sum / lens).t()

    @property
    def nbytes(self):
        # observed[l] may be scores[l] itself (the same window): count every tensor once.
        curves = [t for per_layer in self.perturbation.values() for t in per_layer]
        unique = {id(t): t for t in self.keys + self.values + self.scores + self.observed + curves}
        return sum(_nbytes(t) for t in unique.values())


def _nbytes(t):
    return t.numel() * t.element_size()


@dataclass
class Plan:
    """The budgets of a batch of sequences and how they were planned (see _plan)."""

    budgets: torch.Tensor      # int32 [B, L, Hkv] what each row keeps (capped at its horizon)
    planned: torch.Tensor      # int32 [B, L, Hkv] the planner's budgets before the cap
    per_head: list             # host [B]: whether the sequence's plan differs per KV head
    similarity: torch.Tensor   # fp32 [B, L]
    labels: torch.Tensor       # int32 [B, L] (-1: no plan, the full cache)
    centroids: torch.Tensor    # fp32 [B, k] (NaN: no plan / empty group)
    diagnostics: list          # planner.Diagnostics of every distinct settings


def _plan(record, source, settings, horizon, policy, num_kv_heads):
    """Budgets per (sequence, layer, KV head) by each sequence's settings (sequences sharing
    settings are planned in one planner call); a per-layer plan holds for each of the layer's
    heads; the full cache (settings None) keeps its horizon T_b + max_new_tokens everywhere.
    Budgets above the horizon are capped there (such a row never evicts either way)."""
    batch, num_layers = len(source), record.num_layers
    device = record.cos_sum.device
    prompt_lens = torch.tensor([record.prompt_lens[i] for i in source], dtype=torch.int32, device=device)
    cos_sum = record.cos_sum[:, source]
    planned = horizon.view(-1, 1, 1).expand(batch, num_layers, num_kv_heads).contiguous()
    labels = torch.full((batch, num_layers), -1, dtype=torch.int32, device=device)
    per_head = [False] * batch
    plans, diagnostics = [], []
    for setting in dict.fromkeys(s for s in settings if s is not None):
        members = [i for i, s in enumerate(settings) if s == setting]
        rows = torch.tensor(members, device=device)
        needs = setting.needs
        observed = (pad_observed(record.observed, record.prompt_lens, [source[i] for i in members])
                    if needs.observe else None)
        perturbation = None
        if needs.perturbation:
            curves = torch.stack(record.perturbation[policy])  # [L, B_record, KNOTS + 1]
            perturbation = curves[:, [source[i] for i in members]].transpose(0, 1).contiguous()
        plan = allocate(
            cos_sum[:, rows].contiguous(), prompt_lens[rows], setting.allocator, b_init=setting.b_init,
            base_tokens=setting.base_tokens, horizon=horizon[rows], min_budget=policy.min_budget,
            observed=observed, policy=policy, perturbation=perturbation)
        diagnostics.append(diagnose(plan, horizon[rows], setting.allocator, sequences=members))
        budgets = plan.budgets.to(torch.int32)
        if budgets.dim() == 3 and budgets.shape[2] != num_kv_heads:
            raise ValueError(f"settings: {describe(setting.allocator)} plans {budgets.shape[2]} KV heads per layer, "
                             f"the model has {num_kv_heads}")
        planned[rows] = budgets if budgets.dim() == 3 else budgets[..., None]
        for i in members:
            per_head[i] = budgets.dim() == 3
        labels[rows] = plan.labels.to(torch.int32)
        plans.append((rows, plan.centroids))
    width = max((c.shape[1] for _, c in plans), default=1)
    centroids = torch.full((batch, width), float("nan"), dtype=torch.float32, device=device)
    for rows, cen in plans:
        centroids[rows, : cen.shape[1]] = cen
    budgets = torch.minimum(planned, horizon.view(-1, 1, 1))
    return Plan(budgets, planned, per_head, record.similarity[source], labels, centroids, diagnostics)


def _row_pages(page_size, budgets, horizon):
    """Pages of every row (int [B, L, Hkv], budgets' shape): ceil((budget + 1) / S), or
    ceil(horizon / S) for a row whose budget covers its horizon (it never evicts)."""
    horizon = horizon.view(-1, 1, 1)
    slots = torch.where(budgets >= horizon, horizon, budgets + 1)
    return (slots + page_size - 1) // page_size


def stage_budget(policy, prompt_len, setting, max_new_tokens):
    """U: the largest budget `setting`'s allocator can give a row of a prompt of prompt_len
    tokens (cap x base, at least the policy's minimum), at most the horizon; the horizon for the
    full cache (None) or an allocator without a cap."""
    horizon = prompt_len + max_new_tokens
    if setting is None or setting.needs.cap is None:
        return horizon
    base = setting.b_init * prompt_len if setting.b_init is not None else setting.base_tokens
    return min(horizon, max(policy.min_budget, int(setting.needs.cap * base)))


def _settings_list(settings, count):
    return list(settings) if isinstance(settings, (list, tuple)) else [settings] * count


def _steps_list(max_new_tokens, count):
    """max_new_tokens (an int for all, or one per sequence) as a checked list."""
    steps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * count
    if len(steps) != count or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in steps):
        raise ValueError(f"max_new_tokens: expected an int >= 0 (or one per sequence, {count}), got {max_new_tokens!r}")
    return steps


def _check_request(record, policy, settings, max_new_tokens, source):
    """Normalised (source, settings) of a request, after its checks."""
    if not isinstance(policy, SequencePolicy):
        raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
    if not isinstance(record, PrefillRecord):
        raise TypeError(f"record: expected a PrefillRecord, got {type(record).__name__}")
    num_prompts = len(record.prompt_lens)
    source = list(range(num_prompts)) if source is None else [int(i) for i in source]
    if not source or min(source) < 0 or max(source) >= num_prompts:
        raise ValueError(f"source: expected prompt indices in [0, {num_prompts}), got {source}")
    settings = _settings_list(settings, len(source))
    if len(settings) != len(source):
        raise ValueError(f"settings: expected one per sequence ({len(source)}), got {len(settings)}")
    steps = _steps_list(max_new_tokens, len(source))
    needs = prefill_needs(policy, settings)
    if not record.needs.covers(needs):
        raise ValueError(f"record: the prefill recorded {record.needs}, the policy and settings read {needs}; "
                         "prefill with needs=prefill_needs(policy, settings)")
    if record.layers_added != record.num_layers:
        raise ValueError(f"record: {record.layers_added} of {record.num_layers} layers were prefilled")
    return source, list(settings), steps


@dataclass
class MemoryReport:
    """KV memory of a SqueezeKVCache's active sequences, in bytes (pages hold K + V).

    pages:             pages the active rows own; kv_allocated: their K + V bytes
    slots_allocated:   pages x page size; slots_held: tokens the rows hold now (sum of lens);
                       slots_budget: sum of the rows' budgets (what they hold once decoding)
    paged_full:        K + V of a paged full cache of the same sequences: per sequence, L x Hkv
                       rows of ceil((prompt + max_new_tokens) / S) pages (the reference)
    padded:            K + V the padded layout would allocate: per layer, every row padded to
                       that layer's largest budget + 1
    metadata:          positions, scores (per allocated slot) and the block tables, lens, budgets
    prefill_peak:      K/V-related bytes alive at the prefill's peak: the rows at their staging
                       budgets (or the record's every layer K/V) + one layer's prompt K/V
    pool:              the whole pool (free pages included)
    kv_per_layer:      kv_allocated per layer
    """

    pages: int
    kv_allocated: int
    slots_allocated: int
    slots_held: int
    slots_budget: int
    paged_full: int
    padded: int
    metadata: int
    prefill_peak: int
    pool: int
    kv_per_layer: list

    def summary(self):
        mib = 1 << 20
        ratio = self.slots_allocated / max(self.slots_budget, 1)
        return (f"KV allocated {self.kv_allocated / mib:.2f} MiB ({self.pages} pages) for {self.slots_budget} slots "
                f"budgeted (allocated / budget {ratio:.3f}); vs paged full cache {self.paged_full / mib:.2f} MiB "
                f"({100 * self.kv_allocated / max(self.paged_full, 1):.1f}%); padded layout "
                f"{self.padded / mib:.2f} MiB; prefill peak {self.prefill_peak / mib:.2f} MiB")


class Reservation:
    """Rows reserved in a cache's pool for B prompts before their prefill: every row of sequence
    b owns pages for its staging budget U_b, the largest budget the sequence's allocator can
    give a row (cap x base, at least the policy's minimum, at most the horizon); the prefill
    compresses each layer into them as soon as its attention has run (PrefillRecord.add_layer),
    so at most one layer's full prompt K/V is alive at a time. Admission evicts every row to its
    planned budget (the kept sets are nested: compressing to U and then evicting to b keeps what
    compressing to b keeps) and gives the surplus pages back. Built by SqueezeKVCache.reserve.
    """

    def __init__(self, cache, prompt_lens, settings, max_new_tokens, stage):
        self.cache = cache
        self.prompt_lens = list(prompt_lens)
        self.settings = list(settings)
        self.max_new_tokens = _steps_list(max_new_tokens, len(prompt_lens))
        L, B, Hkv = cache.num_layers, len(prompt_lens), cache.num_kv_heads
        device = cache.device
        self.stage = torch.tensor(stage, dtype=torch.int32, device=device)  # [B]
        horizon = torch.tensor([n + g for n, g in zip(prompt_lens, self.max_new_tokens)], dtype=torch.int32)
        counts = _row_pages(cache.pool.page_size, torch.tensor(stage, dtype=torch.int32).view(B, 1, 1).expand(B, L, Hkv),
                            horizon)  # [B, L, Hkv]
        self.pages = _take(cache.pool, counts)
        self.table = _table(self.pages, counts, device)  # [L, B, Hkv, M]
        self.lens = torch.zeros(L, B, Hkv, dtype=torch.int32, device=device)
        self.layers = 0  # layers compressed so far
        self.transient = 0  # the largest layer's prompt K/V + scores, seen while staging

    def compress(self, k, v, scores, cu_seqlens):
        """The next layer's packed prompt K/V and scores into its rows, at the staging budgets."""
        if self.layers == self.cache.num_layers:
            raise ValueError(f"reserved: all {self.layers} layers are already compressed")
        policy, pool = self.cache.policy, self.cache.pool
        budget = self.stage[:, None].expand(len(self.prompt_lens), self.cache.num_kv_heads).contiguous()
        torch.ops.squeeze.compress_kv_(k, v, scores, cu_seqlens, budget, policy.kind, policy.sinks,
                                       policy.recent_ratio, policy.pool_size, policy.pool_mode, *pool.tensors,
                                       self.table[self.layers], self.lens[self.layers])
        self.transient = max(self.transient, _nbytes(k) + _nbytes(v) + _nbytes(scores))
        self.layers += 1

    def release(self):
        """Every reserved page back to the pool (a reservation that is not admitted)."""
        self.cache.pool.release([p for row in self.pages.values() for p in row])
        self.pages = {}


def _take(pool, counts):
    """{(b, layer, head): page ids} for the rows' page counts (int [B, L, Hkv]), from the pool;
    raises PoolExhausted, taking none, when it cannot."""
    pages = pool.allocate(int(counts.sum()))
    out, at = {}, 0
    for key, n in zip(itertools.product(*map(range, counts.shape)), counts.flatten().tolist()):
        out[key] = pages[at : at + n]
        at += n
    return out


def _table(pages, counts, device, width=None):
    """Block tables int32 [L, B, Hkv, M] of the rows' pages, -1 past each row's pages."""
    B, L, Hkv = counts.shape
    M = max(int(counts.max()) if counts.numel() else 0, width or 0, 1)
    table = torch.full((L, B, Hkv, M), -1, dtype=torch.int32)
    for (b, layer, h), row in pages.items():
        table[layer, b, h, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return table.to(device)


class SqueezeKVCache:
    """Sequences of per-(layer, KV head) budgets in one page pool. Admit prompts with `admit`
    (from a PrefillRecord; `reserve` first to bound the prefill's peak), then, per decode token,
    `attend` every layer in order and `advance` once; `retire` finished sequences.

    Device state (rows 0 .. batch-1 active, the rest padding):
      tables     int32 [L, R, Hkv, M]  page ids of every row (-1 past its pages)
      lens       int32 [L, R, Hkv]     tokens each row holds
      row_budget int32 [L, R, Hkv]     each row's budget
      _positions int32 [R]             each sequence's next position
    Host state per active sequence (in row order): its id, its pages, the decode steps it may
    still take (max_new_tokens at admission), its plan.
    Views of the active sequences: budgets (int32 [B, L], or [B, L, Hkv] when any plan differs
    per KV head), planned, similarity [B, L], labels [B, L], centroids [B, k], positions [B],
    diagnostics (one list of planner.Diagnostics per admission).

    Args:
        pool: the PagePool. num_layers, num_kv_heads: of the model. policy: the SequencePolicy
        of every row.
    """

    def __init__(self, pool, num_layers, num_kv_heads, policy):
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
        self.pool, self.policy = pool, policy
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        device = pool.k.device
        self.tables = torch.full((num_layers, 0, num_kv_heads, 1), -1, dtype=torch.int32, device=device)
        self.lens = torch.zeros(num_layers, 0, num_kv_heads, dtype=torch.int32, device=device)
        self.row_budget = torch.zeros_like(self.lens)
        self._positions = torch.zeros(0, dtype=torch.int32, device=device)
        self._seqs = []  # per active row: _Sequence
        self._next_id = 0
        self.diagnostics = []
        self._peak = 0

    # ---- shapes ----

    @property
    def device(self):
        return self.pool.k.device

    @property
    def batch(self):
        """Active sequences (rows 0 .. batch - 1)."""
        return len(self._seqs)

    @property
    def ids(self):
        """The active sequences' ids, in row order."""
        return [s.id for s in self._seqs]

    @property
    def positions(self):
        """int32 [B]: each active sequence's next position (a view; advance() moves it)."""
        return self._positions[: self.batch]

    @property
    def budgets(self):
        """int32 [B, L] (or [B, L, Hkv] when any active plan differs per KV head)."""
        b = self.row_budget[:, : self.batch].permute(1, 0, 2)
        return b if any(s.per_head for s in self._seqs) else b[..., 0]

    @property
    def per_head(self):
        return any(s.per_head for s in self._seqs)

    def _gather(self, name):
        rows = [getattr(s, name) for s in self._seqs]
        if not rows:
            return None
        width = max(r.shape[-1] for r in rows)
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=float("nan"))
                            if r.is_floating_point() else r for r in rows])

    @property
    def planned(self):
        p = self._gather("planned")
        return p if self.per_head else p[..., 0]

    @property
    def similarity(self):
        return self._gather("similarity")

    @property
    def labels(self):
        return self._gather("labels")

    @property
    def centroids(self):
        return self._gather("centroids")

    # ---- admission ----

    def _grow(self, rows, width):
        """Room for `rows` rows and tables `width` pages wide (a host-side reallocation between
        steps; a captured CUDA graph must be captured again after it)."""
        L, R, Hkv, M = self.tables.shape
        if rows <= R and width <= M:
            return
        R2, M2 = max(rows, R), max(width, M)
        tables = torch.full((L, R2, Hkv, M2), -1, dtype=torch.int32, device=self.device)
        tables[:, :R, :, :M] = self.tables
        lens = torch.zeros(L, R2, Hkv, dtype=torch.int32, device=self.device)
        lens[:, :R] = self.lens
        budget = torch.zeros_like(lens)
        budget[:, :R] = self.row_budget
        positions = torch.zeros(R2, dtype=torch.int32, device=self.device)
        positions[:R] = self._positions
        self.tables, self.lens, self.row_budget, self._positions = tables, lens, budget, positions

    def reserve(self, prompt_lens, settings, max_new_tokens):
        """Pages for the prompts' rows at their staging budgets (stage_budget), before their
        prefill (pass the Reservation to PrefillRecord.start). Raises PoolExhausted, taking
        nothing, when the pool cannot hold them."""
        settings = _settings_list(settings, len(prompt_lens))
        steps = _steps_list(max_new_tokens, len(prompt_lens))
        stage = [stage_budget(self.policy, n, s, g) for n, s, g in zip(prompt_lens, settings, steps)]
        return Reservation(self, prompt_lens, settings, steps, stage)

    @classmethod
    def for_prompts(cls, prompt_lens, settings, max_new_tokens, policy, num_layers, num_kv_heads, head_dim, dtype,
                    device, page_size=16):
        """A cache whose pool holds exactly the reservation of these prompts (the prefill's peak;
        after admission the surplus pages are free): for running one batch."""
        settings = _settings_list(settings, len(prompt_lens))
        steps = _steps_list(max_new_tokens, len(prompt_lens))
        pages = sum(num_layers * num_kv_heads * -(-min(stage_budget(policy, n, s, g) + 1, n + g) // page_size)
                    for n, s, g in zip(prompt_lens, settings, steps))
        return cls(PagePool(pages, page_size, head_dim, dtype, device), num_layers, num_kv_heads, policy)

    def admit(self, record, settings, max_new_tokens, source=None, warn=False):
        """Plan the budgets of a prefill's prompts, give their rows pages and fill them.

        Args:
            record: the PrefillRecord of the prefill (left untouched unless it was compressed
                into a reservation, which this consumes).
            settings: SqueezeSettings for all sequences, a list of one per sequence, or None (in
                the list too) for the full cache (nothing evicted).
            max_new_tokens: decode steps each sequence may take (each appends one token; an int
                for all, or one per sequence); no row needs more than its horizon
                T_b + max_new_tokens slots, so budgets above that are capped there. A step past
                it is refused (begin_step).
            source: optional list of prompt indices, one per sequence: forks the prompts so
                that one prefill serves several settings (not with a reservation).
            warn: also warnings.warn the plan's diagnostics (they are in `diagnostics`).
        Returns:
            the new sequences' ids (ints), in order.
        Raises PoolExhausted, changing nothing, when the pool cannot hold the rows. Reads the
        budgets back to the host once (the page counts).
        """
        source, settings, steps = _check_request(record, self.policy, settings, max_new_tokens, source)
        reserved = record.reserved
        if reserved is not None and (reserved.cache is not self or source != list(range(len(record.prompt_lens)))
                                     or reserved.settings != settings or reserved.max_new_tokens != steps):
            raise ValueError("record: compressed into a reservation for other settings, sequences or "
                             "max_new_tokens (or of another cache); admit it as it was reserved")
        if reserved is None and record.keys and record.keys[0].shape[1] != self.num_kv_heads:
            raise ValueError(f"record: {record.keys[0].shape[1]} KV heads, the cache has {self.num_kv_heads}")
        device = self.device
        horizon = torch.tensor([record.prompt_lens[i] + g for i, g in zip(source, steps)], dtype=torch.int32,
                               device=device)
        plan = _plan(record, source, settings, horizon, self.policy, self.num_kv_heads)
        if warn:
            for message in (m for d in plan.diagnostics for m in d.messages):
                warnings.warn(message, stacklevel=2)
        counts = _row_pages(self.pool.page_size, plan.budgets.cpu(), horizon.cpu())  # [B, L, Hkv], one host read
        if reserved is None:
            pages = _take(self.pool, counts)
            table = _table(pages, counts, device)
            lens = torch.zeros(self.num_layers, len(source), self.num_kv_heads, dtype=torch.int32, device=device)
            self._compress_record(record, source, plan.budgets, table, lens)
            peak = record.nbytes + self.pool.kv_bytes(self._pages_owned() + int(counts.sum()))
        else:
            staged = sum(map(len, reserved.pages.values()))
            pages, table, lens = self._shrink(reserved, plan.budgets, counts)
            peak = reserved.transient + record.nbytes + self.pool.kv_bytes(self._pages_owned() + staged)
            record.reserved = None
        self._peak = max(self._peak, peak)
        return self._install(record, source, steps, plan, pages, table, lens)

    def _compress_record(self, record, source, budgets, table, lens):
        """compress_kv_ of every layer of the record (forked to `source`) into the new rows."""
        policy, pool = self.policy, self.pool
        cu, gather = _fork(record, source)
        rows = budgets.transpose(0, 1).contiguous()  # [L, B, Hkv]
        for layer in range(record.num_layers):
            k, v, s = record.keys[layer], record.values[layer], record.scores[layer]
            if gather is not None:
                k, v = k.index_select(0, gather), v.index_select(0, gather)
                s = s.index_select(0, gather) if s.numel() else s
            torch.ops.squeeze.compress_kv_(k, v, s, cu, rows[layer], policy.kind, policy.sinks, policy.recent_ratio,
                                           policy.pool_size, policy.pool_mode, *pool.tensors, table[layer],
                                           lens[layer])

    def _shrink(self, reserved, budgets, counts):
        """The reserved rows evicted to their budgets, their surplus pages released: (pages,
        table, lens) of the rows as admitted."""
        policy = self.policy
        rows = budgets.transpose(0, 1).contiguous()  # [L, B, Hkv]
        for layer in range(self.num_layers):
            torch.ops.squeeze.cache_evict_(*self.pool.tensors, reserved.table[layer], reserved.lens[layer],
                                           rows[layer], policy.kind, policy.sinks, policy.recent_ratio)
        pages, surplus = {}, []
        for key, row in reserved.pages.items():
            n = int(counts[key])
            pages[key], surplus = row[:n], surplus + row[n:]
        self.pool.release(surplus)
        reserved.pages = {}
        return pages, _table(pages, counts, self.device), reserved.lens

    def _install(self, record, source, steps, plan, pages, table, lens):
        """New active rows after the current ones."""
        positions = torch.tensor([record.prompt_lens[i] for i in source], dtype=torch.int32, device=self.device)
        self._write_rows(self.batch, table, lens, plan.budgets.transpose(0, 1), positions)
        ids = []
        for i, src in enumerate(source):
            seq = _Sequence(self._next_id, {(layer, h): pages[(i, layer, h)] for layer in range(self.num_layers)
                                            for h in range(self.num_kv_heads)},
                            steps[i], record.prompt_lens[src] + steps[i], plan.per_head[i],
                            plan.planned[i], plan.similarity[i], plan.labels[i], plan.centroids[i])
            self._seqs.append(seq)
            ids.append(seq.id)
            self._next_id += 1
        self.diagnostics.append(plan.diagnostics)
        return ids

    # ---- retirement ----

    def retire(self, ids):
        """Sequences out of the batch, their pages back to the pool. The last active rows move
        into the holes (the order of the others changes); their rows become padding rows."""
        wanted = set(ids)
        unknown = wanted - set(self.ids)
        if unknown:
            raise ValueError(f"ids: {sorted(unknown)} are not active sequences (active: {self.ids})")
        for seq_id in ids:
            row = self.ids.index(seq_id)
            seq = self._seqs[row]
            self.pool.release([p for pages in seq.pages.values() for p in pages])
            last = self.batch - 1
            if row != last:
                for t in (self.tables, self.lens, self.row_budget):
                    t[:, row] = t[:, last]
                self._positions[row] = self._positions[last]
                self._seqs[row] = self._seqs[last]
            self._pad(last)
            self._seqs.pop()

    def reorder(self, rows, grow=False):
        """The active sequences rearranged between steps (beam search, batch selection): new
        row i continues old row rows[i]. A row listed again is forked: the later copies get
        pages of their own holding the same slots (K, V, positions, scores), and the copies
        evolve apart from then on; rows not listed are retired, their pages back to the pool.

        Args:
            rows: old row indices (ints, or an int tensor; repeats allowed, any length).
            grow: when the forks need more pages than the pool has free (counting the pages of
                the rows not listed), grow the pool (PagePool.grow) instead of refusing: for a
                pool this cache owns alone.
        Returns:
            the ids of the new rows (a first copy keeps its sequence's id, forks get new ones).
        Raises ValueError for a row that is not active and (grow False) PoolExhausted when the
        forks need more pages than are free once the unlisted rows are retired, both before any
        change.
        Host-side (the row list is read to the host); a captured CUDA graph stays valid only
        while the batch keeps its width.
        """
        rows = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        bad = [r for r in rows if not 0 <= r < self.batch]
        if bad:
            raise ValueError(f"rows: {bad} are not active rows (0 .. {self.batch - 1})")
        listed = set(rows)
        dropped = [p for r, seq in enumerate(self._seqs) if r not in listed for pages in seq.pages.values()
                   for p in pages]
        needed = sum(len(p) for r in rows for p in self._seqs[r].pages.values())
        short = needed - self.pool.free_pages - self._pages_owned()
        if short > 0 and grow:
            self.pool.grow(short)
        elif short > 0:
            raise PoolExhausted(f"pool: rows {rows} need {needed} pages, {self.pool.free_pages} are free and "
                                f"{self._pages_owned()} held")
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        lens, budget, positions = self.lens[:, index], self.row_budget[:, index], self._positions[index]
        self.pool.release(dropped)
        seqs, kept, source, target = [], set(), [], []
        for r in rows:
            seq = self._seqs[r]
            if r not in kept:
                kept.add(r)
                seqs.append(seq)
                continue
            pages = {key: self.pool.allocate(len(p)) for key, p in seq.pages.items()}
            for key, p in seq.pages.items():
                source += p
                target += pages[key]
            seqs.append(replace(seq, id=self._next_id, pages=pages))
            self._next_id += 1
        if source:
            src = torch.tensor(source, dtype=torch.long, device=self.device)
            dst = torch.tensor(target, dtype=torch.long, device=self.device)
            for t in self.pool.tensors:
                t[dst] = t[src]
        counts = torch.tensor([[[len(s.pages[(layer, h)]) for h in range(self.num_kv_heads)]
                                for layer in range(self.num_layers)] for s in seqs], dtype=torch.int32)
        counts = counts.view(len(seqs), self.num_layers, self.num_kv_heads)
        table = _table({(i, layer, h): s.pages[(layer, h)] for i, s in enumerate(seqs) for (layer, h) in s.pages},
                       counts, self.device)
        self._write_rows(0, table, lens, budget, positions)
        self._pad(slice(len(seqs), None))
        self._seqs = seqs
        return [s.id for s in seqs]

    def _write_rows(self, start, table, lens, budget, positions):
        """Rows start .. start + B - 1 take the block tables [L, B, Hkv, M] (-1 past M), lens and
        budgets [L, B, Hkv] and positions [B], the device state grown to hold them."""
        B, M = table.shape[1], table.shape[-1]
        self._grow(start + B, M)
        self.tables[:, start : start + B, :, :M] = table
        self.tables[:, start : start + B, :, M:] = -1
        self.lens[:, start : start + B] = lens
        self.row_budget[:, start : start + B] = budget
        self._positions[start : start + B] = positions

    def _pad(self, rows):
        """Rows (an index or a slice) become padding rows: no pages, nothing held, position 0."""
        self.tables[:, rows] = -1
        self.lens[:, rows] = 0
        self.row_budget[:, rows] = 0
        self._positions[rows] = 0

    def _pages_owned(self):
        return sum(len(p) for s in self._seqs for p in s.pages.values())

    # ---- decoding ----

    def begin_step(self, width=None):
        """Host half of a decode step, before it: checks that every active sequence may take one
        more step (each appends a token; max_new_tokens at admission) and returns the rows the
        step runs over, `width` (>= batch; the rows past the batch are padding rows, as in a
        CUDA graph captured at that size) or the batch. Reads nothing from the device."""
        width = self.batch if width is None else width
        if width < self.batch:
            raise ValueError(f"width: expected >= the {self.batch} active sequences, got {width}")
        self._grow(width, 1)
        done = [s.id for s in self._seqs if s.steps_left <= 0]
        if done:
            raise ValueError(f"max_new_tokens: sequences {done} have taken the decode steps they were admitted "
                             "for; retire them (or admit them with a larger max_new_tokens)")
        return width

    def attend(self, layer, q, k_new, v_new, scale):
        """One decode step of one layer (decode_step_) over rows 0 .. W-1, W = q.shape[0] (the
        width of begin_step): append the new token's K/V [W, Hkv, D] at `positions`, attend
        q [W, H, D] over each row (softmax(scale * q.k)), accumulate H2O scores when the policy
        uses them, evict down to the row budgets. Returns [W, H, D] in q's dtype. Mutates the
        layer's rows in the pool and their lens."""
        W = q.shape[0]
        p = self.policy
        return torch.ops.squeeze.decode_step_(
            q, k_new, v_new, self._positions[:W], *self.pool.tensors, self.tables[layer, :W], self.lens[layer, :W],
            self.row_budget[layer, :W], scale, p.kind, p.sinks, p.recent_ratio, p.needs_scores)

    def step_positions(self, width):
        """int32 [W]: the positions the new tokens of rows 0 .. W-1 take in the next decode step
        (RoPE and the cache's positions; padding rows: 0). A view, moved by advance()."""
        return self._positions[:width]

    def advance(self, width):
        """Device half of a decode step, after every layer has attended: the rows move to their
        next position (capturable in a CUDA graph with the layers)."""
        self._positions[:width] += 1

    def end_step(self):
        """Host half of a decode step, after it: one step taken by every active sequence."""
        for seq in self._seqs:
            seq.steps_left -= 1

    @property
    def version(self):
        """Changes whenever the device tables are reallocated (_grow): a CUDA graph captured
        over them must then be captured again."""
        return id(self.tables)

    # ---- accounting ----

    def memory(self):
        """Byte accounting of the active sequences (see MemoryReport)."""
        pool, L, Hkv, B = self.pool, self.num_layers, self.num_kv_heads, self.batch
        S = pool.page_size
        pages = self._pages_owned()
        budgets = self.row_budget[:, :B].cpu()
        per_layer = [sum(len(s.pages[(layer, h)]) for s in self._seqs for h in range(Hkv)) for layer in range(L)]
        full = sum(L * Hkv * pool.pages_for(s.horizon) for s in self._seqs)
        padded = sum(B * Hkv * (int(budgets[layer].max()) + 1) for layer in range(L)) if B else 0
        esize = pool.k.element_size()
        D = pool.k.shape[2]
        metadata = pages * S * 8 + 4 * (self.tables[:, :B].numel() + 2 * self.lens[:, :B].numel())
        return MemoryReport(
            pages=pages, kv_allocated=pool.kv_bytes(pages), slots_allocated=pages * S,
            slots_held=int(self.lens[:, :B].sum()), slots_budget=int(budgets.sum()),
            paged_full=pool.kv_bytes(full), padded=padded * 2 * D * esize, metadata=metadata,
            prefill_peak=self._peak, pool=pool.num_pages * pool.page_bytes(),
            kv_per_layer=[pool.kv_bytes(n) for n in per_layer])

    # ---- one batch ----

    @classmethod
    def build(cls, record, policy, settings, max_new_tokens, source=None, page_size=16, warn=False):
        """A cache holding one batch: its pool sized exactly for the batch's rows, the prompts
        admitted (see admit). For one prefill scored under several settings (forks), and for
        tests; an engine keeps one pool and admits into it."""
        source_, settings_, steps = _check_request(record, policy, settings, max_new_tokens, source)
        if record.reserved is not None:
            raise ValueError("record: compressed into a reservation; admit it into the reserving cache")
        device = record.cos_sum.device
        num_kv_heads, head_dim = record.keys[0].shape[1:]
        horizon = torch.tensor([record.prompt_lens[i] + g for i, g in zip(source_, steps)], dtype=torch.int32,
                               device=device)
        plan = _plan(record, source_, settings_, horizon, policy, num_kv_heads)
        pages = int(_row_pages(page_size, plan.budgets.cpu(), horizon.cpu()).sum())
        pool = PagePool(pages, page_size, head_dim, record.keys[0].dtype, device)
        cache = cls(pool, record.num_layers, num_kv_heads, policy)
        cache.admit(record, settings_, steps, source_, warn=warn)
        return cache


@dataclass
class _Sequence:
    """Host state of one active sequence."""

    id: int
    pages: dict        # (layer, KV head) -> page ids
    steps_left: int
    horizon: int
    per_head: bool
    planned: torch.Tensor     # [L, Hkv]
    similarity: torch.Tensor  # [L]
    labels: torch.Tensor      # [L]
    centroids: torch.Tensor   # [k]


def _fork(record, source):
    """cu_seqlens of the sequences and the gather index that builds their packed prompts from
    the record's tensors (None when the cache takes the prompts as they are)."""
    if source == list(range(len(record.prompt_lens))):
        return record.cu_seqlens, None
    device = record.cu_seqlens.device
    starts = torch.cumsum(torch.tensor([0] + record.prompt_lens), 0).tolist()
    lens = [record.prompt_lens[i] for i in source]
    gather = torch.cat([torch.arange(starts[i], starts[i] + record.prompt_lens[i]) for i in source])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu.to(device), gather.to(device)
