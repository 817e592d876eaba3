"""Every bad input a clear error: a table-driven adversarial test of every op.

For each op, OPS holds one valid call (small odd shapes) and `mutations` derives from it a table
of calls that each differ from it in one argument: its dtype, its rank, each dim's size (grown,
shrunk, zero), its strides (a strided last dim, padded rows, a transposed layout), an expanded
(stride-0) view, NaN / Inf elements, out-of-range values, scalars outside their domain or of the
wrong type, unknown strings, and memory shared with another argument (the same bytes, or
overlapping ones); plus the op's own cases (out-of-range offsets, lengths, budgets and page ids)
and consistent changes of several arguments (an empty batch, no KV heads, a head dim of 0).
Every case runs on
  - the C++ CPU kernel (torch.ops.squeeze.*, whose value checks always run on the CPU), directly
    and through its public wrapper (squeeze_ops.ops), and
  - the Triton launcher (on the GPU where there is one, else under the interpreter), first with
    the host value checks on and, where they refuse the call, again with them off, as on a GPU
    without SQUEEZE_DEBUG,
every tensor argument copied into a fenced buffer that keeps its layout (fences.py), and on the
Triton path the outputs too (poisoned with NaN). A run passes with
  - a ValueError / RuntimeError / TypeError naming the mutated argument, every input
    bit-identical afterwards, or
  - a result (outputs and written arguments) equal to squeeze_ops.reference's on the same,
    materialised inputs, every other input untouched (non-finite exactly where the reference's
    is: which of NaN, +Inf, -Inf a NaN or Inf input leaves is not specified);
a call that only the value checks refuse may give any result with them off, but nothing may be
written outside the outputs and the written arguments, and the Python checks must refuse exactly
what the C++ checks refuse. Cases that could crash the process (zero-size dims, huge values) run
in a child process, so that a crash fails them instead of the test session. The module prints
how many cases each op has on each path and how they ended.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from typing import Callable

import pytest
import torch
from conftest import TRITON_DEVICE
from fences import fenced
from paged_cases import one_intra_op_thread, random_cache  # noqa: F401  (autouse fixture)

from squeeze_ops import _checks, ops, reference
from squeeze_ops.triton_kernels import add_rmsnorm_cossim as tk_epilogue
from squeeze_ops.triton_kernels import cache_ops as tk_cache
from squeeze_ops.triton_kernels import compress_kv as tk_compress
from squeeze_ops.triton_kernels import decode_attention as tk_decode
from squeeze_ops.triton_kernels import decode_step as tk_step
from squeeze_ops.triton_kernels import prefill_attention as tk_prefill
from squeeze_ops.vocabulary import POLICIES, POOL_MODES

I32 = dict(dtype=torch.int32)
NAN, INF = float("nan"), float("inf")
BIG = 2**31 - 1  # the largest int32: every index computed from it overflows int32
ERRORS = (ValueError, RuntimeError, TypeError)
# What only the Triton kernels refuse, as documented (prefill_attention: a head dim that is a
# power of two in [16, 256]).
TRITON_ONLY = re.compile(r"the Triton kernel needs")

# NaN and Inf inputs overflow in the interpreter's numpy arithmetic, as they are meant to.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# ---- the valid calls ----


def epilogue_call(norm):
    """T = 7 tokens of d = 40 in B = 3 sequences (the middle one empty)."""
    call = dict(residual=torch.randn(7, 40), attn_out=torch.randn(7, 40))
    if norm:
        call["weight"] = torch.randn(40)
    call.update(cu_seqlens=torch.tensor([0, 3, 3, 7], **I32), cos_sum=torch.randn(3))
    if norm:
        call["eps"] = 1e-6
    return call


PACKED_CU = [0, 5, 5, 13]  # T = 13 tokens in B = 3 sequences of 5, 0 and 8


def prefill_call():
    return dict(q=torch.randn(13, 4, 16), k=torch.randn(13, 2, 16), v=torch.randn(13, 2, 16),
                cu_seqlens=torch.tensor(PACKED_CU, **I32), max_seqlen=8, scale=0.3, score_queries=0)


def pool(cache):
    return dict(zip(("k_pages", "v_pages", "pos_pages", "score_pages", "block_table", "lens"), cache))


def compress_call():
    """An empty sequence and one of 9 tokens (two sequences: the interpreter runs the heavy-hitter
    search of every row, the slowest kernel of the library there)."""
    cache = random_cache(2, 2, [0, 0], 16, page_size=3, reserve=8)  # 3 pages a row: C = 9
    return dict(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16), scores=torch.rand(9, 2),
                cu_seqlens=torch.tensor([0, 0, 9], **I32), budget=torch.tensor([[3, 0], [4, 6]], **I32),
                policy="h2o", sinks=1, recent_ratio=0.5, pool_size=3, pool_mode="max", **pool(cache))


DECODE_LENS = [[0, 5], [7, 2], [9, 1]]  # rows of 4 pages of 3 slots at most: C = 12


def decode_cache():
    return random_cache(3, 2, DECODE_LENS, 16, page_size=3, width=4)


def decode_attention_call():
    c = pool(decode_cache())
    return dict(q=torch.randn(3, 4, 16), k_pages=c["k_pages"], v_pages=c["v_pages"], block_table=c["block_table"],
                lens=c["lens"], scale=0.25, score_pages=c["score_pages"])


def new_token():
    return dict(k_new=torch.randn(3, 2, 16), v_new=torch.randn(3, 2, 16), pos=torch.tensor([5, 7, 9], **I32))


def append_call():
    return dict(**pool(decode_cache()), **new_token())


def evict_call():
    return dict(**pool(decode_cache()), budget=torch.tensor([[0, 4], [6, 2], [7, 1]], **I32), policy="h2o", sinks=1,
                recent_ratio=0.5)


def decode_step_call():
    token = new_token()
    return dict(q=torch.randn(3, 4, 16), **token, **pool(decode_cache()),
                budget=torch.tensor([[0, 5], [7, 3], [8, 1]], **I32), scale=0.25, policy="h2o", sinks=1,
                recent_ratio=0.5, accumulate_scores=True)


# ---- ops ----


@dataclasses.dataclass
class Op:
    name: str
    build: Callable  # -> {argument: value}, in schema order
    written: tuple  # the arguments the op writes
    triton: Callable = None  # the Triton launcher (None: the GPU kernel is CUDA C++)
    extra: Callable = None  # call -> the op's own mutations (Mutation list)
    strings: dict = dataclasses.field(default_factory=dict)  # string argument -> its valid values
    defined_outputs: bool = False  # outputs defined whatever the values (no NaN left in them)


@dataclasses.dataclass
class Mutation:
    label: str
    arg: str  # the mutated argument, which an error must name (whole: one of them, "|"-separated)
    make: Callable  # call -> the mutated argument's new value (whole: the new call)
    isolated: bool = False  # run in a child process: could crash it
    cpu_only: bool = False  # a type error that torch.ops.squeeze.*'s schema check raises (the
    # wrappers read None as the default; the dispatcher hands the launchers converted values)
    whole: bool = False  # a consistent change of several arguments (an empty batch, no KV heads)
    exact: bool = True  # a result must equal the reference's (not for a huge float scalar: the
    # kernels' float32 cannot hold what the float64 reference computes, e.g. scale 1e30 * q.k)


def narrowed(label, sizes, **scalars):
    """A whole-call mutation: the tensors of `sizes` {name: (dim, size)} narrowed, the scalars set."""
    def make(call):
        call = dict(call)
        for name, (dim, size) in sizes.items():
            call[name] = call[name].narrow(dim, 0, size)
        return {**call, **scalars}
    return Mutation(label, "|".join(sizes), make, isolated=True, whole=True)


def epilogue_shapes(call):
    rows = ("residual", "attn_out")
    yield narrowed("empty batch", {n: (0, 0) for n in rows + ("cos_sum",)} | {"cu_seqlens": (0, 1)})
    yield Mutation("no tokens", "residual|attn_out|cu_seqlens",
                   lambda c: {**c, "residual": c["residual"][:0], "attn_out": c["attn_out"][:0],
                              "cu_seqlens": torch.zeros_like(c["cu_seqlens"])}, isolated=True, whole=True)
    yield narrowed("d = 0", {n: (1, 0) for n in rows} | ({"weight": (0, 0)} if "weight" in call else {}))


def packed_shapes(call):
    """Empty batch, no KV heads and head dim 0 of prefill_attention and compress_kv_."""
    tokens = [n for n in ("q", "k", "v", "scores") if n in call]
    rows = [n for n in ("budget", "block_table", "lens") if n in call]
    yield narrowed("empty batch", {n: (0, 0) for n in tokens + rows} | {"cu_seqlens": (0, 1)},
                   **({"max_seqlen": 0} if "max_seqlen" in call else {}))
    kv = [n for n in ("k", "v", "scores") if n in call]
    yield narrowed("zero KV heads", {n: (1, 0) for n in kv + rows})
    yield narrowed("head dim 0", {n: (2, 0) for n in ("q", "k", "v", "k_pages", "v_pages") if n in call})


def paged_shapes(call):
    """Empty batch, no KV heads and head dim 0 of the decode ops."""
    rows = [n for n in ("q", "k_new", "v_new", "pos", "block_table", "lens", "budget") if n in call]
    heads = [n for n in ("k_new", "v_new", "block_table", "lens", "budget") if n in call]
    yield narrowed("empty batch", {n: (0, 0) for n in rows})
    yield narrowed("zero KV heads", {n: (1, 0) for n in heads})
    yield narrowed("head dim 0", {n: (2, 0) for n in ("q", "k_new", "v_new", "k_pages", "v_pages") if n in call})


def set_at(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def shared_page(call):
    """Row (1, 0)'s first page also given to row (0, 1)."""
    table = call["block_table"]
    return set_at(table, (0, 1, 0), int(table[1, 0, 0]))


def paged_values(call):
    """Out-of-range lengths, budgets and page ids of the paged ops."""
    C = call["block_table"].shape[2] * call["k_pages"].shape[1]
    P = call["k_pages"].shape[0]
    table = call["block_table"]
    yield Mutation("lens: the capacity C", "lens", lambda c: set_at(c["lens"], (1, 0), C))
    yield Mutation("lens: C + 1", "lens", lambda c: set_at(c["lens"], (1, 0), C + 1))
    if "budget" in call:
        yield Mutation("budget: C", "budget", lambda c: set_at(c["budget"], (1, 0), C))
        yield Mutation("budget: C + 1", "budget", lambda c: set_at(c["budget"], (1, 0), C + 1))
    yield Mutation("block_table: page id P", "block_table", lambda c: set_at(c["block_table"], (1, 0, 0), P))
    yield Mutation("block_table: page id -2", "block_table", lambda c: set_at(c["block_table"], (1, 0, 1), -2))
    yield Mutation("block_table: a page of two rows", "block_table", shared_page)
    if int(table[1, 0, 1]) >= 0:
        yield Mutation("block_table: a page twice in a row", "block_table",
                       lambda c: set_at(c["block_table"], (1, 0, 1), int(c["block_table"][1, 0, 0])))


def nan_score(call):
    """Slot 3 of row (1, 0), a held one, scores NaN: it counts as -inf (evicted first)."""
    yield Mutation("score_pages: NaN on a held slot", "score_pages",
                   lambda c: set_at(c["score_pages"], (int(c["block_table"][1, 0, 1]), 0), NAN))


def cu_values(call):
    T = int(call["cu_seqlens"][-1])
    yield Mutation("cu_seqlens: starts at 1", "cu_seqlens", lambda c: set_at(c["cu_seqlens"], 0, 1))
    yield Mutation("cu_seqlens: decreasing", "cu_seqlens", lambda c: set_at(c["cu_seqlens"], 1, T))
    yield Mutation("cu_seqlens: ends before T", "cu_seqlens", lambda c: set_at(c["cu_seqlens"], -1, T - 1))
    yield Mutation("cu_seqlens: ends past T", "cu_seqlens", lambda c: set_at(c["cu_seqlens"], -1, T + 1))
    yield Mutation("cu_seqlens: past T inside", "cu_seqlens", lambda c: set_at(c["cu_seqlens"], 1, T + 5))


def prefill_extra(call):
    yield from packed_shapes(call)
    yield from cu_values(call)
    yield Mutation("max_seqlen: below the longest sequence", "max_seqlen", lambda c: 7)
    yield Mutation("max_seqlen: past T", "max_seqlen", lambda c: 40)
    yield Mutation("score_queries: a window of 3", "score_queries", lambda c: 3)
    yield Mutation("score_queries: none", "score_queries", lambda c: -1)


def compress_extra(call):
    yield from packed_shapes(call)
    yield from cu_values(call)
    yield from paged_values(call)
    yield Mutation("scores: none", "scores", lambda c: torch.empty(0, 2))
    yield Mutation("budget: -1", "budget", lambda c: set_at(c["budget"], (0, 0), -1))
    yield Mutation("pool_size: 1", "pool_size", lambda c: 1)
    yield Mutation("pool_size: even", "pool_size", lambda c: 2)
    yield Mutation("pool_size: 2**31 + 1", "pool_size", lambda c: 2**31 + 1, isolated=True)
    yield Mutation("sinks: more than a sequence", "sinks", lambda c: 20)


def decode_extra(call):
    yield from paged_shapes(call)
    yield from paged_values(call)
    yield from nan_score(call)
    yield Mutation("score_pages: none", "score_pages", lambda c: None)


def append_extra(call):
    yield from paged_shapes(call)
    yield from paged_values(call)


def evict_extra(call):
    yield from append_extra(call)
    yield from nan_score(call)


def step_extra(call):
    yield from evict_extra(call)
    yield Mutation("accumulate_scores: off", "accumulate_scores", lambda c: False)
    yield Mutation("sinks: more than a row", "sinks", lambda c: 50)


def epilogue_extra(call):
    yield from epilogue_shapes(call)
    yield from cu_values(call)


def layer_budgets_extra(call):
    yield narrowed("empty batch", {"sim": (0, 0), "base": (0, 0), "max_budget": (0, 0)})
    yield Mutation("max_budget: none", "max_budget", lambda c: None)
    yield Mutation("base: negative", "base", lambda c: set_at(c["base"], 1, -1.0))
    yield Mutation("sim: fewer distinct values than k", "sim", lambda c: torch.full_like(c["sim"], 0.5))
    yield Mutation("p: 1", "p", lambda c: 1.0)


def kmeans_extra(call):
    yield narrowed("empty batch", {"x": (0, 0)})
    yield Mutation("x: fewer distinct values than k", "x", lambda c: c["x"].round())
    yield Mutation("k: N", "k", lambda c: c["x"].shape[1])


OPS = {op.name: op for op in (
    Op("add_rmsnorm_cossim", lambda: epilogue_call(True), ("residual", "cos_sum"), tk_epilogue.add_rmsnorm_cossim,
       epilogue_extra, defined_outputs=True),
    Op("add_cossim", lambda: epilogue_call(False), ("residual", "cos_sum"), tk_epilogue.add_cossim, epilogue_extra),
    Op("kmeans1d", lambda: dict(x=torch.randn(3, 9), k=3), (), extra=kmeans_extra),
    Op("layer_budgets", lambda: dict(sim=torch.rand(3, 9), base=torch.tensor([10.0, 7.5, 0.0]), p=0.5, k=3,
                                     min_budget=1, max_budget=torch.tensor([8, 100, 5], **I32)),
       (), extra=layer_budgets_extra),
    Op("prefill_attention", prefill_call, (), tk_prefill.prefill_attention, prefill_extra, defined_outputs=True),
    Op("compress_kv_", compress_call, ("k_pages", "v_pages", "pos_pages", "score_pages", "lens"),
       tk_compress.compress_kv_, compress_extra, dict(policy=POLICIES, pool_mode=POOL_MODES)),
    Op("decode_attention", decode_attention_call, ("score_pages",), tk_decode.decode_attention, decode_extra),
    Op("cache_append_", append_call, ("k_pages", "v_pages", "pos_pages", "score_pages", "lens"),
       tk_cache.cache_append_, append_extra),
    Op("cache_evict_", evict_call, ("k_pages", "v_pages", "pos_pages", "score_pages", "lens"),
       tk_cache.cache_evict_, evict_extra, dict(policy=POLICIES)),
    Op("decode_step_", decode_step_call, ("k_pages", "v_pages", "pos_pages", "score_pages", "lens"),
       tk_step.decode_step_, step_extra, dict(policy=POLICIES)),
)}


def valid_call(op):
    torch.manual_seed(0)
    return op.build()


# ---- the generic mutations ----


def _padded(t, dim, fill):
    """t with one more entry in dim: a copy of its last slice, or `fill`."""
    extra = t.narrow(dim, t.shape[dim] - 1, 1).clone() if t.shape[dim] else t.new_zeros(
        [1 if d == dim else s for d, s in enumerate(t.shape)])
    if fill is not None:
        extra.fill_(fill)
    return torch.cat([t, extra], dim)


def _strided_last(t):
    base = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    view = base[..., ::2]
    view.copy_(t)
    return view


def _padded_rows(t):
    base = t.new_zeros(*t.shape[:-1], t.shape[-1] + 3)
    view = base.narrow(-1, 0, t.shape[-1])
    view.copy_(t)
    return view


def _expanded(t):
    dim = next(d for d, s in enumerate(t.shape) if s > 1)
    return t.narrow(dim, 0, 1).expand(t.shape)


def _alias(other, shape, dtype, offset):
    """A view of `other`'s memory with the given shape and dtype from element `offset` (None when
    it does not fit)."""
    if other.element_size() != torch.empty(0, dtype=dtype).element_size() or not other.is_contiguous():
        return None
    flat = other.reshape(-1).view(dtype)
    n = math.prod(shape)
    return flat[offset : offset + n].view(shape) if flat.numel() >= offset + n else None


def tensor_mutations(op, name, t, call):
    floating = t.is_floating_point()
    for dtype in (torch.float64, torch.float16, torch.int32) if floating else (torch.int64, torch.float32):
        yield Mutation(f"{name}: dtype {dtype}", name, lambda c, dtype=dtype: c[name].to(dtype))
    if sum(isinstance(v, torch.Tensor) for v in call.values()) > 1:  # (all on meta: a traced call)
        yield Mutation(f"{name}: on another device", name, lambda c: c[name].to("meta"))
    yield Mutation(f"{name}: a list", name, lambda c: c[name].tolist(), cpu_only=True)
    yield Mutation(f"{name}: one more dim", name, lambda c: c[name].unsqueeze(0))
    if t.dim():
        yield Mutation(f"{name}: one dim fewer", name, lambda c: c[name][0])
    fill = -1 if name == "block_table" else None  # a grown table lists no page
    for dim, size in enumerate(t.shape):
        yield Mutation(f"{name}: dim {dim} + 1", name, lambda c, dim=dim: _padded(c[name], dim, fill))
        if size > 1:
            yield Mutation(f"{name}: dim {dim} - 1", name,
                           lambda c, dim=dim, size=size: c[name].narrow(dim, 0, size - 1))
        yield Mutation(f"{name}: dim {dim} = 0", name, lambda c, dim=dim: c[name].narrow(dim, 0, 0), isolated=True)
    if t.dim() and t.shape[-1] > 1:
        yield Mutation(f"{name}: strided last dim", name, lambda c: _strided_last(c[name]))
    if t.dim() >= 2:
        yield Mutation(f"{name}: padded rows", name, lambda c: _padded_rows(c[name]))
        yield Mutation(f"{name}: transposed layout", name,
                       lambda c: c[name].transpose(0, 1).contiguous().transpose(0, 1))
    if any(s > 1 for s in t.shape):
        yield Mutation(f"{name}: expanded", name, lambda c: _expanded(c[name]))
    if t.numel():
        n = t.numel()
        # Floats: NaN and +-Inf; integers: -1, and the extremes of int32 (isolated: an index
        # computed from them overflows).
        values = ((NAN, 0, False), (INF, n // 2, False), (-INF, n - 1, False)) if floating else (
            (-1, 0, False), (BIG, n // 2, True), (-BIG - 1, n - 1, True))
        for value, at, isolated in values:
            yield Mutation(f"{name}: {value} at {at}", name, isolated=isolated,
                           make=lambda c, value=value, at=at: set_at(c[name].reshape(-1), at, value).view(t.shape))
    for other, o in call.items():
        if other == name or not isinstance(o, torch.Tensor) or (name not in op.written and other not in op.written):
            continue
        for offset, how in ((0, "the memory"), (1, "part of the memory")):
            if _alias(o, t.shape, t.dtype, offset) is not None and (offset == 0 or o.dtype == t.dtype):
                yield Mutation(f"{name}: {how} of {other}", name,
                               lambda c, other=other, offset=offset: _alias(c[other], t.shape, t.dtype, offset))


def scalar_mutations(op, name, value):
    if isinstance(value, bool):
        yield Mutation(f"{name}: {not value}", name, lambda c: not value)
        yield Mutation(f"{name}: type str", name, lambda c: "yes", cpu_only=True)
    elif isinstance(value, int):
        for bad, isolated in ((-1, False), (0, False), (1, False), (2**31, True), (2**62, True)):
            yield Mutation(f"{name}: {bad}", name, lambda c, bad=bad: bad, isolated=isolated)
        for bad in (1.5, "3", None):
            yield Mutation(f"{name}: type {type(bad).__name__}", name, lambda c, bad=bad: bad, cpu_only=True)
    elif isinstance(value, float):
        for bad in (NAN, INF, -INF, 0.0, -1.0):
            yield Mutation(f"{name}: {bad}", name, lambda c, bad=bad: bad)
        yield Mutation(f"{name}: 1e30", name, lambda c: 1e30, isolated=True, exact=False)
        yield Mutation(f"{name}: type int", name, lambda c: 1)
        yield Mutation(f"{name}: type str", name, lambda c: "0.5", cpu_only=True)
    elif isinstance(value, str):
        for good in op.strings.get(name, ()):
            if good != value:
                yield Mutation(f"{name}: {good!r}", name, lambda c, good=good: good)
        for bad in ("", value.upper(), value + " ", "unknown"):
            yield Mutation(f"{name}: {bad!r}", name, lambda c, bad=bad: bad)
        yield Mutation(f"{name}: type int", name, lambda c: 1, cpu_only=True)


def mutations(op):
    call = valid_call(op)
    cases = [Mutation("valid call", "", lambda c: None)]
    for name, value in call.items():
        if isinstance(value, torch.Tensor):
            cases += tensor_mutations(op, name, value, call)
        else:
            cases += scalar_mutations(op, name, value)
    if op.extra is not None:
        cases += op.extra(call)
    return cases


# ---- running a case ----


def _same_bits(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0, INF, -INF),
                                                                 b.nan_to_num(0.0, INF, -INF))
    return torch.equal(a, b)


def _close(got, want, what):
    """None when `got` equals the reference's `want`, else a message."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{what}: expected {len(want)} results, got {type(got).__name__}"
        return next((m for i, (g, w) in enumerate(zip(got, want)) if (m := _close(g, w, f"{what}[{i}]"))), None)
    if want is None or got is None:
        return None if want is None and got is None else f"{what}: expected {want!r:.40}, got {got!r:.40}"
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, the reference's {tuple(want.shape)}"
    got, want = got.cpu(), want.cpu()
    if not (got.is_floating_point() or want.is_floating_point()):
        return None if torch.equal(got.long(), want.long()) else f"{what}: differs from the reference"
    # Which non-finite value a NaN or Inf input leaves (NaN, +Inf or -Inf) is not specified;
    # where it leaves one is.
    finite = want.isfinite()
    if not torch.equal(got.isfinite(), finite):
        where = (got.isfinite() != finite).nonzero()[:4].tolist()
        return f"{what}: non-finite elsewhere than in the reference (first at {where})"
    try:
        torch.testing.assert_close(got[finite].double(), want[finite].double(), rtol=1e-4, atol=1e-4)
    except AssertionError as e:
        return f"{what}: {str(e).splitlines()[1:3]}"
    return None


@contextlib.contextmanager
def fenced_outputs(name, fences):
    """The Triton launcher's outputs (allocated by its _checks function) inside fences, poisoned
    with NaN (floats) so that an element no program writes shows."""
    allocate = getattr(_checks, name)

    def allocate_fenced(*args):
        result = allocate(*args)
        if result is None:
            return None
        views = []
        for t in result if isinstance(result, tuple) else (result,):
            view, intact = fenced(t.fill_(NAN if t.is_floating_point() else -7))
            fences.append(intact)
            views.append(view)
        return tuple(views) if isinstance(result, tuple) else views[0]

    setattr(_checks, name, allocate_fenced)
    try:
        yield
    finally:
        setattr(_checks, name, allocate)


def _prepare(op, mutation, base):
    """(call, snapshot, fences): the mutated call, its tensors copied into fenced buffers (those
    that share memory with another argument, or have none, as they are); a copy of each tensor
    with memory; the fences' checks."""
    call = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in base.items()}
    if mutation.whole:
        call = mutation.make(call)
    elif mutation.arg:
        call[mutation.arg] = mutation.make(call)
    real = {n: v for n, v in call.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    storages = [v.untyped_storage().data_ptr() for v in real.values()]
    fences = []
    for n, v in real.items():
        if storages.count(v.untyped_storage().data_ptr()) == 1:
            written_or_int = n in op.written or not v.is_floating_point()
            call[n], intact = fenced(v, None if written_or_int else NAN)
            fences.append(intact)
    snapshot = {n: call[n].clone() for n in real}
    return call, snapshot, fences


def _fence_problem(fences):
    for intact in fences:
        try:
            intact()
        except AssertionError as e:
            return f"a write outside its tensors: {e}"
    return None


# The arguments that compress_kv_'s public wrapper takes by keyword only.
KEYWORD_ONLY = ("sinks", "recent_ratio", "pool_size", "pool_mode")


def _run(op, path, call, fences, value_checks=True):
    """(error or None, result) of the call on a path: "cpu" (torch.ops.squeeze.*, the C++
    kernel), "wrapper" (squeeze_ops.ops, which converts defaults, then the C++ kernel) or
    "triton" (the launcher)."""
    try:
        if path == "cpu":
            return None, getattr(torch.ops.squeeze, op.name)(*call.values())
        if path == "wrapper":
            keywords = {n: v for n, v in call.items() if n in KEYWORD_ONLY and op.name == "compress_kv_"}
            positional = [v for n, v in call.items() if n not in keywords]
            return None, getattr(ops, op.name)(*positional, **keywords)
        with _checks.forced_value_checks(value_checks), fenced_outputs(op.name, fences):
            return None, op.triton(*call.values())
    except Exception as e:  # noqa: BLE001  (an error of another type fails the case, not the test run)
        return e, None


def _names(message, arg):
    names = "|".join(map(re.escape, arg.split("|")))
    return re.search(rf"(?<!\w)({names})(?!\w)", message) is not None


def _check_error(mutation, error, call, snapshot, fences):
    message = str(error).split("\n")[0]
    if not isinstance(error, ERRORS):
        return f"an unclear error: {type(error).__name__}: {message[:300]}"
    if mutation.arg and not _names(message, mutation.arg):
        return f"the error does not name {mutation.arg}: {type(error).__name__}: {message[:300]}"
    changed = [n for n, t in snapshot.items() if not _same_bits(call[n], t)]
    if changed:
        return f"{changed} modified before the error {message[:200]!r}"
    return _fence_problem(fences)


def _untouched(op, call, snapshot):
    """None when no input outside op.written changed, else a message."""
    changed = [n for n, t in snapshot.items() if n not in op.written and not _same_bits(call[n], t)]
    return f"{changed}: inputs the op does not write changed" if changed else None


def _check_result(op, result, call, snapshot, fences):
    problem = _fence_problem(fences) or _untouched(op, call, snapshot)
    if problem:
        return problem
    ref_call = {n: v.to("cpu", copy=True) for n, v in snapshot.items()}
    ref_call = {n: ref_call.get(n, v) for n, v in call.items()}
    try:
        want = getattr(reference, op.name)(*ref_call.values())
    except Exception as e:  # noqa: BLE001  (the op accepted what the reference cannot evaluate)
        return f"accepted, but the reference raises {type(e).__name__}: {e}"
    if op.name == "add_cossim":  # the reference returns the new residual, the op nothing
        want = None
    return _close(result, want, "result") or next(
        (m for n in op.written if n in snapshot and (m := _close(call[n], ref_call[n], n))), None)


def _accepted(op, mutation, result, call, snapshot, fences):
    """(outcome, problem) of a call that raised nothing."""
    if mutation.exact:
        return "match", _check_result(op, result, call, snapshot, fences)
    return "fenced", _fence_problem(fences) or _untouched(op, call, snapshot)


def run_case(op, mutation, base):
    """Runs one case on the C++ kernel (directly and through its public wrapper) and the Triton
    launcher. Returns {path: (outcome, problem)}, problem None when the case passes, outcome one of
        "error"   refused, naming the argument, before any write;
        "match"   equal to the reference;
        "fenced"  ran, its result not compared: refused by the value checks only and then run
                  without them (as on a GPU), or a huge float scalar; written nothing outside
                  its outputs and written arguments."""
    results = {}
    for path in ("cpu",) if mutation.cpu_only else ("cpu", "wrapper"):
        call, snapshot, fences = _prepare(op, mutation, base)
        error, result = _run(op, path, call, fences)
        if error is not None:
            results[path] = ("error", _check_error(mutation, error, call, snapshot, fences))
        else:
            results[path] = _accepted(op, mutation, result, call, snapshot, fences)
    cpu_refused = results["cpu"][0] == "error"
    if "wrapper" in results and results["wrapper"][1] is None and (results["wrapper"][0] == "error") != cpu_refused:
        results["wrapper"] = ("error", "the wrapper and the C++ kernel disagree: one refuses, the other not")
    if op.triton is None or mutation.cpu_only:
        return results
    base = {n: v.to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v for n, v in base.items()}
    call, snapshot, fences = _prepare(op, mutation, base)
    error, result = _run(op, "triton", call, fences)
    if error is None:
        outcome, problem = _accepted(op, mutation, result, call, snapshot, fences)
        if cpu_refused and problem is None:
            problem = "the Triton launcher's checks accept what the C++ kernel refuses"
        results["triton"] = (outcome, problem)
        return results
    problem = _check_error(mutation, error, call, snapshot, fences)
    if not cpu_refused and problem is None and TRITON_ONLY.search(str(error)) is None:
        problem = f"the C++ kernel accepts what the Triton launcher refuses: {str(error)[:200]}"
    if problem:
        results["triton"] = ("error", problem)
        return results
    # Refused: by a metadata check (raised again without the value checks) or by a value check
    # only (then the kernels run on it as on a GPU, and must stay inside their tensors).
    call, snapshot, fences = _prepare(op, mutation, base)
    error, result = _run(op, "triton", call, fences, value_checks=False)
    if error is not None:
        results["triton"] = ("error", _check_error(mutation, error, call, snapshot, fences))
        return results
    problem = _fence_problem(fences) or _untouched(op, call, snapshot)
    if problem is None and op.defined_outputs:
        outputs = result if isinstance(result, tuple) else (result,)
        if any(t.isnan().any() for t in outputs):
            problem = "an output element is left unwritten (NaN poison) without the value checks"
    results["triton"] = ("fenced", problem)
    return results


def run_cases(op, indices):
    base = valid_call(op)
    table = mutations(op)
    return {i: run_case(op, table[i], base) for i in indices}


# ---- the child process of the isolated cases ----

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHILD = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import conftest, torch; torch.set_num_threads(1); "
         "import test_adversarial; test_adversarial.child()")
CASE_SECONDS = 60


def child():
    """Runs the cases of stdin's JSON [[op, index], ...] one by one, announcing each on stdout
    before it runs, then its results."""
    for name, index in json.loads(sys.stdin.read()):
        print(json.dumps(["start", name, index]), flush=True)
        op = OPS[name]
        results = run_case(op, mutations(op)[index], valid_call(op))
        print(json.dumps(["done", name, index, results]), flush=True)


def run_isolated(cases):
    """{(op, index): results} of run_case for every case, in child processes; a case that kills
    its child (or runs past CASE_SECONDS) fails, and a new child goes on after it."""
    results, todo = {}, list(cases)
    while todo:
        with tempfile.TemporaryFile("w+") as stderr:  # a file: warnings cannot fill a pipe
            proc = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, HERE], cwd=ROOT, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=stderr, text=True)
            proc.stdin.write(json.dumps(todo))
            proc.stdin.close()
            selector = selectors.DefaultSelector()
            selector.register(proc.stdout, selectors.EVENT_READ)
            current, started = None, False
            deadline = time.monotonic() + 3 * CASE_SECONDS  # the first case imports torch and triton
            while True:
                if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
                    proc.kill()
                    proc.wait()
                    why = f"ran past {CASE_SECONDS} s"
                    break
                line = proc.stdout.readline()
                if not line:
                    proc.wait()
                    stderr.seek(0)
                    why = f"the child process died (exit code {proc.returncode}): {stderr.read()[-300:]}"
                    break
                kind, name, index, *rest = json.loads(line)
                current, started, deadline = (name, index), True, time.monotonic() + CASE_SECONDS
                if kind == "done":
                    results[current] = {path: tuple(r) for path, r in rest[0].items()}
                    todo.remove([name, index])
                    current = None
            proc.stdout.close()
        if not started:  # it never ran a case (e.g. an import failed): neither would the next one
            results.update({tuple(case): {"process": ("crash", why)} for case in todo})
            break
        if current is not None:
            results[current] = {"process": ("crash", why)}
            todo.remove(list(current))
    return results


# ---- the tests ----

COUNTS = {}  # (op, path) -> {"cases", "error", "match", "fenced"}


def _tally(name, results, table):
    failures = []
    for i, by_path in sorted(results.items()):
        for path, (outcome, problem) in by_path.items():
            counts = COUNTS.setdefault((name, path), dict(cases=0, error=0, match=0, fenced=0))
            counts["cases"] += 1
            if problem:
                failures.append(f"{table[i].label} [{path}]: {problem}")
            elif outcome in counts:
                counts[outcome] += 1
    return failures


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """Prints the case counts once the module's tests have run (past the output capture)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not COUNTS:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("\nadversarial cases per op and path: refused clearly + equal to the reference + run "
                            "inside fences (refused by the value checks only, then run without them; huge scalars)")
        for (name, path), c in sorted(COUNTS.items()):
            reporter.write_line(f"  {name:20s} {path:8s} {c['cases']:4d} = {c['error']:4d} errors + "
                                f"{c['match']:4d} matches + {c['fenced']:3d} fenced")


@pytest.mark.parametrize("name", list(OPS))
def test_every_mutation_errs_clearly_or_matches_the_reference(name):
    op = OPS[name]
    table = mutations(op)
    results = run_cases(op, [i for i, m in enumerate(table) if not m.isolated])
    failures = _tally(name, results, table)
    assert not failures, f"{len(failures)} failing cases of {name}:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def isolated_results():
    cases = [[name, i] for name, op in OPS.items() for i, m in enumerate(mutations(op)) if m.isolated]
    return run_isolated(cases)


@pytest.mark.parametrize("name", list(OPS))
def test_crash_prone_mutations_in_a_child_process(name, isolated_results):
    table = mutations(OPS[name])
    results = {i: r for (op, i), r in isolated_results.items() if op == name}
    assert results, f"no isolated case of {name}"
    failures = _tally(name, results, table)
    assert not failures, f"{len(failures)} failing isolated cases of {name}:\n" + "\n".join(failures)
