"""End-to-end decode throughput at the shapes of Mistral-7B: a full cache on PyTorch's
FlashAttention path against the library's squeezed caches (SqueezeKVCache + decode_step_),
each at the largest batch that fits in GPU memory and at a common batch.

    python -m bench.bench_e2e [--quick] [--device cuda|cpu]      (run by bench/device_check.sh)

Model: the engine's LlamaRunner (squeeze_ops.llama) over a random model of 32 layers, hidden
4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 32000, bf16: transformers'
LlamaForCausalLM built on the device when transformers is installed, else a plain tree of
tensors with the attribute names the runner reads. Weights N(0, 0.02), norms 1: throughput
does not depend on the weights.

Prompts: per prompt length T, P = 2 random prompts are prefilled once through the library
(prefill_attention with H2O column scores, add_rmsnorm_cossim similarities); every decoding
batch is made of copies of them, so the squeezed budgets are those the real planner
(plan_budgets via SqueezeKVCache.build; p = 0.35, k = 3) gives on that prefill.

Decoding paths: the same runner, weights and non-attention compute; only the cache differs.
  full       dense K/V [B, T + G + 1, Hkv, D] per layer; the new token is written at its
             position, then attention by
               sdpa_flash  SDPA pinned to the FlashAttention backend; the H / Hkv query heads
                           of a KV head go in as that many query rows (GQA without copying
                           K/V). It reads the whole fixed-length buffer (a CUDA graph needs
                           static shapes): on average G / 2 more slots than are live, ~3% more
                           attention reads at T = 2048; its output is not the exact attention
               fa2_varlen  aten._flash_attention_forward, seqused_k = the live length (exact)
               sdpa        (CPU) SDPA with a boolean mask of the live slots (exact)
             the faster provider at the same batch is the baseline. Before the grid, the exact
             provider's logits are compared with those of a SqueezeKVCache without budgets over
             4 steps (a gap is announced loudly).
  squeeze    SqueezeKVCache (one allocation, per-layer capacity = budget + 1) and decode_step_
             per layer (append, attention, H2O scores, eviction), at total budgets b_init of
             20%, 30% and 50% of the prompt, policies StreamingLLM (4 sinks) and H2O (heavy =
             recent = half of each budget).
A run: one eager warm-up step (it also compiles the Triton kernels), the step (greedy: the
argmax is fed back inside the step) captured in a CUDA graph, then G = 128 timed steps. If
capture fails the run is timed eager and says so loudly. Tokens/s = B * G / time.
Attention vs the rest: the same step at the same batch with attention and its cache update
replaced by the identity (the rest); attention = step - rest.
Max batch: (free memory - 1 GiB - 1%) // (KV bytes per sequence + an estimate of its share of
the step's temporaries), verified by running it; on an out-of-memory error 3% fewer, again.
KV per sequence: the full cache's K/V; the squeezed cache's K/V plus its side tables
(slot positions, scores, lengths). Saved = 1 - that / the K/V of T + G tokens.

Grid, kept lean for about 5 minutes of H100 time, in this order (runs that would pass
--time-limit are skipped and listed): T 2048: full (both providers); squeeze 30%, 20% (both
policies, max and common batch); T 4096: full, squeeze 30%; T 2048 squeeze 50%. Cut: window
policy, 20% / 50% at T 4096, the uniform (p = 1) allocation, the ideal bound (SDPA over
uniformly shortened dense caches: see the anchors), and repeated runs.
`--quick`: 4 layers, hidden 256, 4/2 heads, D 64, MLP 512, vocab 1000, prompt 64, 8 generated
tokens, a 16 MiB memory limit; on CPU (fp32, eager, exact masked SDPA) or GPU.
"""
import argparse
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import environment, sync, time_us, write_table
from squeeze_ops.engine.cache import PrefillRecord, SqueezeKVCache
from squeeze_ops.models.llama import LlamaRunner
from squeeze_ops.engine.policies import PrefillNeeds, SequencePolicy, SqueezeSettings


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    rope_theta: float = 1e6
    eps: float = 1e-5


MISTRAL_7B = Shape(32, 4096, 32, 8, 128, 14336, 32000)
TOY = Shape(4, 256, 4, 2, 64, 512, 1000)

POLICIES = {"h2o": SequencePolicy.h2o(), "streaming": SequencePolicy.streaming(4)}
SQUEEZE_P = 0.35  # the paper's p is 0.3-0.4 (Mistral-7B: ~0.38)
NUM_PROMPTS = 2
GIB = 1 << 30
MIB = 1 << 20

# H100 anchors of the issue (same shapes, random bf16 weights, CUDA graphs, T 2048 + 128).
ANCHOR_FULL = "H100: batch 228, 36.5 ms/step, 6,245 tok/s"
IDEAL = {  # (budget, batch kind) -> the ideal bound on the H100 (SDPA over shortened dense caches)
    (0.3, "max"): "ideal 2.45x (batch 807)", (0.2, "max"): "ideal 2.93x (batch 1211)",
    (0.3, "common"): "ideal 2.02x (batch 228)",
}
TARGETS = {(0.3, "max"): 2.2, (0.2, "max"): 2.6, (0.3, "common"): 1.8}  # x over the baseline (H100, T 2048)
SAVED_TARGET = (0.3, 65.0)  # at a 30% budget, >= 65% of the KV saved per sequence
PAPER = "paper: up to 2.2x decode tokens/s at batch 224 (Mistral-7B, A100) vs the full cache; 30-70% KV saved"


# ---- the model ----


def build_model(shape, device, dtype, use_transformers=True):
    """A random Llama-family model the LlamaRunner can run: (model, description).

    transformers' LlamaForCausalLM, built directly on `device` in `dtype`, when transformers
    is importable and use_transformers; else a tree of tensors with the same attribute names.
    Linear and embedding weights N(0, 0.02), norm weights 1, RoPE theta shape.rope_theta.
    """
    transformers = None
    if use_transformers:
        try:
            import transformers
        except ImportError:
            pass
    if transformers is None:
        return _tensor_model(shape, device, dtype), "tensor tree (transformers not installed)"
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, rms_norm_eps=shape.eps, rope_theta=shape.rope_theta,
        max_position_embeddings=32768, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, f"transformers {transformers.__version__} LlamaForCausalLM"


def _tensor_model(shape, device, dtype):
    """The attributes of a LlamaForCausalLM that LlamaRunner reads, as plain tensors."""
    like = dict(device=device, dtype=dtype)
    d, qd, kvd = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

    def linear(n_out, n_in):
        return SimpleNamespace(weight=torch.empty(n_out, n_in, **like).normal_(0.0, 0.02), bias=None)

    def norm():
        return SimpleNamespace(weight=torch.ones(d, **like))

    layers = [
        SimpleNamespace(
            input_layernorm=norm(), post_attention_layernorm=norm(),
            self_attn=SimpleNamespace(q_proj=linear(qd, d), k_proj=linear(kvd, d), v_proj=linear(kvd, d),
                                      o_proj=linear(d, qd), scaling=shape.head_dim**-0.5),
            mlp=SimpleNamespace(gate_proj=linear(shape.mlp, d), up_proj=linear(shape.mlp, d),
                                down_proj=linear(d, shape.mlp), act_fn=F.silu))
        for _ in range(shape.layers)
    ]
    exponent = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device) / shape.head_dim
    config = SimpleNamespace(
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, hidden_size=d, rms_norm_eps=shape.eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta})
    body = SimpleNamespace(
        embed_tokens=SimpleNamespace(weight=torch.empty(shape.vocab, d, **like).normal_(0.0, 0.02)),
        layers=layers, norm=norm(),
        rotary_emb=SimpleNamespace(inv_freq=1.0 / shape.rope_theta**exponent, attention_scaling=1.0))
    return SimpleNamespace(config=config, model=body, lm_head=linear(shape.vocab, d))


# ---- caches: the full-cache baseline, the identity (for the rest), the squeezed cache ----


def _sdpa_flash(q, k, v, cache, scale):
    B, H, D = q.shape
    Hkv = k.shape[2]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=scale)
    return out.reshape(B, H, D)


def _fa2_varlen(q, k, v, cache, scale):
    B, N, Hkv, D = k.shape
    return torch.ops.aten._flash_attention_forward(
        q, k.view(B * N, Hkv, D), v.view(B * N, Hkv, D), cache.cu_q, cache.cu_k, 1, N, 0.0, False, False,
        scale=scale, seqused_k=cache.live)[0]


def _sdpa_masked(q, k, v, cache, scale):
    B, H, D = q.shape
    Hkv = k.shape[2]
    out = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=cache.mask, scale=scale)
    return out.reshape(B, H, D)


FULL_PROVIDERS = {"sdpa_flash": _sdpa_flash, "fa2_varlen": _fa2_varlen, "sdpa": _sdpa_masked}


class DenseKVCache:
    """The full-cache baseline, driven by LlamaRunner.decode like a SqueezeKVCache (attend,
    advance, positions). Per layer K/V [B, N, Hkv, D], token-major as FlashAttention reads
    them; the prompt fills slots 0..T-1, the token at position p goes to slot p, nothing is
    evicted. Every per-step index (write row, live length, mask) is updated on the device."""

    def __init__(self, batch, slots, prompt_len, num_layers, num_kv_heads, head_dim, dtype, device, provider):
        self.attention = FULL_PROVIDERS[provider]
        shape = (batch, slots, num_kv_heads, head_dim)
        # Zeroed: sdpa_flash reads the slots not written yet, which must hold finite values.
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.positions = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.cu_q = torch.arange(batch + 1, **i32)
        self.cu_k = torch.arange(batch + 1, **i32) * slots
        self.live = torch.empty(batch, **i32)
        self._row0 = torch.arange(batch, dtype=torch.int64, device=device) * slots
        self._rows = torch.empty(batch, dtype=torch.int64, device=device)
        self._slot = torch.arange(slots, device=device)
        self.mask = torch.empty(batch, 1, 1, slots, dtype=torch.bool, device=device) if provider == "sdpa" else None
        self._update()

    @classmethod
    def from_prompts(cls, record, batch, slots, provider, device):
        """Sequence b holds prompt b % P of the (host) PrefillRecord of P equal-length prompts."""
        T, P = record.prompt_lens[0], len(record.prompt_lens)
        _, Hkv, D = record.keys[0].shape
        cache = cls(batch, slots, T, record.num_layers, Hkv, D, record.keys[0].dtype, device, provider)
        for dst_k, dst_v, k, v in zip(cache.k_cache, cache.v_cache, record.keys, record.values):
            for p in range(P):
                dst_k[p::P, :T].copy_(k[p * T : (p + 1) * T].to(device))
                dst_v[p::P, :T].copy_(v[p * T : (p + 1) * T].to(device))
        return cache

    def _update(self):
        torch.add(self._row0, self.positions, out=self._rows)
        torch.add(self.positions, 1, out=self.live)
        if self.mask is not None:
            torch.lt(self._slot, self.live[:, None, None, None], out=self.mask)

    def attend(self, layer, q, k_new, v_new, scale):
        k, v = self.k_cache[layer], self.v_cache[layer]
        B, N, Hkv, D = k.shape
        k.view(B * N, Hkv, D).index_copy_(0, self._rows, k_new)
        v.view(B * N, Hkv, D).index_copy_(0, self._rows, v_new)
        return self.attention(q, k, v, self, scale)

    def advance(self):
        self.positions += 1
        self._update()

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)


class NoAttention:
    """Attention and its cache update replaced by the identity on q: timing the runner's step
    over it gives the non-attention part of a decode step at that batch."""

    def __init__(self, batch, prompt_len, device):
        self.positions = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)

    def attend(self, layer, q, k_new, v_new, scale):
        return q

    def advance(self):
        self.positions += 1


def tile_cache(small, batch, full_tokens):
    """A SqueezeKVCache of `batch` sequences, sequence b a copy of sequence b % P of `small`
    (built by SqueezeKVCache.build over P prompts, so its budgets come from the planner);
    full_tokens: prompt + tokens to generate, for its memory report.

    Copying the compressed layers costs no temporary memory; building the batch directly with
    build(source=...) would first gather one layer's full prompt K/V for every sequence,
    which does not fit next to a cache of the largest batch.
    """
    P = small.batch
    rows = torch.arange(batch, device=small.budgets.device) % P
    plan = (small.similarity[rows], small.labels[rows], small.centroids[rows])
    _, Hkv, _, D = small.k_cache[0].shape
    big = SqueezeKVCache(small.policy, small.budgets[rows], small.planned[rows], plan, small.positions[rows],
                         Hkv, D, small.kv.dtype, full_tokens)
    for p in range(P):
        for layer, capacity in enumerate(big.capacities):  # smaller than small's when batch < P
            big.lens[layer][p::P].copy_(small.lens[layer][p : p + 1])
            for name in ("k_cache", "v_cache", "slot_pos", "scores"):
                getattr(big, name)[layer][p::P].copy_(getattr(small, name)[layer][p : p + 1, :, :capacity])
    return big


def _record_on(record, device):
    return PrefillRecord(record.prompt_lens, record.cu_seqlens.to(device), record.cos_sum.to(device),
                         [k.to(device) for k in record.keys], [v.to(device) for v in record.values],
                         [s.to(device) for s in record.scores], needs=record.needs)


def prefill(runner, prompt_len, num_prompts, vocab):
    """Full-attention prefill (with H2O scores) of num_prompts random prompts of prompt_len
    tokens. Returns the PrefillRecord moved to the host (it is copied back per cache build,
    so it takes no device memory while batches are sized) and the first greedy tokens [P]."""
    gen = torch.Generator().manual_seed(prompt_len)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen) for _ in range(num_prompts)]
    record, logits = runner.prefill(prompts, PrefillNeeds(score_queries=0))
    if not torch.isfinite(logits).all():
        raise RuntimeError("prefill produced non-finite logits")
    return _record_on(record, "cpu"), logits.argmax(-1)


# ---- memory ----


class OutOfMemory(RuntimeError):
    """A run needs more than the memory limit given to the harness (toy runs on CPU)."""


OOM_ERRORS = (torch.cuda.OutOfMemoryError, OutOfMemory)


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Memory:
    """Bytes a decoding run may fill with its cache and the step's temporaries: the GPU's free
    memory (less 1 GiB and 1% for workspaces and fragmentation), capped by `limit` when given;
    on CPU `limit` itself, and exceeding it raises OutOfMemory like the GPU's allocator."""

    def __init__(self, device, limit=None):
        if torch.device(device).type != "cuda" and limit is None:
            raise ValueError("limit: expected a memory limit in bytes for a CPU run")
        self.device, self.limit = torch.device(device), limit

    def available(self):
        release()
        if self.device.type != "cuda":
            return self.limit
        free = torch.cuda.mem_get_info(self.device)[0]
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        free -= GIB + free // 100
        return free if self.limit is None else min(free, self.limit)

    def check(self, held):
        if self.limit is not None and held > self.limit:
            raise OutOfMemory(f"{held} bytes needed, limit {self.limit}")


def step_temporaries(shape, elt, attention_scratch):
    """Upper estimate of one sequence's share of a decode step's temporaries, in bytes: the
    largest live set of a layer (the norm in fp32, q/k/v with their RoPE copies, or the MLP's
    four I-wide tensors) + the logits + the attention's own scratch, x 1.25 for rounding."""
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    live = elt * (2 * shape.hidden + max(5 * qkv, 4 * shape.mlp) + shape.vocab) + 4 * 3 * shape.hidden
    return int(1.25 * (live + attention_scratch))


def find_max_batch(per_sequence, available, run, shrink=0.97, attempts=5):
    """The largest batch that fits: available // per_sequence, verified by running it
    (run(batch) allocates the cache, captures and times the step); after an out-of-memory
    error 3% fewer, up to `attempts` tries. Returns (batch, run's result, tries)."""
    batch = available // per_sequence
    for tries in range(1, attempts + 1):
        if batch < 1:
            break
        try:
            return batch, run(batch), tries
        except OOM_ERRORS as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        # Released outside the except block: its traceback keeps the failed run's tensors alive.
        release()
        print(f"    batch {batch} does not fit ({reason}); trying fewer", flush=True)
        batch = min(batch - 1, int(batch * shrink))
    raise RuntimeError(f"no batch fits: {available} bytes available, {per_sequence} bytes per sequence")


# ---- decoding runs ----


def loud(message):
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", file=sys.stderr, flush=True)


def _capture(step):
    """The step captured in a CUDA graph: (graph, "cuda graph"), or (None, why) when capture
    fails, announced loudly; the caller then runs the step eagerly."""
    sync("cuda")
    torch.cuda.empty_cache()  # the warm-up's temporaries go back to the device for the graph's pool
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except OOM_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001  (any capture failure falls back to eager, loudly)
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        loud(f"CUDA graph capture of the decode step FAILED; timing it EAGER instead.\n{why}")
        sync("cuda")
        return None, f"EAGER (capture failed: {type(err).__name__})"
    return graph, "cuda graph"


def prepare_step(runner, cache, first_tokens, use_graph):
    """Greedy decode step over `cache` (the argmax fed back in place), warmed up once eagerly
    (on a side stream on the GPU, which also compiles the Triton kernels), then captured when
    use_graph. Returns (run_one_step, tokens [B], mode)."""
    tokens = first_tokens.clone()

    def step():
        tokens.copy_(runner.decode(cache, tokens).argmax(-1))

    device = tokens.device
    if device.type != "cuda":
        step()
        return step, tokens, "eager (cpu)"
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    if not use_graph:
        return step, tokens, "eager (--no-graph)"
    graph, mode = _capture(step)
    return (graph.replay if graph is not None else step), tokens, mode


def time_decode(runner, cache, first_tokens, steps, use_graph):
    """One warm-up step, then `steps` timed greedy steps. Returns dict(seconds, tokens
    int64 [steps, B] (the greedy tokens of the timed steps), mode)."""
    run, tokens, mode = prepare_step(runner, cache, first_tokens, use_graph)
    history = torch.empty(steps, tokens.shape[0], dtype=torch.long, device=tokens.device)
    sync(tokens.device)
    start = time.perf_counter()
    for i in range(steps):
        run()
        history[i].copy_(tokens)
    sync(tokens.device)
    return dict(seconds=time.perf_counter() - start, tokens=history, mode=mode)


def full_cache_agreement(runner, record, first_tokens, provider, steps, device):
    """Largest |logit difference| / largest |logit| between the dense full cache with `provider`
    and the library's SqueezeKVCache without budgets (nothing evicted), over `steps` greedy
    steps fed the same tokens from the same prefill: the baseline attends like decode_step_."""
    T, P = record.prompt_lens[0], len(record.prompt_lens)
    dense = DenseKVCache.from_prompts(record, P, T + steps, provider, device)
    full = SqueezeKVCache.build(_record_on(record, device), POLICIES["h2o"], None, steps)
    tokens, worst = first_tokens, 0.0
    for _ in range(steps):
        ours, theirs = runner.decode(full, tokens), runner.decode(dense, tokens)
        worst = max(worst, float((ours.float() - theirs.float()).abs().max() / ours.float().abs().max()))
        tokens = ours.argmax(-1)
    return worst


def _tile(tokens, batch):
    return tokens.repeat(math.ceil(batch / tokens.shape[0]))[:batch].contiguous()


def _cache_bytes(cache):
    """Bytes a cache holds for its sequences: K/V, plus a SqueezeKVCache's side tables."""
    if isinstance(cache, DenseKVCache):
        return cache.nbytes
    mem = cache.memory()
    return mem.kv_total + mem.metadata


def _check_state(cache, position):
    """After the warm-up and the timed steps every sequence is at `position`, and a squeezed
    cache holds exactly its budget in every layer (each step appended one token, evicted one)."""
    if not bool((cache.positions == position).all()):
        raise RuntimeError(f"positions: expected {position} everywhere, got {cache.positions.unique().tolist()}")
    if isinstance(cache, SqueezeKVCache):
        for layer, lens in enumerate(cache.lens):
            if not torch.equal(lens, cache.budgets[:, layer]):
                raise RuntimeError(f"layer {layer}: lens differ from the budgets after decoding")


@dataclass
class Prompt:
    """One prompt length's prefill (on the host) and its full-cache baseline once measured."""

    length: int
    record: PrefillRecord
    first: torch.Tensor  # first greedy token of each prompt [P]
    provider: str = ""  # the baseline's provider (the fastest full-cache one)
    max_batch: int = 0  # the baseline's max batch
    common_batch: int = 0  # the batch every path is also measured at
    tok_s: dict = None  # baseline tokens/s by batch


class Harness:
    """Runs the grid on one model (see the module docstring). `rows` collects a dict per timed
    run, `skipped` the jobs the time limit left out; `log` receives a line per run."""

    def __init__(self, runner, shape, device, memory, steps, use_graph=True, time_limit=None, log=print):
        self.runner, self.shape, self.device, self.memory = runner, shape, torch.device(device), memory
        self.steps, self.use_graph, self.log = steps, use_graph, log
        self.elt = runner.dtype.itemsize
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.longest = 0.0
        self.rows, self.skipped = [], []
        self._prompts, self._rest = {}, {}

    def prompt(self, length):
        if length not in self._prompts:
            self.log(f"prompt {length}: prefill of {NUM_PROMPTS} random prompts")
            self._prompts[length] = Prompt(length, *prefill(self.runner, length, NUM_PROMPTS, self.shape.vocab))
        return self._prompts[length]

    def full_kv_bytes(self, prompt_len):
        """K/V bytes of one sequence holding its prompt and every generated token."""
        s = self.shape
        return s.layers * 2 * s.kv_heads * s.head_dim * (prompt_len + self.steps) * self.elt

    def _time_left(self, label):
        """False, and the job listed as skipped, when a run as long as the longest so far would
        pass the deadline."""
        if self.deadline is not None and time.monotonic() + 1.3 * self.longest > self.deadline:
            self.skipped.append(label)
            self.log(f"  skipped (time limit): {label}")
            return False
        return True

    def _timed(self, fn, *args):
        start = time.monotonic()
        out = fn(*args)
        self.longest = max(self.longest, time.monotonic() - start)
        return out

    def rest_ms(self, prompt, batch):
        """ms per step of the runner over NoAttention at this batch (measured once per batch)."""
        if batch not in self._rest:
            release()
            cache = NoAttention(batch, prompt.length, self.device)
            run, _, _ = prepare_step(self.runner, cache, _tile(prompt.first, batch), self.use_graph)
            self._rest[batch] = time_us(run, self.device, rep=10)[0] / 1e3
            del run, cache
            release()
        return self._rest[batch]

    def _run(self, prompt, make_cache, temporaries, batch):
        """Allocates the cache of `batch` sequences (held against the memory limit with
        `temporaries` bytes per sequence for the step), times the decode, checks the cache's
        state after it. Returns dict(seconds, mode, kv_bytes per sequence)."""
        cache = make_cache(batch)
        self.memory.check(_cache_bytes(cache) + batch * temporaries)
        result = time_decode(self.runner, cache, _tile(prompt.first, batch), self.steps, self.use_graph)
        _check_state(cache, prompt.length + self.steps + 1)
        tokens = result.pop("tokens")
        if tokens.shape != (self.steps, batch) or not bool(((tokens >= 0) & (tokens < self.shape.vocab)).all()):
            raise RuntimeError(f"decode produced {tuple(tokens.shape)} tokens, expected {(self.steps, batch)} "
                               f"in [0, {self.shape.vocab})")
        result["kv_bytes"] = _cache_bytes(cache) / batch
        del cache
        release()
        return result

    def _row(self, prompt, path, kind, batch, tries, result, base_tok_s, **extra):
        rest = self.rest_ms(prompt, batch)
        step_ms = 1e3 * result["seconds"] / self.steps
        tok_s = batch * self.steps / result["seconds"]
        row = dict(prompt=prompt.length, path=path, batch_kind=kind, batch=batch, tries=tries, mode=result["mode"],
                   step_ms=step_ms, attn_ms=step_ms - rest, rest_ms=rest, tok_s=tok_s, x_base=tok_s / base_tok_s,
                   kv_mib_seq=result["kv_bytes"] / MIB,
                   saved_pct=100.0 * (1.0 - result["kv_bytes"] / self.full_kv_bytes(prompt.length)),
                   tokens=batch * self.steps, **extra)
        self.rows.append(row)
        self.log(f"  {path:30s} {kind:6s} batch {batch:5d} ({row['mode']}): {step_ms:8.2f} ms/step (attention "
                 f"{row['attn_ms']:.2f}, rest {rest:.2f}), {tok_s:10.1f} tok/s, x{row['x_base']:.2f}, "
                 f"KV {row['kv_mib_seq']:.3f} MiB/seq ({row['saved_pct']:.1f}% saved)")
        return row

    def run_full(self, length, providers, common_batch=None):
        """The full cache with each provider, the first that runs at its max batch (found), the
        others at the same batch; the fastest is the baseline. The common batch is its max
        batch unless given, in which case the baseline also runs there."""
        prompt = self.prompt(length)
        s = self.shape
        slots = length + self.steps + 1
        temporaries = step_temporaries(s, self.elt, 4 * s.heads * (s.head_dim + 1) + slots)  # out, lse, mask
        per_seq = s.layers * 2 * slots * s.kv_heads * s.head_dim * self.elt + temporaries
        results, batch = {}, None
        for name in providers:
            if not self._time_left(f"T {length} full {name}"):
                continue
            run = functools.partial(self._run, prompt, self._dense(prompt, slots, name), temporaries)
            try:
                if batch is None:
                    batch, result, tries = self._timed(find_max_batch, per_seq, self.memory.available(), run)
                else:
                    result, tries = self._timed(run, batch), 1
                results[name] = (tries, result)
            except OOM_ERRORS:
                raise
            except (RuntimeError, TypeError) as err:  # a provider this torch build lacks
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            if name not in results:
                release()
                loud(f"full-cache provider {name} FAILED, left out: {reason}")
        if not results:
            return
        prompt.provider = min(results, key=lambda n: results[n][1]["seconds"])
        prompt.max_batch = batch
        prompt.common_batch = common_batch or batch
        prompt.tok_s = {batch: batch * self.steps / results[prompt.provider][1]["seconds"]}
        anchor = ANCHOR_FULL if length == 2048 else ""
        for name, (tries, result) in results.items():
            path = f"full {name}" + (" (baseline)" if name == prompt.provider else "")
            self._row(prompt, path, "max", batch, tries, result, prompt.tok_s[batch], anchor=anchor, target="")
        common = prompt.common_batch
        if common != batch and self._time_left(f"T {length} full at the common batch"):
            result = self._timed(self._run, prompt, self._dense(prompt, slots, prompt.provider), temporaries, common)
            prompt.tok_s[common] = common * self.steps / result["seconds"]
            self._row(prompt, f"full {prompt.provider} (baseline)", "common", common, 1, result, prompt.tok_s[common],
                      anchor="", target="")

    def _dense(self, prompt, slots, provider):
        """batch -> a DenseKVCache of that many copies of the prompts."""
        return functools.partial(DenseKVCache.from_prompts, prompt.record, slots=slots, provider=provider,
                                 device=self.device)

    def run_squeeze(self, length, budget, policy_name):
        """SqueezeKVCache at total budget `budget` (b_init) under the policy, at its max batch
        and at the common batch, each against the baseline (at its max batch / the same batch)."""
        prompt = self.prompt(length)
        label = f"T {length} squeeze {policy_name} {budget:.0%}"
        if not prompt.provider:
            self.skipped.append(f"{label} (no baseline)")
            return
        if not self._time_left(label):
            return
        s, policy = self.shape, POLICIES[policy_name]
        small = SqueezeKVCache.build(_record_on(prompt.record, self.device), policy,
                                     SqueezeSettings.squeeze(b_init=budget, p=SQUEEZE_P), self.steps + 1)
        capacity = max(small.capacities)
        # decode_step_'s scratch: partial outputs of at most capacity / 128 splits, and the H2O logits.
        scratch = 4 * s.heads * (s.head_dim + 1) * math.ceil(capacity / 128)
        scratch += 4 * s.heads * capacity if policy.needs_scores else 0
        temporaries = step_temporaries(s, self.elt, scratch)
        per_seq = _cache_bytes(small) // small.batch + temporaries
        full_tokens = length + self.steps + 1

        run = functools.partial(self._run, prompt, functools.partial(tile_cache, small, full_tokens=full_tokens),
                                temporaries)
        path = f"squeeze {policy_name} {budget:.0%}"
        # Capacity is the max over the batch of each layer's budget (+ 1): where the prompts' plans
        # differ, a sequence is allocated more slots than its own budgets need (alloc_x > 1).
        plan_tokens = float(small.budgets.sum(1).double().mean())
        info = dict(budget=budget, policy=policy_name, capacities=small.capacities, plan_tokens=plan_tokens,
                    alloc_x=sum(small.capacities) / (plan_tokens + small.num_layers))
        batch, result, tries = self._timed(find_max_batch, per_seq, self.memory.available(), run)
        self._squeeze_row(prompt, path, "max", batch, tries, result, prompt.tok_s[prompt.max_batch], info)
        common = prompt.common_batch
        if common in prompt.tok_s and common < batch and self._time_left(f"{label} at the common batch"):
            result = self._timed(run, common)
            self._squeeze_row(prompt, path, "common", common, 1, result, prompt.tok_s[common], info)
        del small
        release()

    def _squeeze_row(self, prompt, path, kind, batch, tries, result, base_tok_s, info):
        key, anchor, target = (info["budget"], kind), "", ""
        if prompt.length == 2048 and key in TARGETS:
            anchor, target = IDEAL[key], f">= {TARGETS[key]}x"
            if key == (SAVED_TARGET[0], "max"):
                target += f", >= {SAVED_TARGET[1]:g}% saved"
        self._row(prompt, path, kind, batch, tries, result, base_tok_s, anchor=anchor, target=target, **info)


# ---- the grid ----


def make_grid(prompts, budgets):
    """Jobs in priority order: the first prompt length's baseline and first two budgets, each
    later length's baseline and first budget, then the first length's remaining budgets.
    Defaults: T 2048 full, 30%, 20%; T 4096 full, 30%; T 2048 50%."""
    first = prompts[0]
    grid = [(first, "full")] + [(first, b) for b in budgets[:2]]
    for length in prompts[1:]:
        grid += [(length, "full"), (length, budgets[0])]
    return grid + [(first, b) for b in budgets[2:]]


def run_grid(harness, grid, providers, policies, common_batch=None, after_job=None):
    """Runs the grid's jobs in order, calling after_job() after each. Returns harness.rows."""
    for length, job in grid:
        if job == "full":
            harness.run_full(length, providers, common_batch)
        else:
            for policy in policies:
                harness.run_squeeze(length, job, policy)
        if after_job is not None:
            after_job()
    return harness.rows


COLUMNS = ["prompt", "path", "batch_kind", "batch", "tries", "mode", "step_ms", "attn_ms", "rest_ms", "tok_s",
           "x_base", "kv_mib_seq", "saved_pct", "alloc_x", "anchor", "target"]


def verdicts(rows):
    """Lines comparing the T 2048 squeezed rows with the issue's targets."""
    out = []
    for r in rows:
        need = TARGETS.get((r.get("budget"), r["batch_kind"]))
        if r["prompt"] != 2048 or need is None:
            continue
        checks = [f"{r['x_base']:.2f}x vs >= {need}x: {'met' if r['x_base'] >= need else 'NOT met'}"]
        if (r["budget"], r["batch_kind"]) == (SAVED_TARGET[0], "max"):
            met = "met" if r["saved_pct"] >= SAVED_TARGET[1] else "NOT met"
            checks.append(f"{r['saved_pct']:.1f}% KV saved vs >= {SAVED_TARGET[1]:g}%: {met}")
        out.append(f"{r['path']} at the {r['batch_kind']} batch ({r['batch']}): " + "; ".join(checks))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy shapes (see the module docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (default 2048 4096; quick 64)")
    parser.add_argument("--budgets", type=float, nargs="+", help="b_init values (default 0.3 0.2 0.5; quick 0.3)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=["h2o", "streaming"])
    parser.add_argument("--steps", type=int, help="generated tokens G (default 128; quick 8)")
    parser.add_argument("--common-batch", type=int, help="common batch (default: the baseline's max batch)")
    parser.add_argument("--memory-limit-mib", type=float, help="cap on what a run may fill (quick or CPU: 16)")
    parser.add_argument("--time-limit", type=float, default=250.0, help="seconds; later jobs are skipped")
    parser.add_argument("--no-graph", action="store_true", help="time eager steps (no CUDA graph)")
    parser.add_argument("--no-transformers", action="store_true", help="use the tensor-tree model")
    args = parser.parse_args(argv)

    start = time.monotonic()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shape = TOY if args.quick else MISTRAL_7B
    prompts = args.prompts or ([64] if args.quick else [2048, 4096])
    budgets = args.budgets or ([0.3] if args.quick else [0.3, 0.2, 0.5])
    steps = args.steps or (8 if args.quick else 128)
    limit_mib = args.memory_limit_mib or (16 if args.quick or not cuda else None)
    dtype = torch.bfloat16 if cuda else torch.float32
    providers = ["sdpa_flash", "fa2_varlen"] if cuda else ["sdpa"]
    if os.environ.get("SQUEEZE_DEBUG") == "1":
        loud("SQUEEZE_DEBUG=1: the kernels read values back to the host, so CUDA graph capture will fail")

    torch.manual_seed(0)
    model, source = build_model(shape, device, dtype, use_transformers=not args.no_transformers)
    runner = LlamaRunner(model)
    print(f"model: {shape}, {dtype} on {device} ({source}), ready after {time.monotonic() - start:.1f} s", flush=True)
    memory = Memory(device, None if limit_mib is None else int(limit_mib * MIB))
    harness = Harness(runner, shape, device, memory, steps, use_graph=cuda and not args.no_graph,
                      time_limit=args.time_limit - (time.monotonic() - start))
    exact = "fa2_varlen" if cuda else "sdpa"
    prompt = harness.prompt(prompts[0])
    try:
        gap = full_cache_agreement(runner, prompt.record, prompt.first, exact, 4, device)
    except (RuntimeError, TypeError) as err:
        loud(f"the {exact} baseline did not run: {type(err).__name__}: {err}")
    else:
        print(f"full cache {exact} vs SqueezeKVCache without budgets, 4 steps: max |logit gap| / max |logit| = "
              f"{gap:.2e}", flush=True)
        if gap > (5e-2 if cuda else 1e-4):
            loud(f"the {exact} baseline does not compute the library's attention (gap {gap:.2e})")
    release()
    env = environment(device)
    name = "e2e_quick" if args.quick else "e2e"

    def table():
        """The table so far (written after every job on the GPU, so a run cut short keeps its rows)."""
        note = (
            f"Random {shape.layers}-layer model (hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads, D "
            f"{shape.head_dim}, MLP {shape.mlp}, vocab {shape.vocab}), {dtype}, {source}; {NUM_PROMPTS} random "
            f"prompts per length, {steps} timed greedy steps after one warm-up step. squeeze: budget = b_init of the "
            f"prompt, p {SQUEEZE_P}, k 3 (plan_budgets on the prefill). mode: how the step ran. attn_ms = step_ms - "
            "rest_ms (the step with attention replaced by the identity). x_base: tokens/s over the full-cache "
            "baseline (its fastest provider) at its max batch for max rows, at the same batch for common rows. "
            "kv_mib_seq: K/V per sequence (squeeze: + slot positions, scores, lengths); saved_pct against the K/V "
            "of prompt + generated tokens. alloc_x: slots allocated per sequence / slots its own plan needs "
            "(budgets + 1 per layer; > 1 where the prompts' plans differ, since a layer's capacity is the max over "
            "the batch). tries: runs needed to verify the max batch. sdpa_flash reads the whole fixed-length "
            f"buffer (timing only). {PAPER}. Anchor, full cache at T 2048: {ANCHOR_FULL}."
        )
        if harness.skipped:
            note += " Skipped: " + "; ".join(harness.skipped) + "."
        note += "".join(f"\n- {line}" for line in verdicts(harness.rows))
        return write_table(name, harness.rows, COLUMNS, env, note)

    run_grid(harness, make_grid(prompts, budgets), providers, args.policies, args.common_batch,
             after_job=table if cuda else None)
    if cuda:
        print(table())
    print("\n".join(verdicts(harness.rows)) or "no target rows (the targets are for prompt 2048)")
    print(f"total {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
