"""Continuous batching on one SqueezeKVCache: requests wait in a queue, are admitted between
decode steps when the pool can hold their rows (their prefill, plan and compression write into
freshly allocated pages), decode together, and retire as they finish (their pages back to the
free list), while the others keep decoding.

    batcher = ContinuousBatcher(runner, cache)
    a = batcher.submit(prompt_ids, settings, max_new_tokens=64, stop=(eos_id,))
    ...
    outputs = batcher.run()                      # {request id: generated tokens}

The runner is a model runner on the library's ops (models.llama.LlamaRunner): prefill(...,
reserved=...) and decode_rows(cache, tokens). On a GPU, DecodeGraphs replays the decode step
from CUDA graphs captured at a few fixed batch widths; the rows past the active batch are the
cache's padding rows (no pages: they attend to their own new token and store nothing).
"""
from dataclasses import dataclass, field

import torch

from .cache import stage_budget
from .policies import prefill_needs
from .pool import PoolExhausted


def greedy(logits):
    """The default sampler: argmax over the vocabulary, logits [B, V] -> int64 [B]."""
    return logits.argmax(-1)


@dataclass
class _Request:
    id: int
    prompt: torch.Tensor
    settings: object
    max_new_tokens: int
    stop: tuple
    tokens: list = field(default_factory=list)


class ContinuousBatcher:
    """Admits, decodes and retires requests on `cache` (see the module docstring).

    Args:
        runner: the model runner. cache: the SqueezeKVCache (its pool bounds what is admitted).
        sample: logits [B, V] -> tokens [B] (default greedy).
        graphs: optional DecodeGraphs of this runner and cache (GPU).
    Each step: one decode step over the active sequences (each emits a token), the finished
    ones retired (max_new_tokens emitted, or a stop token), then the queued requests that fit
    admitted in submission order (each emits its first token, from its prefill). A request
    that fits no pool (more pages than the pool has) is refused at submit.
    """

    def __init__(self, runner, cache, sample=greedy, graphs=None):
        self.runner, self.cache, self.sample, self.graphs = runner, cache, sample, graphs
        self.queue, self.running, self.finished = [], {}, {}
        self._by_seq = {}  # cache sequence id -> request
        self._next = 0

    def submit(self, prompt, settings=None, max_new_tokens=16, stop=()):
        """Queues a request: prompt int [T] (T >= 1), settings (None: the full cache), the tokens
        to generate (>= 1), stop tokens. Returns its id. Raises PoolExhausted when the request
        alone needs more pages than the pool has."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        request = _Request(self._next, torch.as_tensor(prompt), settings, max_new_tokens, tuple(stop))
        needed = self._pages(request)
        if needed > self.cache.pool.num_pages:
            raise PoolExhausted(f"pool: request {request.id} needs {needed} pages, the pool has "
                                f"{self.cache.pool.num_pages}")
        self._next += 1
        self.queue.append(request)
        return request.id

    def _pages(self, request):
        """Pages the request's reservation takes (its prefill's peak)."""
        cache, n = self.cache, len(request.prompt)
        steps = request.max_new_tokens - 1
        u = stage_budget(cache.policy, n, request.settings, steps)
        return cache.num_layers * cache.num_kv_heads * cache.pool.pages_for(min(u + 1, n + steps))

    def step(self):
        """One decode step, retirements, admissions. Returns {request id: token} emitted."""
        emitted = {}
        if self.cache.batch:
            seq_ids = self.cache.ids
            tokens = torch.tensor([self._by_seq[s].tokens[-1] for s in seq_ids], device=self.runner.device)
            logits = self.graphs.decode(tokens) if self.graphs is not None else self.runner.decode(self.cache, tokens)
            for seq_id, token in zip(seq_ids, self.sample(logits).tolist()):
                emitted[self._by_seq[seq_id].id] = token
                self._by_seq[seq_id].tokens.append(token)
        self._retire_finished()
        emitted.update(self._admit())
        self._retire_finished()
        return emitted

    def _retire_finished(self):
        done = [s for s, r in self._by_seq.items()
                if len(r.tokens) >= r.max_new_tokens or (r.tokens and r.tokens[-1] in r.stop)]
        if done:
            self.cache.retire(done)
        for seq_id in done:
            request = self._by_seq.pop(seq_id)
            self.running.pop(request.id)
            self.finished[request.id] = torch.tensor(request.tokens, dtype=torch.long)

    def _admit(self):
        """The queued requests that fit the free pages, prefilled together; their first tokens."""
        group, free = [], self.cache.pool.free_pages
        for request in self.queue:
            pages = self._pages(request)
            if pages > free:
                break
            group.append(request)
            free -= pages
        if not group:
            return {}
        self.queue = self.queue[len(group):]
        prompts = [r.prompt for r in group]
        settings = [r.settings for r in group]
        steps = [r.max_new_tokens - 1 for r in group]
        reserved = self.cache.reserve([len(p) for p in prompts], settings, steps)
        try:
            record, logits = self.runner.prefill(prompts, prefill_needs(self.cache.policy, settings), reserved)
            seq_ids = self.cache.admit(record, settings, steps)
        except BaseException:
            reserved.release()
            raise
        emitted = {}
        for request, seq_id, token in zip(group, seq_ids, self.sample(logits).tolist()):
            request.tokens.append(token)
            self._by_seq[seq_id] = request
            self.running[request.id] = request
            emitted[request.id] = token
        return emitted

    def run(self):
        """Steps until every request has finished. Returns {request id: int64 [n] tokens}."""
        while self.queue or self.running:
            self.step()
        return dict(self.finished)


class DecodeGraphs:
    """runner.decode_rows captured in CUDA graphs at fixed widths (GPU only). A step replays
    the smallest captured width that holds the active batch; the rows past it are the cache's
    padding rows. Graphs are captured on first use of a width and again after the cache's
    tables are reallocated (cache.version); the kernels are compiled before a capture by one
    step over padding rows only (it touches no page).

    Args:
        runner, cache: as in ContinuousBatcher. widths: the batch widths to capture.
    """

    def __init__(self, runner, cache, widths=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
        if cache.device.type != "cuda":
            raise ValueError(f"cache: CUDA graphs need a CUDA device, the cache is on {cache.device}")
        self.runner, self.cache, self.widths = runner, cache, sorted(widths)
        self._graphs = {}  # width -> (version, graph, static tokens, static logits)

    def decode(self, tokens):
        """runner.decode(cache, tokens) for the active batch (tokens int [B]), by graph replay
        (eagerly when B exceeds every width). Returns logits [B, V]."""
        B = tokens.shape[0]
        width = next((w for w in self.widths if w >= B), None)
        if width is None:
            return self.runner.decode(self.cache, tokens)
        self.cache.begin_step(width)
        graph = self._graphs.get(width)
        if graph is None or graph[0] != self.cache.version:
            graph = self._capture(width)
        _, replay, static_tokens, static_logits = graph
        static_tokens.zero_()
        static_tokens[:B] = tokens
        replay.replay()
        self.cache.end_step()
        return static_logits[:B]

    def _capture(self, width):
        cache = self.cache
        padding = _padding_view(cache, width)
        static_tokens = torch.zeros(width, dtype=torch.long, device=cache.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.runner.decode_rows(padding, static_tokens)  # compiles the kernels; touches no page
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self.runner.decode_rows(cache, static_tokens)
        entry = (cache.version, graph, static_tokens, static_logits)
        self._graphs[width] = entry
        return entry


def _padding_view(cache, width):
    """A cache over the same pool whose `width` rows are all padding rows (no pages), with the
    real tables' width: a decode over it runs the same kernels and writes no page."""
    shadow = type(cache)(cache.pool, cache.num_layers, cache.num_kv_heads, cache.policy)
    shadow._grow(width, cache.tables.shape[-1])
    return shadow
