"""decode_attention: C++ CPU kernel, Triton kernel (interpreter on CPU, GPU when present) and fake
kernel against squeeze_ops.reference.decode_attention."""
import pytest
import torch
from decode_cases import expect_error, random_cache
from decode_cases import one_intra_op_thread  # noqa: F401  (autouse fixture)

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import reference
from squeeze_ops.triton_kernels import common as tk_common
from squeeze_ops.triton_kernels import decode_attention as tk

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(B, H, Hkv, C, D, lens, dtype=torch.float32, device="cpu"):
    cache = random_cache(B, Hkv, C, D, lens, dtype, device)
    q = torch.randn(B, H, D).to(dtype).to(device)
    return q, cache


def check_against_reference(run, q, cache, scale, with_scores, dtype):
    k, v, lens, _, scores = cache
    want_scores = scores.clone()
    want = reference.decode_attention(q, k, v, lens, scale, want_scores if with_scores else None)
    got_scores = scores.clone() if with_scores else None
    got = run(q, k, v, lens, scale, got_scores)
    assert got.dtype == q.dtype and got.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol)
    if with_scores:
        torch.testing.assert_close(got_scores.cpu(), want_scores.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(3, 3), (6, 2), (8, 2), (16, 2)])
def test_cpu_kernel_matches_reference(H, Hkv, D, dtype):
    C = 77  # not a multiple of any block
    q, cache = make_case(5, H, Hkv, C, D, [0, 1, C, 40, 13], dtype)
    for with_scores in (False, True):
        check_against_reference(torch.ops.squeeze.decode_attention, q, cache, 0.3, with_scores, dtype)


def test_cpu_kernel_runs_in_parallel():
    """Enough work per (sequence, head) for the thread pool: the result equals the serial one."""
    q, cache = make_case(8, 8, 4, 600, 64, [600, 1, 0, 599, 300, 17, 450, 64])
    k, v, lens, _, scores = cache
    serial_scores, parallel_scores = scores.clone(), scores.clone()
    serial = torch.ops.squeeze.decode_attention(q, k, v, lens, 0.1, serial_scores)
    torch.set_num_threads(2)
    parallel = torch.ops.squeeze.decode_attention(q, k, v, lens, 0.1, parallel_scores)
    assert torch.equal(serial, parallel) and torch.equal(serial_scores, parallel_scores)


def test_cpu_batch_one_and_wrapper_defaults():
    q, cache = make_case(1, 4, 1, 9, 64, [9])
    k, v, lens, _, _ = cache
    torch.testing.assert_close(squeeze_ops.decode_attention(q, k, v, lens),
                               reference.decode_attention(q, k, v, lens, 64**-0.5), rtol=2e-5, atol=2e-5)


def test_lens_zero_gives_zeros():
    q, cache = make_case(2, 4, 2, 16, 64, [0, 0])
    k, v, lens, _, scores = cache
    out = torch.ops.squeeze.decode_attention(q, k, v, lens, 1.0, scores)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(scores, torch.zeros_like(scores))


def test_scores_accumulated_over_many_steps():
    """Fifty queries over the same cache: the kernel's accumulated scores equal the reference's."""
    q, cache = make_case(3, 8, 2, 50, 64, [50, 17, 1])
    k, v, lens, _, scores = cache
    got, want = scores.clone(), scores.clone()
    for _ in range(50):
        q = torch.randn_like(q)
        torch.ops.squeeze.decode_attention(q, k, v, lens, 0.2, got)
        reference.decode_attention(q, k, v, lens, 0.2, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Each query head hands out mass 1 per step: the group's 4 heads x 50 steps per valid sequence.
    torch.testing.assert_close(got.sum(-1), scores.sum(-1) + 200.0 * (lens > 0)[:, None], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("with_scores", [False, True])
def test_opcheck(with_scores):
    q, cache = make_case(3, 6, 2, 21, 64, [0, 5, 21])
    k, v, lens, _, scores = cache
    torch.library.opcheck(torch.ops.squeeze.decode_attention.default,
                          (q, k, v, lens, 0.5, scores if with_scores else None))


# The Triton launcher, called directly (under the interpreter on CPU: few, small cases).
@pytest.mark.parametrize("H,Hkv,D,dtype", [
    (2, 2, 64, torch.float32),
    (6, 2, 128, torch.float32),
    (8, 2, 64, torch.float16),
    (16, 2, 64, torch.float32),
])
def test_triton_matches_reference(H, Hkv, D, dtype):
    C = 200  # several splits on the interpreter's plan, the last one partial
    q, cache = make_case(2, H, Hkv, C, D, [C, 1], dtype, TRITON_DEVICE)
    check_against_reference(tk.decode_attention, q, cache, 0.25, True, dtype)


def test_triton_writes_every_output_and_handles_empty_sequences():
    q, cache = make_case(3, 4, 1, 70, 64, [0, 70, 1], device=TRITON_DEVICE)
    k, v, lens, _, scores = cache
    out = torch.full_like(q, float("nan"))
    want_scores = scores.clone()
    want = reference.decode_attention(q, k, v, lens, 0.5, want_scores)
    tk_common.run_decode(q, k, v, lens, 0.5, scores, True, out)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_triton_stays_in_bounds_for_any_lens(no_value_checks):
    """On the GPU the launcher checks no lens value (a host sync) unless SQUEEZE_DEBUG=1: lens
    past the capacity attend over the C slots, negative ones over none, and nothing outside the
    cache and the scores is read (NaN fences around K/V would reach the output) or written. The
    host check is switched off here as on the GPU."""
    C = 70
    q, cache = make_case(4, 4, 2, C, 64, [C, 3, 0, C], device=TRITON_DEVICE)
    fences = [fenced(t, float("nan")) for t in cache[:2]] + [fenced(t) for t in cache[2:]]
    k, v, lens, _, scores = (view for view, _ in fences)
    lens.copy_(torch.tensor([C + 9, -4, 0, C], dtype=torch.int32))
    want_scores = cache[4].clone()
    want = reference.decode_attention(q, *cache[:2], torch.tensor([C, 0, 0, C], dtype=torch.int32, device=q.device),
                                      0.5, want_scores)
    out = tk.decode_attention(q, k, v, lens, 0.5, scores)
    for _, intact in fences:
        intact()
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_split_plan_covers_the_capacity():
    for B, Hkv, C in [(1, 1, 1), (1, 8, 16384), (128, 8, 256), (3, 2, 200), (64, 3, 1000)]:
        split_len, S = tk_common.split_plan(B, Hkv, C, torch.device("cpu"))
        assert split_len % tk_common.BLOCK_N == 0 and (S - 1) * split_len < C <= S * split_len


def bad_inputs():
    q, cache = make_case(2, 4, 2, 8, 64, [3, 8])
    k, v, lens, _, scores = cache
    yield "H % Hkv", (q[:, :3], k, v, lens, 1.0, None), "q: the number of query heads"
    yield "q dtype", (q.half(), k, v, lens, 1.0, None), "q: expected dtype"
    yield "v dtype", (q, k, v.double(), lens, 1.0, None), "v_cache: expected dtype"
    yield "cache dtype", (q.double(), k.double(), v.double(), lens, 1.0, None), "k_cache: expected dtype"
    yield "lens dtype", (q, k, v, lens.long(), 1.0, None), "lens: expected dtype"
    yield "lens shape", (q, k, v, lens[:1], 1.0, None), "lens"
    yield "lens > C", (q, k, v, torch.tensor([3, 9], dtype=torch.int32), 1.0, None), "lens.*exceeds"
    yield "negative lens", (q, k, v, torch.tensor([-1, 2], dtype=torch.int32), 1.0, None), "lens: expected non-neg"
    yield "layout", (q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lens, 1.0, None), "k_cache: last dim"
    yield "v shape", (q, k, v[:, :, :4], lens, 1.0, None), "v_cache: expected shape"
    yield "q rank", (q[0], k, v, lens, 1.0, None), "q: expected a 3-d"
    yield "scores dtype", (q, k, v, lens, 1.0, scores.double()), "scores: expected dtype"
    yield "scores shape", (q, k, v, lens, 1.0, scores[:, :1]), "scores: expected shape"


@pytest.mark.parametrize("run", [torch.ops.squeeze.decode_attention, tk.decode_attention], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs_raise_and_leave_inputs_untouched(run, case):
    _, args, match = case
    expect_error(lambda: run(*args), [a for a in args if isinstance(a, torch.Tensor)], match)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(32, 8, 128), (32, 32, 128), (9, 3, 64), (24, 3, 64), (8, 1, 256)])
def test_cuda_matches_reference(H, Hkv, D, dtype):
    C = 1000
    q, cache = make_case(4, H, Hkv, C, D, [0, 1, C, 517], dtype, "cuda")
    for with_scores in (False, True):
        check_against_reference(torch.ops.squeeze.decode_attention, q, cache, D**-0.5, with_scores, dtype)


@pytest.mark.cuda
def test_cuda_long_ragged_lengths():
    C = 16384
    lens = [C, 4321, 16000, 1]
    q, cache = make_case(4, 32, 8, C, 128, lens, torch.bfloat16, "cuda")
    check_against_reference(torch.ops.squeeze.decode_attention, q, cache, 128**-0.5, True, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel():
    q, cache = make_case(3, 12, 4, 300, 64, [300, 0, 129], torch.float16)
    k, v, lens, _, scores = cache
    s_cpu, s_gpu = scores.clone(), scores.cuda()
    out_cpu = torch.ops.squeeze.decode_attention(q, k, v, lens, 0.125, s_cpu)
    out_gpu = torch.ops.squeeze.decode_attention(*(t.cuda() for t in (q, k, v, lens)), 0.125, s_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-4, atol=1e-5)
