"""prefill_attention: the C++ CPU kernel and the Triton kernels (interpreter on CPU tensors
here, the GPU when there is one) against the reference, plus opcheck and bad inputs."""
import pytest
import torch

import squeeze_ops
from conftest import TRITON_DEVICE
from fences import fenced
from squeeze_ops import reference
from squeeze_ops.triton_kernels import prefill_attention as triton_prefill

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def packed_batch(lengths, H, Hkv, D, dtype=torch.float32, device="cpu", fused=False):
    """q [T, H, D], k/v [T, Hkv, D] and cu_seqlens for sequences of the given lengths. fused:
    views of one [T, H + 2 Hkv, D] projection, as an engine's QKV split gives them."""
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    if fused:
        qkv = torch.randn(T, H + 2 * Hkv, D, device=device).to(dtype)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=1)
    else:
        q, k, v = (torch.randn(T, h, D, device=device).to(dtype) for h in (H, Hkv, Hkv))
    return q, k, v, cu


def assert_matches_reference(got, q, k, v, cu, scale, score_queries):
    out, lse, scores = got
    ref_out, ref_lse, ref_scores = reference.prefill_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), 0, scale,
                                                               score_queries)
    tol = TOL[q.dtype]
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and scores.dtype == torch.float32
    assert scores.shape == ref_scores.shape
    torch.testing.assert_close(out.float().cpu(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=tol, rtol=tol)
    # Scores sum up to thousands of probabilities: compare relative to the window size.
    torch.testing.assert_close(scores.cpu(), ref_scores, atol=tol * 4, rtol=tol * 4)


def run_op(q, k, v, cu, scale, score_queries):
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return torch.ops.squeeze.prefill_attention(q, k, v, cu, max_seqlen, scale, score_queries)


CASES = [  # lengths, H, Hkv, D
    ([1], 4, 4, 64),
    ([37], 6, 2, 64),
    ([5, 0, 64, 1, 100], 8, 2, 128),
    ([130, 17], 3, 1, 64),
    ([0], 2, 2, 64),
    ([600, 3, 300], 4, 1, 64),  # several CPU tiles (64 queries x 256 keys) per sequence
]


@pytest.mark.parametrize("lengths,H,Hkv,D", CASES)
@pytest.mark.parametrize("score_queries", [-1, 0, 1, 7, 300, 1000])
def test_cpu_kernel_matches_reference(lengths, H, Hkv, D, score_queries):
    q, k, v, cu = packed_batch(lengths, H, Hkv, D)
    got = run_op(q, k, v, cu, D**-0.5, score_queries)
    assert_matches_reference(got, q, k, v, cu, D**-0.5, score_queries)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_kernel_half_precision_and_strided_views(dtype):
    q, k, v, cu = packed_batch([45, 3, 70], 12, 4, 64, dtype, fused=True)
    assert not q.is_contiguous()
    got = run_op(q, k, v, cu, 0.11, 0)
    assert_matches_reference(got, q, k, v, cu, 0.11, 0)


def test_scores_are_probability_mass():
    # Every query distributes probability 1 per head: the scores of a sequence add up to
    # (queries in the window) x (query heads per KV head).
    lengths, G = [50, 9, 200], 3
    q, k, v, cu = packed_batch(lengths, 2 * G, 2, 64)
    for window, counted in ((0, lengths), (16, [16, 9, 16])):
        _, _, scores = run_op(q, k, v, cu, 0.2, window)
        sums = torch.stack([s.sum(0) for s in scores.split(lengths)])
        torch.testing.assert_close(sums, G * torch.tensor(counted, dtype=torch.float32)[:, None].expand(3, 2),
                                   rtol=1e-5, atol=1e-4)


def test_public_wrapper_defaults():
    q, k, v, cu = packed_batch([20, 33], 4, 2, 64)
    out, lse, scores = squeeze_ops.prefill_attention(q, k, v, cu)
    assert scores.shape == (0, 2)
    assert_matches_reference((out, lse, scores), q, k, v, cu, 64**-0.5, -1)
    _, _, scores = squeeze_ops.prefill_attention(q, k, v, cu, score_queries=0)
    assert scores.shape == (53, 2)


@pytest.mark.parametrize("score_queries", [-1, 0, 4])
def test_opcheck(score_queries):
    q, k, v, cu = packed_batch([9, 0, 21], 4, 2, 64)
    torch.library.opcheck(torch.ops.squeeze.prefill_attention.default, (q, k, v, cu, 21, 0.125, score_queries))


# ---- the Triton launcher, called directly ----

TRITON_CASES = [  # lengths, H, Hkv, D, dtype, score_queries
    ([1], 2, 2, 64, torch.float32, 0),
    ([40, 0, 17, 3], 3, 1, 64, torch.float32, 0),
    ([33, 16], 8, 2, 128, torch.float16, 5),
    ([29], 4, 4, 32, torch.float32, -1),
    ([9, 20], 4, 2, 64, torch.float32, 1),
]


def poisoned_meta(monkeypatch):
    """Makes the launcher's outputs start as NaN, so that an unwritten element shows."""
    allocate = triton_prefill._checks.prefill_attention

    def poisoned(*args):
        return tuple(t.fill_(float("nan")) for t in allocate(*args))

    monkeypatch.setattr(triton_prefill._checks, "prefill_attention", poisoned)


# Key-tile addressings this Triton can run: block pointers (before 3.9) and pointer tensors.
ADDRESSINGS = [True, False] if triton_prefill.block_pointers() else [False]


@pytest.mark.parametrize("block_pointers", ADDRESSINGS, ids=lambda b: "block_ptr" if b else "pointers")
@pytest.mark.parametrize("lengths,H,Hkv,D,dtype,score_queries", TRITON_CASES)
def test_triton_launcher_matches_reference(monkeypatch, lengths, H, Hkv, D, dtype, score_queries, block_pointers):
    poisoned_meta(monkeypatch)
    q, k, v, cu = packed_batch(lengths, H, Hkv, D, dtype, TRITON_DEVICE, fused=True)
    got = triton_prefill.launch(q, k, v, cu, max(lengths), D**-0.5, score_queries,
                                *triton_prefill.tiles(q.device, D), use_block_pointers=block_pointers)
    assert_matches_reference(got, q, k, v, cu, D**-0.5, score_queries)


def test_triton_launcher_default_addressing(monkeypatch):
    # What the op runs: the launcher's own choice for this Triton.
    poisoned_meta(monkeypatch)
    q, k, v, cu = packed_batch([40, 0, 17], 3, 1, 64, torch.float32, TRITON_DEVICE, fused=True)
    got = triton_prefill.prefill_attention(q, k, v, cu, 40, 0.125, 0)
    assert_matches_reference(got, q, k, v, cu, 0.125, 0)


@pytest.mark.parametrize("block_pointers", ADDRESSINGS, ids=lambda b: "block_ptr" if b else "pointers")
def test_triton_launcher_with_gpu_tiles(monkeypatch, block_pointers):
    # The tile sizes the GPU runs (128-query tiles), crossed by a ragged batch.
    poisoned_meta(monkeypatch)
    q, k, v, cu = packed_batch([150, 70], 4, 1, 128, torch.float16, TRITON_DEVICE)
    attention_tiles, score_tiles = triton_prefill.tiles("cuda", 128)
    got = triton_prefill.launch(q, k, v, cu, 150, 0.09, 0, attention_tiles, score_tiles,
                                use_block_pointers=block_pointers)
    assert_matches_reference(got, q, k, v, cu, 0.09, 0)


# ---- bad inputs ----

def bad_inputs():
    """(name, args, what the message must mention, value check) for the schema's arguments."""
    q, k, v, cu = packed_batch([5, 7], 4, 2, 64)
    ok = (q, k, v, cu, 7, 0.125, 0)

    def replace(i, x):
        args = list(ok)
        args[i] = x
        return tuple(args)

    return [
        ("q rank", replace(0, q[0]), "^q:", False),
        ("q dtype", replace(0, q.long()), "^q:", False),
        ("k dtype", replace(1, k.half()), "^k, v:", False),
        ("v shape", replace(2, v[:, :1]), "^v:", False),
        ("k tokens", replace(1, k[1:]), "^(k|v):", False),
        ("head dim", replace(1, k[..., :32]), "^(k|v):", False),
        ("H % Hkv", replace(0, q[:, :3]), "^k: the number of KV heads", False),
        ("q layout", replace(0, q.transpose(1, 2).contiguous().transpose(1, 2)), "^q: last dim", False),
        ("cu dtype", replace(3, cu.long()), "^cu_seqlens:", False),
        ("cu rank", replace(3, cu[None]), "^cu_seqlens:", False),
        ("max_seqlen < 0", replace(4, -1), "^max_seqlen:", False),
        ("cu total", replace(3, torch.tensor([0, 5, 11], dtype=torch.int32)), "^cu_seqlens:", True),
        ("cu start", replace(3, torch.tensor([1, 5, 12], dtype=torch.int32)), "^cu_seqlens:", True),
        ("cu order", replace(3, torch.tensor([0, 8, 7, 12], dtype=torch.int32)), "^cu_seqlens:", True),
        ("max_seqlen short", replace(4, 6), "^max_seqlen:", True),
    ]


@pytest.mark.parametrize("name,args,mention,_", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_cpu_kernel_rejects_bad_inputs(name, args, mention, _):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((RuntimeError, ValueError), match=mention):
        torch.ops.squeeze.prefill_attention(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name,args,mention,value_check", bad_inputs(), ids=[c[0] for c in bad_inputs()])
def test_triton_launcher_rejects_bad_inputs(name, args, mention, value_check):
    # CPU tensors: the launcher runs the value checks too (on the GPU only under SQUEEZE_DEBUG=1).
    with pytest.raises(ValueError, match=mention):
        triton_prefill.prefill_attention(*args)


@pytest.mark.parametrize("block_pointers", [True, False], ids=["block-pointers", "pointer-tensors"])
@pytest.mark.parametrize("cu", [[0, 25, 3, 20], [-7, 5, 40, 20], [0, 20, 20, 100], [30, 2, -1, 0]])
def test_triton_launcher_stays_in_bounds_for_any_cu_seqlens(monkeypatch, no_value_checks, cu, block_pointers):
    """Without SQUEEZE_DEBUG the launcher reads no cu_seqlens value on the host (a GPU sync):
    offsets past T, negative or decreasing ones, and a max_seqlen past every sequence are
    clamped inside the kernels. They write nothing outside their outputs, and read nothing
    outside q/k/v (NaN fences around them would show in the outputs, zeroed where unwritten)."""
    if block_pointers and not triton_prefill.block_pointers():
        pytest.skip("this Triton has no block pointers")
    q, k, v, _ = packed_batch([20], 4, 2, 64, device=TRITON_DEVICE)
    (q, _), (k, _), (v, _) = (fenced(t, float("nan")) for t in (q, k, v))
    outputs = []  # (view, intact) of every output the launcher allocates
    allocate = triton_prefill._checks.prefill_attention

    def fenced_outputs(*args):
        outputs.extend(fenced(t.zero_()) for t in allocate(*args))
        return tuple(view for view, _ in outputs[-3:])

    monkeypatch.setattr(triton_prefill._checks, "prefill_attention", fenced_outputs)
    cu = torch.tensor(cu, dtype=torch.int32, device=TRITON_DEVICE)
    tiles = triton_prefill.tiles(q.device, q.shape[2])
    for score_queries in (0, 4):
        triton_prefill.launch(q, k, v, cu, 64, 0.125, score_queries, *tiles, use_block_pointers=block_pointers)
    assert len(outputs) == 6
    for view, intact in outputs:
        intact()
        assert not view.isnan().any()


def test_triton_launcher_rejects_unsupported_head_dim():
    q, k, v, cu = packed_batch([5], 2, 2, 24)
    with pytest.raises(ValueError, match="head dim"):
        triton_prefill.prefill_attention(q, k, v, cu, 5, 0.2, 0)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("score_queries", [-1, 0, 32])
def test_cuda_matches_reference(D, dtype, score_queries):
    q, k, v, cu = packed_batch([1, 300, 0, 1029, 64], 12, 3, D, dtype, "cuda", fused=True)
    got = squeeze_ops.prefill_attention(q, k, v, cu, 1029, D**-0.5, score_queries)
    assert_matches_reference(got, q, k, v, cu, D**-0.5, score_queries)


@pytest.mark.cuda
def test_cuda_long_prompt_bf16():
    # 16k tokens: compared with SDPA (out) and with the probability-mass identity (scores);
    # memory stays linear (no T x T buffer: that alone would be 16 GiB in fp32 here).
    T, H, Hkv, D = 16384, 8, 2, 128
    q, k, v, cu = packed_batch([T], H, Hkv, D, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse, scores = squeeze_ops.prefill_attention(q, k, v, cu, T, D**-0.5, 0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 64 * T * H * D
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1).repeat_interleave(H // Hkv, 0)[None],
        v.transpose(0, 1).repeat_interleave(H // Hkv, 0)[None], is_causal=True)[0].transpose(0, 1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(scores.sum(0), torch.full((Hkv,), float(T * H // Hkv), device="cuda"), rtol=1e-3,
                               atol=0)


@pytest.mark.cuda
def test_cuda_graph_capture():
    q, k, v, cu = packed_batch([100, 7], 4, 2, 64, torch.float16, "cuda")
    expected = squeeze_ops.prefill_attention(q, k, v, cu, 100, 0.125, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = torch.ops.squeeze.prefill_attention(q, k, v, cu, 100, 0.125, 0)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
