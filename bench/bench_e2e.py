"""End-to-end decode throughput of the paged engine under continuous batching, at the shapes of
Mistral-7B: the library's pool without eviction (the paged full cache) against squeezed caches,
every row serving the same stream of requests that arrive and finish.

    python -m bench.bench_e2e [--quick] [--device cuda|cpu]      (run by bench/device_check.sh)

Model: LlamaRunner over random weights (N(0, 0.02), norms 1) of 32 layers, hidden 4096, 32 query /
8 KV heads, head dim 128, MLP 14336, vocab 32000, bf16: transformers' LlamaForCausalLM built on
the device when transformers is installed, else a plain tree of tensors with its attribute names.
Throughput does not depend on the weights.

Workload (Workload): request i has a distinct random prompt of U[T/2, 3T/2] tokens (T = 2048) and
U[G/2, 3G/2] new tokens (G = 128), the same list for every row. Requests arrive as the server
takes them: `queue` of them always wait (a closed loop, sized per row by auto_queue), so the pool,
not the arrivals, bounds the batch; each admission prefills what fits (reserving pages first),
retirements free pages.
Serving (serve): one PagePool sized from the free memory (--memory-limit-mib caps it), one
SqueezeKVCache, ContinuousBatcher (on a GPU with DecodeGraphs: CUDA graphs per batch width; a step
that captures is left out of the timing). Once the pool has filled (a request waited for pages),
`window` decode steps are measured: decode tok/s = their tokens / their time (admissions and
prefills excluded); served tok/s = every token emitted in the window / its wall time.
Rows: the paged full cache (settings None; window policy: nothing is evicted or scored); then per
budget (30%, 20% of the prompt) and policy (h2o, streaming): uniform, and SqueezeAttention's
squeeze p = 0.35 at the same KV held. Per row: peak admitted batch; KV held (the rows' budgets) and
allocated (pages) per sequence at the peak, from MemoryReport; x_full = decode tok/s / the full
row's (the same sequences).
Ideal bound (ideal_tok_s): the same decode step over dense caches of the row's mean held length
per sequence (+ 1 slot for the new token), attention by SDPA (FlashAttention backend on a GPU), no
pages, eviction or scores, at the batch the same pool bytes hold, in a CUDA graph on a GPU;
ideal_x = that / the full row's ideal.
Target (printed, never asserted): >= 2.2x decode tok/s over the paged full cache at 30% KV held.
`--quick`: a 4-layer toy model (hidden 256, 4/2 heads, D 64), T 64, G 8, a 2 MiB pool; CPU or GPU.
"""
import argparse
import gc
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import environment, sync, time_us, write_table
from squeeze_ops.engine.batching import ContinuousBatcher, DecodeGraphs
from squeeze_ops.engine.cache import SqueezeKVCache
from squeeze_ops.engine.policies import SequencePolicy, SqueezeSettings
from squeeze_ops.engine.pool import PagePool
from squeeze_ops.models.llama import LlamaRunner


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
TARGET = (0.3, 2.2)  # at 30% KV held, >= 2.2x the paged full cache's decode tokens/s
MIB, GIB = 1 << 20, 1 << 30
QUEUE_MAX = 16  # requests waiting at most: an admission's prefill holds up to 16 x 3T/2 tokens
# CUDA graph widths: powers of two, then steps of 128 (a step replays the smallest that holds the batch).
WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256) + tuple(range(384, 8193, 128))


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


# ---- workload and memory ----


class Workload:
    """The request stream of every row: request i (deterministic in i and seed) has a distinct
    random prompt of U[T/2, 3T/2] tokens and U[G/2, 3G/2] new tokens (at least 1)."""

    def __init__(self, prompt_len, new_tokens, vocab, seed=0):
        self.prompt_len, self.new_tokens, self.vocab, self.seed = prompt_len, new_tokens, vocab, seed

    def request(self, i):
        """(prompt int64 [n], max_new_tokens) of request i."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        T, G = self.prompt_len, self.new_tokens
        new = int(torch.randint(max(1, G // 2), 3 * G // 2 + 1, (), generator=g))
        n = int(torch.randint(T // 2, 3 * T // 2 + 1, (), generator=g))
        return torch.randint(0, self.vocab, (n,), generator=g), new


def page_bytes(runner, page_size):
    """Bytes of one pool page: K and V slots in the model's dtype, an int32 position and an fp32
    score per slot (PagePool.page_bytes)."""
    return page_size * (2 * runner.head_dim * runner.dtype.itemsize + 8)


def free_bytes(device, shape, elt, prefill_tokens):
    """What a pool may take on the GPU: the free memory less 2 GiB and 5% (workspaces, the CUDA
    graphs' temporaries, fragmentation) and 1.25 x an estimate of the peak temporaries of a
    prefill over prefill_tokens tokens (the hidden state, its fp32 norm, q/k/v with their RoPE
    copies, the MLP's four I-wide tensors)."""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    per_token = elt * (2 * shape.hidden + 2 * qkv + 4 * shape.mlp) + 4 * shape.hidden
    return int(free * 0.95) - 2 * GIB - int(1.25 * prefill_tokens * per_token)


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- serving ----


class DecodeClock:
    """Times a ContinuousBatcher's decode steps: the stand-ins `runner(r)` and `graphs(g)` take
    the place of the runner and of DecodeGraphs in the batcher and record, per step, its batch,
    its synchronised wall time and whether it captured a CUDA graph (the first step at a width
    and table version: DecodeGraphs captures then; such steps are left out of the timing)."""

    def __init__(self, device):
        self.device = device
        self.steps = []  # (batch, seconds, captured)
        self._captured = set()

    def _time(self, batch, captured, fn, *args):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.steps.append((batch, time.perf_counter() - start, captured))
        return out

    def runner(self, runner):
        def decode(cache, tokens):
            return self._time(len(tokens), False, runner.decode, cache, tokens)

        return SimpleNamespace(device=runner.device, prefill=runner.prefill, decode=decode)

    def graphs(self, graphs):
        def decode(tokens):
            width = next((w for w in graphs.widths if w >= len(tokens)), None)
            before = graphs.cache.version
            out = self._time(len(tokens), False, graphs.decode, tokens)
            # A step that grew the tables (begin_step) captured at the new version too.
            captured = width is not None and ((width, before) not in self._captured or graphs.cache.version != before)
            self._captured.update({(width, before), (width, graphs.cache.version)})
            self.steps[-1] = (*self.steps[-1][:2], captured)
            return out

        return SimpleNamespace(decode=decode)


def auto_queue(pool_pages, shape, page_size, workload, b_init):
    """Requests kept waiting so that arrivals outpace retirements (Little's law with a margin):
    1.5 x the sequences the pool holds at b_init (None: the full cache) / the mean new tokens,
    within [2, QUEUE_MAX] (an admission prefills up to that many prompts at once)."""
    T, G = workload.prompt_len, max(1, workload.new_tokens)
    slots = T + G if b_init is None else b_init * T + 1
    per_sequence = shape.layers * shape.kv_heads * -(-int(slots) // page_size)
    return min(QUEUE_MAX, max(2, -(-3 * (pool_pages // per_sequence) // (2 * G))))


def serve(runner, cache, workload, settings, queue, window, use_graphs, fill_steps):
    """Serves the workload's requests under `settings` on `cache` (see the module docstring): the
    window of `window` timed decode steps opens once the pool has filled (a request waited for
    pages), or after fill_steps steps if it never does (the arrivals bound the batch then).
    Returns dict(decode_s, decode_tokens, served_s, served_tokens (the window's), peak_batch,
    report (MemoryReport at the peak batch), filled, captures, outputs {request index: int64
    tokens of each finished request})."""
    clock = DecodeClock(cache.device)
    graphs = clock.graphs(DecodeGraphs(runner, cache, WIDTHS)) if use_graphs else None
    batcher = ContinuousBatcher(clock.runner(runner), cache, graphs=graphs)
    submitted, steps, peak, report, filled = 0, 0, 0, None, False
    first, served_s, served_tokens = None, 0.0, 0  # the window: from the step after it opened
    while first is None or sum(1 for s in clock.steps[first:] if not s[2]) < window:
        while len(batcher.queue) < queue:
            prompt, new_tokens = workload.request(submitted)
            batcher.submit(prompt, settings, new_tokens)
            submitted += 1
        start = time.perf_counter()
        emitted = batcher.step()
        steps += 1
        if first is not None:
            served_s += time.perf_counter() - start
            served_tokens += len(emitted)
        filled = filled or bool(batcher.queue and cache.batch)  # a request waits for pages: the pool is full
        if first is None and (filled or steps >= fill_steps):
            first = len(clock.steps)
        if cache.batch > peak:
            peak, report = cache.batch, cache.memory()
    timed = [s for s in clock.steps[first:] if not s[2]]
    return dict(decode_s=sum(s[1] for s in timed), decode_tokens=sum(s[0] for s in timed), served_s=served_s,
                served_tokens=served_tokens, peak_batch=peak, report=report, filled=filled,
                captures=sum(s[2] for s in clock.steps), outputs=dict(batcher.finished))


# ---- the ideal bound ----


class DenseRows:
    """Dense caches of one length for the ideal bound, driven by LlamaRunner.decode_rows: per
    layer K/V [B, Hkv, n, D]; the new token is written into the last slot and attended with the
    others by SDPA (the FlashAttention backend on a GPU; GQA as G query rows per KV head). Only
    the speed means anything: positions stay put."""

    def __init__(self, batch, slots, shape, dtype, device):
        size = (batch, shape.kv_heads, slots, shape.head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.positions = torch.full((batch,), slots - 1, dtype=torch.int32, device=device)
        self.flash = torch.device(device).type == "cuda"

    def step_positions(self, width):
        return self.positions[:width]

    def attend(self, layer, q, k_new, v_new, scale):
        k, v = self.k[layer], self.v[layer]
        k[:, :, -1] = k_new
        v[:, :, -1] = v_new
        B, H, D = q.shape
        qg = q.view(B, k.shape[1], H // k.shape[1], D)
        if self.flash:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(B, H, D)
        return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(B, H, D)

    def advance(self, width):
        pass


def ideal(runner, shape, held_slots, pool_bytes, device, use_graphs):
    """(batch, tokens/s) of decode steps over dense caches of held_slots + 1 slots per row at
    the batch that pool_bytes of K/V hold (at most 8192)."""
    slots = max(1, round(held_slots)) + 1
    per_sequence = shape.layers * 2 * shape.kv_heads * slots * shape.head_dim * runner.dtype.itemsize
    batch = min(8192, pool_bytes // per_sequence)
    if batch < 1:
        return 0, 0.0
    dense = DenseRows(batch, slots, shape, runner.dtype, device)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    step = lambda: runner.decode_rows(dense, tokens)  # noqa: E731
    if use_graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step = graph.replay
    seconds = time_us(step, device, warmup=1, rep=5)[0] * 1e-6
    del dense, step
    release()
    return batch, batch / seconds


# ---- rows ----


def grid(budgets, policies):
    """(label, policy name, settings) of every row, in order: the paged full cache, then per
    budget and policy squeeze p = SQUEEZE_P and uniform."""
    rows = [("full", "window", None)]
    for f in budgets:
        for name in policies:
            rows += [(f"squeeze p{SQUEEZE_P} {f:.0%}", name, SqueezeSettings.squeeze(b_init=f, p=SQUEEZE_P)),
                     (f"uniform {f:.0%}", name, SqueezeSettings.uniform(b_init=f))]
    return rows


def run_row(runner, shape, workload, policy, settings, pool_bytes, page_size, queue, window, use_graphs):
    """One row: serve the workload on a fresh pool of pool_bytes (`queue` requests waiting, None:
    auto_queue; the window opens after 3 x G steps at the latest), then its ideal bound.
    Returns (row dict, serve's result)."""
    pages = pool_bytes // page_bytes(runner, page_size)
    pool = PagePool(pages, page_size, shape.head_dim, runner.dtype, runner.device)
    cache = SqueezeKVCache(pool, shape.layers, shape.kv_heads, policy)
    queue = queue or auto_queue(pages, shape, page_size, workload, None if settings is None else settings.b_init)
    result = serve(runner, cache, workload, settings, queue, window, use_graphs, 3 * workload.new_tokens)
    del cache, pool
    release()
    report, peak = result["report"], result["peak_batch"]
    slot_bytes = 2 * shape.head_dim * runner.dtype.itemsize
    rows = peak * shape.layers * shape.kv_heads
    held = report.slots_budget / rows  # mean budget of a row
    ideal_batch, ideal_tok_s = ideal(runner, shape, held, pool_bytes, runner.device, use_graphs)
    decode_tok_s = result["decode_tokens"] / result["decode_s"] if result["decode_s"] else 0.0
    row = dict(requests=len(result["outputs"]), peak_batch=peak, filled="yes" if result["filled"] else "NO",
               decode_tok_s=decode_tok_s, served_tok_s=result["served_tokens"] / result["served_s"]
               if result["served_s"] else 0.0, ideal_batch=ideal_batch, ideal_tok_s=ideal_tok_s,
               held_MiB_seq=report.slots_budget * slot_bytes / peak / MIB,
               alloc_MiB_seq=report.kv_allocated / peak / MIB,
               alloc_vs_held=report.slots_allocated / report.slots_budget,
               alloc_vs_full=report.kv_allocated / report.paged_full, mean_budget=held,
               mode="cuda graphs" if use_graphs else "eager", captures=result["captures"], queue=queue)
    return row, result


def verdicts(rows):
    """Lines comparing the rows at the target's budget with the target."""
    budget, need = TARGET
    return [f"{r['path']}: {r['x_full']:.2f}x the paged full cache's decode tok/s vs >= {need}x: "
            f"{'met' if r['x_full'] >= need else 'NOT met'}"
            for r in rows if r.get("budget") == budget and "x_full" in r]


COLUMNS = ["path", "requests", "queue", "peak_batch", "filled", "decode_tok_s", "x_full", "ideal_tok_s", "ideal_x",
           "ideal_batch", "served_tok_s", "held_MiB_seq", "alloc_MiB_seq", "alloc_vs_held", "alloc_vs_full", "mode",
           "target"]


def run_grid(runner, shape, workload, jobs, pool_bytes, page_size, queue, window, use_graphs, time_limit=None,
             log=print):
    """The rows of every job (grid) in order; a job that would pass time_limit seconds (judged by
    the longest so far) is skipped and listed. Returns (rows, skipped)."""
    start, longest, rows, skipped = time.monotonic(), 0.0, [], []
    for label, policy_name, settings in jobs:
        path = label if settings is None else f"{policy_name} {label}"
        if time_limit is not None and time.monotonic() - start + 1.2 * longest > time_limit:
            skipped.append(path)
            continue
        t0 = time.monotonic()
        policy = SequencePolicy.window() if settings is None else POLICIES[policy_name]
        try:
            row, _ = run_row(runner, shape, workload, policy, settings, pool_bytes, page_size, queue, window,
                             use_graphs)
        except torch.cuda.OutOfMemoryError as err:
            release()
            print(f"\n{'!' * 78}\n{path}: out of memory, left out ({str(err).splitlines()[0]})\n{'!' * 78}",
                  file=sys.stderr, flush=True)
            skipped.append(f"{path} (out of memory)")
            continue
        longest = max(longest, time.monotonic() - t0)
        row = dict(path=path, budget=None if settings is None else settings.b_init, **row)
        full = rows[0] if rows and rows[0]["path"] == "full" else (row if settings is None else None)
        if full is not None and full["decode_tok_s"]:
            row["x_full"] = row["decode_tok_s"] / full["decode_tok_s"]
            row["ideal_x"] = row["ideal_tok_s"] / full["ideal_tok_s"]
        if row["budget"] == TARGET[0]:
            row["target"] = f">= {TARGET[1]}x"
        rows.append(row)
        nan = float("nan")
        log(f"  {path:28s} peak batch {row['peak_batch']:5d}, {row['decode_tok_s']:10.1f} decode tok/s "
            f"(x{row.get('x_full', nan):.2f}; ideal {row['ideal_tok_s']:.1f}, x{row.get('ideal_x', nan):.2f}), "
            f"held {row['held_MiB_seq']:.2f} / allocated {row['alloc_MiB_seq']:.2f} MiB per sequence")
    return rows, skipped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy shapes (see the module docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, help="T: prompts of U[T/2, 3T/2] tokens (default 2048; quick 64)")
    parser.add_argument("--new-tokens", type=int, help="G: U[G/2, 3G/2] new tokens (default 128; quick 8)")
    parser.add_argument("--budgets", type=float, nargs="+", help="b_init of the squeezed rows (default 0.3 0.2; "
                                                                  "quick 0.3)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--queue", type=int, help="requests always waiting (default: auto_queue per row)")
    parser.add_argument("--window", type=int, help="decode steps timed once the pool is full (default 32; quick 8)")
    parser.add_argument("--memory-limit-mib", type=float, help="the pool's bytes (default: the free GPU memory; "
                                                                  "quick or CPU: 2)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds; later rows are skipped")
    parser.add_argument("--no-graph", action="store_true", help="eager decode steps on the GPU")
    parser.add_argument("--no-transformers", action="store_true", help="use the tensor-tree model")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default on the CPU: 1, the toy model's "
                                                     "matmuls are too small to share)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    shape = TOY if args.quick else MISTRAL_7B
    T = args.prompt or (64 if args.quick else 2048)
    G = args.new_tokens or (8 if args.quick else 128)
    window = args.window or (8 if args.quick else 32)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model, source = build_model(shape, device, dtype, use_transformers=not args.no_transformers)
    runner = LlamaRunner(model)
    limit = args.memory_limit_mib or (2 if args.quick or not cuda else None)
    pool_bytes = None if limit is None else int(limit * MIB)
    if cuda:
        free = free_bytes(device, shape, runner.dtype.itemsize, (args.queue or QUEUE_MAX) * 3 * T // 2)
        pool_bytes = free if pool_bytes is None else min(pool_bytes, free)
    print(f"model: {shape}, {dtype} on {device} ({source}); pool {pool_bytes / GIB:.2f} GiB in pages of "
          f"{args.page_size}; ready after {time.monotonic() - start:.1f} s", flush=True)
    workload = Workload(T, G, shape.vocab)
    budgets = args.budgets or ([0.3] if args.quick else [0.3, 0.2])
    rows, skipped = run_grid(runner, shape, workload, grid(budgets, args.policies), pool_bytes, args.page_size,
                             args.queue, window, cuda and not args.no_graph,
                             args.time_limit - (time.monotonic() - start))
    note = (f"Random {shape.layers}-layer model (hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads, D "
            f"{shape.head_dim}, MLP {shape.mlp}, vocab {shape.vocab}), {dtype}, {source}. Requests: prompts of "
            f"U[{T // 2}, {3 * T // 2}] tokens, U[{max(1, G // 2)}, {3 * G // 2}] new tokens, `queue` of them always "
            f"waiting; one pool of {pool_bytes / GIB:.2f} GiB in pages of {args.page_size}; {window} decode steps "
            "timed once the pool is full (filled), CUDA-graph captures left out. decode_tok_s: tokens / time of those "
            "decode steps; "
            "served_tok_s: tokens emitted in that window (first tokens of admissions included) / its wall time; "
            "x_full: decode_tok_s / the paged full cache's. ideal: the same step over dense caches of each row's mean "
            "held length + 1 at the batch the pool's bytes hold (SDPA); ideal_x against the full row's ideal. "
            "held / alloc per sequence at the peak batch (MemoryReport: budgets, pages); alloc_vs_full = allocated / "
            "the paged full cache of the same sequences.")
    if skipped:
        note += " Skipped: " + "; ".join(skipped) + "."
    note += "".join(f"\n- {line}" for line in verdicts(rows))
    print(write_table("e2e_quick" if args.quick else "e2e", rows, COLUMNS, environment(device), note))
    print(f"total {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
