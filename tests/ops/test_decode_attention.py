"""decode_attention over paged rows: C++ CPU kernel, Triton kernel (interpreter on CPU, GPU when
present) and fake kernel against squeeze_ops.reference.decode_attention."""
import pytest
import torch
from paged_cases import dense_cache, expect_error, random_cache
from paged_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import reference
from squeeze_ops.triton_kernels import common as tk_common
from squeeze_ops.triton_kernels import decode_attention as tk

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(B, H, Hkv, lens, D, page_size=4, dtype=torch.float32, device="cpu", **kw):
    cache = random_cache(B, Hkv, lens, D, page_size, dtype=dtype, device=device, **kw)
    q = torch.randn(B, H, D).to(dtype).to(device)
    return q, cache


def check_against_reference(run, q, cache, scale, with_scores, dtype):
    k, v, _, scores, table, lens = cache
    want_scores = scores.clone()
    want = reference.decode_attention(q, k, v, table, lens, scale, want_scores if with_scores else None)
    got_scores = scores.clone() if with_scores else None
    got = run(q, k, v, table, lens, scale, got_scores)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)
    if with_scores:
        torch.testing.assert_close(got_scores.cpu(), want_scores.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(3, 3), (6, 2), (8, 2), (16, 2)])
def test_cpu_kernel_matches_reference(H, Hkv, D, dtype):
    C = 77  # not a multiple of the page size
    q, cache = make_case(5, H, Hkv, [0, 1, C - 1, 40, 13], D, page_size=7, dtype=dtype)
    for with_scores in (False, True):
        check_against_reference(torch.ops.squeeze.decode_attention, q, cache, 0.3, with_scores, dtype)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_cpu_kernel_page_sizes_and_per_head_lengths(page_size):
    """Rows of one sequence hold different numbers of tokens (per-head budgets)."""
    q, cache = make_case(3, 6, 3, [[5, 0, 17], [1, 1, 1], [30, 12, 29]], 64, page_size)
    check_against_reference(torch.ops.squeeze.decode_attention, q, cache, 0.2, True, torch.float32)


def test_padded_cache_is_one_page_per_row():
    """The padded layout [B, Hkv, C, D] is the special case of one page of C slots per row."""
    B, Hkv, C, D = 3, 2, 9, 64
    k, v = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    lens = torch.tensor([[9, 4], [0, 1], [6, 6]], dtype=torch.int32)
    cache = dense_cache(k, v, lens, torch.zeros(B, Hkv, C, dtype=torch.int32), torch.zeros(B, Hkv, C))
    q = torch.randn(B, 4, D)
    out = torch.ops.squeeze.decode_attention(q, cache[0], cache[1], cache[4], cache[5], 0.25, None)
    for b in range(B):
        for g in range(Hkv):
            n = int(lens[b, g])
            p = torch.softmax(0.25 * q[b, 2 * g : 2 * g + 2] @ k[b, g, :n].t(), -1)
            want = p @ v[b, g, :n] if n else torch.zeros(2, D)
            torch.testing.assert_close(out[b, 2 * g : 2 * g + 2], want, rtol=2e-5, atol=2e-5)


def test_cpu_kernel_runs_in_parallel():
    """Enough work per row for the thread pool: the result equals the serial one."""
    q, cache = make_case(8, 8, 4, [600, 1, 0, 599, 300, 17, 450, 64], 64, page_size=16)
    k, v, _, scores, table, lens = cache
    serial_scores, parallel_scores = scores.clone(), scores.clone()
    serial = torch.ops.squeeze.decode_attention(q, k, v, table, lens, 0.1, serial_scores)
    torch.set_num_threads(2)
    parallel = torch.ops.squeeze.decode_attention(q, k, v, table, lens, 0.1, parallel_scores)
    assert torch.equal(serial, parallel) and torch.equal(serial_scores, parallel_scores)


def test_cpu_batch_one_and_wrapper_defaults():
    q, cache = make_case(1, 4, 1, [9], 64)
    k, v, _, _, table, lens = cache
    torch.testing.assert_close(squeeze_ops.decode_attention(q, k, v, table, lens),
                               reference.decode_attention(q, k, v, table, lens, 64**-0.5), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_attention, tk.decode_attention], ids=["cpu", "triton"])
def test_lens_zero_and_empty_batch_give_zeros(run):
    q, cache = make_case(2, 4, 2, [0, 0], 64, device=TRITON_DEVICE if run is tk.decode_attention else "cpu")
    k, v, _, scores, table, lens = cache
    before = scores.clone()
    out = run(q, k, v, table, lens, 1.0, scores)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(scores, before)
    empty = run(q[:0], k, v, table[:0], lens[:0], 1.0, scores)
    assert empty.shape == (0, 4, 64)


def test_scores_accumulated_over_many_steps():
    """Fifty queries over the same cache: the kernel's accumulated scores equal the reference's."""
    q, cache = make_case(3, 8, 2, [50, 17, 1], 64, page_size=8)
    k, v, _, scores, table, lens = cache
    got, want = scores.clone(), scores.clone()
    for _ in range(50):
        q = torch.randn_like(q)
        torch.ops.squeeze.decode_attention(q, k, v, table, lens, 0.2, got)
        reference.decode_attention(q, k, v, table, lens, 0.2, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Each query head hands out mass 1 per step: the group's 4 heads x 50 steps per non-empty row.
    torch.testing.assert_close(got.sum(), scores.sum() + 200.0 * float((lens > 0).sum()), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("with_scores", [False, True])
def test_opcheck(with_scores):
    q, cache = make_case(3, 6, 2, [0, 5, 21], 64, page_size=5)
    k, v, _, scores, table, lens = cache
    torch.library.opcheck(torch.ops.squeeze.decode_attention.default,
                          (q, k, v, table, lens, 0.5, scores if with_scores else None))


# The Triton launcher, called directly (under the interpreter on CPU: few, small cases).
@pytest.mark.parametrize("H,Hkv,D,dtype,page_size", [
    (2, 2, 64, torch.float32, 16),
    (6, 2, 128, torch.float32, 5),
    (8, 2, 64, torch.float16, 64),
    (16, 2, 64, torch.float32, 1),
])
def test_triton_matches_reference(H, Hkv, D, dtype, page_size):
    """Long rows: several splits on the interpreter's plan, the last one partial; pages smaller
    and larger than a tile."""
    q, cache = make_case(2, H, Hkv, [[199, 150], [1, 0]], D, page_size, dtype, TRITON_DEVICE)
    check_against_reference(tk.decode_attention, q, cache, 0.25, True, dtype)


def test_triton_writes_every_output_and_handles_empty_rows():
    q, cache = make_case(3, 4, 1, [0, 69, 1], 64, device=TRITON_DEVICE)
    k, v, _, scores, table, lens = cache
    out = torch.full_like(q, float("nan"))
    want_scores = scores.clone()
    want = reference.decode_attention(q, k, v, table, lens, 0.5, want_scores)
    tk_common.run_decode(q, k, v, table, lens, 0.5, scores, True, out)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_triton_stays_in_the_pool_for_any_lens_and_page_ids(no_value_checks):
    """On the GPU the launcher checks no lens or page id (a host sync) unless SQUEEZE_DEBUG=1:
    lens past the capacity attend over the C slots, negative ones over none, page ids outside
    the pool are no page (read as zeros). Nothing outside the pools is read (NaN fences around
    K/V would reach the output) or written. The host checks are switched off here as on the GPU."""
    q, cache = make_case(4, 4, 2, [[20, 20], [3, 3], [0, 0], [23, 23]], 64, page_size=8, device=TRITON_DEVICE)
    C = cache.capacity
    fences = [fenced(t, float("nan")) for t in cache[:2]] + [fenced(t) for t in cache[2:4]]
    k, v, _, scores = (view for view, _ in fences)
    table, lens = cache[4].clone(), cache[5].clone()
    lens.copy_(torch.tensor([[C + 9, C], [-4, 3], [0, 0], [23, 23]], dtype=torch.int32))
    table[3, 1, 0] = k.shape[0] + 5  # outside the pool: no page
    table[3, 0, 1] = -7
    want_scores = cache[3].clone()
    clamped = torch.tensor([[C, C], [0, 3], [0, 0], [23, 23]], dtype=torch.int32, device=q.device)
    want = reference.decode_attention(q, cache[0], cache[1], table, clamped, 0.5, want_scores)
    out = tk.decode_attention(q, k, v, table, lens, 0.5, scores)
    for _, intact in fences:
        intact()
    assert torch.isfinite(out[1:]).all()  # row (0, *) reads the NaN-poisoned free slots of its pages
    torch.testing.assert_close(out[1:], want[1:], rtol=2e-5, atol=2e-5)


def test_split_plan_covers_the_capacity():
    for B, Hkv, C in [(1, 1, 1), (1, 8, 16384), (128, 8, 256), (3, 2, 200), (64, 3, 1000)]:
        split_len, S = tk_common.split_plan(B, Hkv, C, torch.device("cpu"))
        assert split_len % tk_common.BLOCK_N == 0 and (S - 1) * split_len < C <= S * split_len


def bad_inputs():
    q, cache = make_case(2, 4, 2, [3, 8], 64, page_size=4)
    k, v, _, scores, table, lens = cache
    i32 = dict(dtype=torch.int32)
    yield "H % Hkv", (q[:, :3], k, v, table, lens, 1.0, None), "q: the number of query heads"
    yield "no KV heads", (q, k, v, table[:, :0], lens[:, :0], 1.0, None), "block_table: expected at least one"
    yield "q dtype", (q.half(), k, v, table, lens, 1.0, None), "q: expected dtype"
    yield "v dtype", (q, k, v.double(), table, lens, 1.0, None), "v_pages: expected dtype"
    yield "pool dtype", (q.double(), k.double(), v.double(), table, lens, 1.0, None), "k_pages: expected dtype"
    yield "lens dtype", (q, k, v, table, lens.long(), 1.0, None), "lens: expected dtype"
    yield "lens shape", (q, k, v, table, lens[:1], 1.0, None), "lens: expected shape"
    yield "lens > C", (q, k, v, table, torch.tensor([[3, 3], [8, 13]], **i32), 1.0, None), "lens.*exceeds"
    yield "negative lens", (q, k, v, table, torch.tensor([[-1, 2], [0, 0]], **i32), 1.0, None), "lens.*non-neg"
    yield "page id", (q, k, v, table.masked_fill(table == table[0, 0, 0], 999), lens, 1.0, None), "block_table: exp"
    yield "shared page", (q, k, v, table.masked_fill(table == table[1, 1, 0], int(table[0, 0, 0])), lens, 1.0,
                          None), "block_table: page .* listed twice"
    yield "table dtype", (q, k, v, table.long(), lens, 1.0, None), "block_table: expected dtype"
    yield "table layout", (q, k, v, table.transpose(0, 1).contiguous().transpose(0, 1), lens, 1.0, None), \
        "block_table: expected a contiguous"
    yield "layout", (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, table, lens, 1.0, None), "k_pages: last dim"
    yield "v shape", (q, k, v[:, :2], table, lens, 1.0, None), "v_pages: expected shape"
    yield "q rank", (q[0], k, v, table, lens, 1.0, None), "q: expected a 3-d"
    yield "scale", (q, k, v, table, lens, float("nan"), None), "scale: expected a finite"
    yield "zero scale", (q, k, v, table, lens, 0.0, None), "scale: expected a finite"
    yield "scores dtype", (q, k, v, table, lens, 1.0, scores.double()), "score_pages: expected dtype"
    yield "scores shape", (q, k, v, table, lens, 1.0, scores[:, :1]), "score_pages: expected shape"
    yield "scores expanded", (q, k, v, table, lens, 1.0, scores[:1].expand_as(scores)), "score_pages: a written"


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_attention, tk.decode_attention], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (32, 32, 128), (9, 3, 64), (24, 3, 64), (8, 1, 256)])
def test_cuda_matches_reference(H, Hkv, D, dtype):
    q, cache = make_case(4, H, Hkv, [0, 1, 999, 517], D, 16, dtype, "cuda")
    for with_scores in (False, True):
        check_against_reference(torch.ops.squeeze.decode_attention, q, cache, D**-0.5, with_scores, dtype)


@pytest.mark.cuda
def test_cuda_long_ragged_lengths():
    q, cache = make_case(4, 32, 8, [16383, 4321, 16000, 1], 128, 16, torch.bfloat16, "cuda")
    check_against_reference(torch.ops.squeeze.decode_attention, q, cache, 128**-0.5, True, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel():
    q, cache = make_case(3, 12, 4, [299, 0, 129], 64, 16, torch.float16)
    k, v, _, scores, table, lens = cache
    s_cpu, s_gpu = scores.clone(), scores.cuda()
    out_cpu = torch.ops.squeeze.decode_attention(q, k, v, table, lens, 0.125, s_cpu)
    out_gpu = torch.ops.squeeze.decode_attention(*(t.cuda() for t in (q, k, v, table, lens)), 0.125, s_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-5)
