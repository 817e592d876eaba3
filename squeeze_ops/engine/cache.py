"""The engine-facing KV cache of SqueezeAttention: one request's path from a full-attention
prefill to per-layer compressed caches, and the decode steps over them.

    runner prefill, per layer l:                          PrefillRecord
        prefill_attention (+ H2O column scores)   ->      keys[l], values[l], scores[l]
        add_rmsnorm_cossim (attention epilogue)   ->      cos_sum[l, b] += sum_t cos(x_in, x_mid)
    SqueezeKVCache.build(record, policy, settings):
        allocate(cos_sum, settings.allocator)     ->      budgets [B, L] (one host read: capacities;
                                                          diagnostics on the cache)
        one allocation, carved into per-layer caches of capacity C_l = max_b budget[b, l] + 1
        compress_kv_ per layer                    ->      the tokens the policy keeps
    per decode token, per layer: SqueezeKVCache.attend -> decode_step_ (append, attend, evict)
    then SqueezeKVCache.advance()                 ->      positions += 1

Per-KV-head budgets (a per-head plan, budgets [B, L, Hkv], e.g. CalibratedHeads) need no other
kernel: the cache folds the KV heads into the batch, one row per (sequence, KV head) holding one
KV head, and a decode step views q [B, H, D] as [B * Hkv, H / Hkv, D] (query head j reads KV
head j // (H / Hkv), as in GQA), so each row is a sequence of its own to the ops.

Keys are cached after RoPE at their original positions (no re-numbering inside the cache, the
common simplification of StreamingLLM); `positions` holds each sequence's next position
explicitly, since layers hold different numbers of tokens. A decode step reads nothing back to
the host: budgets, lengths and positions stay on the device.
"""
import warnings
from dataclasses import dataclass, field

import torch

from .allocators.base import describe
from .planner import allocate, diagnose
from .policies import PrefillNeeds, SequencePolicy, prefill_needs
from .signals import pad_observed


@dataclass
class PrefillRecord:
    """What a full-attention prefill of B prompts leaves for the cache.

    prompt_lens: host list of the B prompt lengths; cu_seqlens int32 [B+1] on the device.
    keys/values: per layer, the packed prompt K/V [T_total, Hkv, D], keys after RoPE.
    scores:      per layer, H2O column scores fp32 [T_total, Hkv] (empty when not computed).
    observed:    per layer, column scores of each prompt's last `needs.observe` queries
                 fp32 [T_total, Hkv] (the Coverage allocator's signal; empty list when not asked).
    perturbation: {SequencePolicy: per layer fp32 [B, KNOTS + 1]}, the attention_perturbation
                 curves of the last `needs.observe` queries for the policies asked (the
                 Perturbation allocator's signal).
    needs:       the PrefillNeeds this prefill recorded (the cache refuses a record that lacks
                 what its policy and settings read).
    cos_sum:     fp32 [L, B], per layer and prompt the sum over its tokens of
                 cos(x_in, x_mid), accumulated in place by add_rmsnorm_cossim.
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

    @classmethod
    def start(cls, prompt_lens, num_layers, device):
        prompt_lens = [int(n) for n in prompt_lens]
        if not prompt_lens or min(prompt_lens) < 1:
            raise ValueError(f"prompt_lens: expected a non-empty list of lengths >= 1, got {prompt_lens}")
        cu = torch.zeros(len(prompt_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(prompt_lens), 0)
        cos_sum = torch.zeros(num_layers, len(prompt_lens), dtype=torch.float32, device=device)
        return cls(prompt_lens, cu.to(device), cos_sum)

    def add_layer(self, k, v, scores):
        self.keys.append(k)
        self.values.append(v)
        self.scores.append(scores)

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
class MemoryReport:
    """KV memory of one SqueezeKVCache, in bytes.

    kv_per_layer:      allocated K + V bytes of each layer (B x 2 x Hkv x C_l x D x dtype size)
    kv_total:          their sum = the size of the one K/V allocation
    metadata:          lens, slot positions and H2O scores (int32 / fp32 side tables)
    full_cache:        K + V of an uncompressed cache of the same batch holding the longest
                       sequence at the end of decoding (L x B x 2 x Hkv x (T_max + G) x D)
    prefill_peak:      K/V-related bytes alive at the peak, while the layers are compressed:
                       the packed prompt K/V and scores of every layer + this allocation +
                       one layer's per-sequence copy when prompts are forked
    steady:            bytes held during decoding (kv_total + metadata)
    """

    kv_per_layer: list
    kv_total: int
    metadata: int
    full_cache: int
    prefill_peak: int
    steady: int

    def summary(self):
        mib = 1 << 20
        return (
            f"KV {self.kv_total / mib:.2f} MiB vs full cache {self.full_cache / mib:.2f} MiB "
            f"({100 * self.kv_total / self.full_cache:.1f}%); steady state {self.steady / mib:.2f} MiB "
            f"with metadata; prefill peak {self.prefill_peak / mib:.2f} MiB"
        )


class SqueezeKVCache:
    """Per-layer KV caches of different capacities carved out of one allocation, for a batch
    of B sequences with per-sequence, per-layer budgets. Build it with `SqueezeKVCache.build`;
    then, per decode token, `attend` every layer in order and `advance` once.

    Tensors (on the prefill's device; K/V in the prompt K/V's dtype):
      budgets        int32 [B, L]  tokens each sequence keeps in each layer (given to the ops);
                     [B, L, Hkv] per KV head when a plan is per head (per_head)
      planned        the planner's budgets (same shape), before capping at T_b + max_new_tokens
      similarity     fp32 [B, L]   mean cos(x_in, x_mid) per layer; labels int32 [B, L] and
                     centroids fp32 [B, k] of its grouping (-1 / NaN where no plan was made,
                     i.e. for the full cache)
      positions      int32 [B]     position of each sequence's next token
      kv             the one K/V allocation: layer after layer, its K then its V
      k_cache[l], v_cache[l]       views [R, h, C_l, D] into kv, C_l = capacities[l]; rows R = B
                     and h = Hkv, or per head R = B * Hkv rows (sequence-major) of h = 1 head
      lens[l] int32 [R], slot_pos[l] int32 [R, h, C_l], scores[l] fp32 [R, h, C_l]:
                     views into one int32 and one fp32 side table
    Capacity C_l = max over the rows of their budget in layer l + 1: the slot the new token is
    appended to before eviction brings the layer back to its budget.
    """

    def __init__(self, policy, budgets, planned, plan, positions, num_kv_heads, head_dim, dtype, full_tokens):
        self.policy = policy
        self.budgets, self.planned = budgets, planned
        self.similarity, self.labels, self.centroids = plan
        self.batch, num_layers = budgets.shape[:2]
        self.num_kv_heads = num_kv_heads
        self.per_head = budgets.dim() == 3
        if self.per_head and budgets.shape[2] != num_kv_heads:
            raise ValueError(f"budgets: expected per-head budgets [B, L, {num_kv_heads}], got {tuple(budgets.shape)}")
        rows, heads = (self.batch * num_kv_heads, 1) if self.per_head else (self.batch, num_kv_heads)
        # Each row's next position; `positions` is the view of one per sequence.
        self._positions = positions.to(torch.int32)[:, None].repeat(1, rows // self.batch)
        device = budgets.device
        # Row l of the layer-major copy is layer l's budget per cache row, contiguous.
        self._layer_budget = budgets.transpose(0, 1).reshape(num_layers, rows).contiguous()
        # Read once per request, outside the decode loop: the allocation needs host sizes.
        self.capacities = [int(c) + 1 for c in self._layer_budget.max(dim=1).values.tolist()]
        self._full_tokens = full_tokens
        self._record_bytes = self._fork_bytes = 0

        shapes = [(rows, heads, c, head_dim) for c in self.capacities]
        kv_sizes = [rows * heads * c * head_dim for c in self.capacities]
        slot_sizes = [rows * heads * c for c in self.capacities]
        self.kv = torch.empty(2 * sum(kv_sizes), dtype=dtype, device=device)
        self._index = torch.full((num_layers * rows + sum(slot_sizes),), -1, dtype=torch.int32, device=device)
        self._score = torch.zeros(sum(slot_sizes), dtype=torch.float32, device=device)

        self.lens = list(self._index[: num_layers * rows].view(num_layers, rows).zero_())
        kv_parts = self.kv.split([n for size in kv_sizes for n in (size, size)])
        pos_parts = self._index[num_layers * rows :].split(slot_sizes)
        score_parts = self._score.split(slot_sizes)
        self.k_cache = [kv_parts[2 * i].view(shape) for i, shape in enumerate(shapes)]
        self.v_cache = [kv_parts[2 * i + 1].view(shape) for i, shape in enumerate(shapes)]
        self.slot_pos = [part.view(shape[:3]) for part, shape in zip(pos_parts, shapes)]
        self.scores = [part.view(shape[:3]) for part, shape in zip(score_parts, shapes)]

    @property
    def num_layers(self):
        return len(self.capacities)

    @property
    def positions(self):
        """int32 [B]: each sequence's next position (a view; advance() moves it)."""
        return self._positions[:, 0]

    @classmethod
    def build(cls, record, policy, settings, max_new_tokens, source=None, warn=False):
        """Plan the budgets from a prefill, allocate the caches and compress every layer.

        record:         PrefillRecord of the full-attention prefill (left untouched, so one
                        prefill can build several caches).
        policy:         SequencePolicy of every layer.
        settings:       SqueezeSettings for all sequences, a list of one per sequence, or
                        None (in the list too) for the full cache (nothing evicted).
        max_new_tokens: tokens the decode will append; no layer needs more than
                        T_b + max_new_tokens slots, so budgets above that are capped there
                        (such a layer never evicts either way).
        source:         optional list of prompt indices, one per cache sequence: forks the
                        prompts so that one prefill serves several settings (default: the
                        prompts themselves, in order).
        warn:           also warnings.warn the plan's diagnostics (they are on the cache as
                        `diagnostics`, a list of planner.Diagnostics, one per distinct settings).
        Reads the budgets back to the host once, to size the allocation.
        """
        if not isinstance(policy, SequencePolicy):
            raise TypeError(f"policy: expected a SequencePolicy, got {type(policy).__name__}")
        num_prompts = len(record.prompt_lens)
        source = list(range(num_prompts)) if source is None else [int(i) for i in source]
        if not source or min(source) < 0 or max(source) >= num_prompts:
            raise ValueError(f"source: expected prompt indices in [0, {num_prompts}), got {source}")
        if not isinstance(settings, (list, tuple)):
            settings = [settings] * len(source)
        if len(settings) != len(source):
            raise ValueError(f"settings: expected one per sequence ({len(source)}), got {len(settings)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
        needs = prefill_needs(policy, settings)
        if not record.needs.covers(needs):
            raise ValueError(f"record: the prefill recorded {record.needs}, the policy and settings read {needs}; "
                             "prefill with needs=prefill_needs(policy, settings)")

        device = record.cos_sum.device
        prompt_lens = torch.tensor([record.prompt_lens[i] for i in source], dtype=torch.int32, device=device)
        horizon = prompt_lens + max_new_tokens
        num_kv_heads = record.keys[0].shape[1]
        planned, plan, diagnostics = _plan(record, source, settings, prompt_lens, horizon, policy, num_kv_heads)
        if warn:
            for message in (m for d in diagnostics for m in d.messages):
                warnings.warn(message, stacklevel=2)
        budgets = torch.minimum(planned, horizon.view(-1, *[1] * (planned.dim() - 1)))
        k0 = record.keys[0]
        cache = cls(policy, budgets, planned, plan, prompt_lens.clone(), num_kv_heads, k0.shape[2], k0.dtype,
                    full_tokens=max(record.prompt_lens[i] for i in source) + max_new_tokens)
        cache._record_bytes = record.nbytes
        cache.diagnostics = diagnostics

        cu_seqlens, gather = _fork(record, source, num_kv_heads if cache.per_head else 1)
        for layer in range(record.num_layers):
            k, v, s = (_rows(t, cache.per_head) for t in (record.keys[layer], record.values[layer],
                                                          record.scores[layer]))
            if gather is not None:
                k, v = k.index_select(0, gather), v.index_select(0, gather)
                s = s.index_select(0, gather) if s.numel() else s
                cache._fork_bytes = max(cache._fork_bytes, _nbytes(k) + _nbytes(v) + _nbytes(s))
            torch.ops.squeeze.compress_kv_(
                k, v, s, cu_seqlens, cache._layer_budget[layer], policy.kind, policy.sinks,
                policy.recent_ratio, cache.k_cache[layer], cache.v_cache[layer], cache.lens[layer],
                cache.slot_pos[layer], cache.scores[layer])
        return cache

    def attend(self, layer, q, k_new, v_new, scale):
        """One decode step of one layer (decode_step_): append the new token's K/V [B, Hkv, D]
        at `positions`, attend q [B, H, D] over the layer's cache (softmax(scale * q.k)),
        accumulate H2O scores when the policy uses them, evict down to the layer's budget.
        Returns [B, H, D] in q's dtype. Mutates this layer's K/V, lens, slot_pos, scores.
        Per head, the same tensors are viewed as rows of one KV head (no copy when contiguous)."""
        if self.per_head:
            rows = self._positions.numel()
            q = q.reshape(rows, -1, q.shape[-1])
            k_new, v_new = k_new.reshape(rows, 1, -1), v_new.reshape(rows, 1, -1)
        out = torch.ops.squeeze.decode_step_(
            q, k_new, v_new, self._positions.view(-1), self.k_cache[layer], self.v_cache[layer], self.lens[layer],
            self.slot_pos[layer], self.scores[layer], self._layer_budget[layer], scale, self.policy.kind,
            self.policy.sinks, self.policy.recent_ratio, self.policy.needs_scores)
        return out.view(self.batch, -1, out.shape[-1]) if self.per_head else out

    def advance(self):
        """Every layer has seen the current token: move each sequence to its next position."""
        self._positions += 1

    def memory(self):
        """Byte accounting of this cache (see MemoryReport)."""
        head_dim = self.k_cache[0].shape[-1]
        kv_total = _nbytes(self.kv)
        metadata = _nbytes(self._index) + _nbytes(self._score)
        full = (self.num_layers * self.batch * 2 * self.num_kv_heads * self._full_tokens * head_dim
                * self.kv.element_size())
        return MemoryReport(
            kv_per_layer=[_nbytes(k) + _nbytes(v) for k, v in zip(self.k_cache, self.v_cache)],
            kv_total=kv_total,
            metadata=metadata,
            full_cache=full,
            prefill_peak=self._record_bytes + kv_total + metadata + self._fork_bytes,
            steady=kv_total + metadata,
        )


def _plan(record, source, settings, prompt_lens, horizon, policy, num_kv_heads):
    """Budgets [B, L] per sequence by its settings, [B, L, Hkv] when any allocator plans per
    head (the others' layer budgets then hold for each of the layer's heads); sequences sharing
    settings are planned in one planner call. The full cache (settings None) keeps
    T_b + max_new_tokens everywhere. Returns (planned, (similarity, labels, centroids),
    the Diagnostics of every planner call)."""
    batch, num_layers = len(source), record.num_layers
    device = record.cos_sum.device
    cos_sum = record.cos_sum[:, source]
    similarity = record.similarity[source]
    per_head = any(s.needs.per_head for s in settings if s is not None)
    shape = (batch, num_layers, num_kv_heads) if per_head else (batch, num_layers)
    planned = horizon.view(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()
    labels = torch.full((batch, num_layers), -1, dtype=torch.int32, device=device)
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
        planned[rows] = budgets if budgets.dim() == len(shape) else budgets[..., None]
        labels[rows] = plan.labels.to(torch.int32)
        plans.append((rows, plan.centroids))
    width = max((c.shape[1] for _, c in plans), default=1)
    centroids = torch.full((batch, width), float("nan"), dtype=torch.float32, device=device)
    for rows, cen in plans:
        centroids[rows, : cen.shape[1]] = cen
    return planned, (similarity, labels, centroids), diagnostics


def _rows(packed, per_head):
    """A packed per-layer prompt tensor [T_total, Hkv, ...] as the rows the cache compresses:
    itself, or per head [T_total * Hkv, 1, ...] (token-major: row t * Hkv + h; a view of the
    contiguous tensors a prefill records)."""
    return packed.reshape(packed.shape[0] * packed.shape[1], 1, *packed.shape[2:]) if per_head else packed


def _fork(record, source, heads):
    """cu_seqlens of the cache's rows and the gather index that builds their packed prompts
    from _rows of the record's tensors (None when the cache takes the prompts as they are).
    Rows: the sequences (heads = 1), or per head the (sequence, KV head) pairs, sequence-major."""
    if heads == 1 and source == list(range(len(record.prompt_lens))):
        return record.cu_seqlens, None
    device = record.cu_seqlens.device
    starts = torch.cumsum(torch.tensor([0] + record.prompt_lens), 0).tolist()
    lens = [record.prompt_lens[i] for i in source for _ in range(heads)]
    gather = torch.cat([torch.arange(starts[i], starts[i] + record.prompt_lens[i]) * heads + h
                        for i in source for h in range(heads)])
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens), 0)
    return cu.to(device), gather.to(device)
