"""Every Triton kernel of the library compiles for an H100/H200 (sm_90) on this GPU-less machine.

The interpreter runs the kernels' Python semantics but skips the GPU compiler, which rejects
things the interpreter accepts (non-constexpr globals, layout or type mismatches in loops). This
compiles the variants the launchers really launch on the GPU (their constexprs, dtypes, tiles,
num_warps, num_stages and FP fusion, taken from the launchers' own helpers where they have one), with
pointers and aligned strides specialised to 16-byte divisibility as the runtime does, down to a
cubin through Triton's bundled ptxas. The compiles run in a subprocess because TRITON_INTERPRET
(set by conftest) swaps @triton.jit for the interpreter; there is one test per kernel module so
that a failure names the module.
"""
import json
import os
import subprocess
import sys
import traceback

import pytest
import triton


def compile_for_sm90(fn, pointers, constexprs, floats=(), aligned=(), num_warps=4, num_stages=2):
    """Compiles `fn` for sm_90. pointers: element type of every pointer argument; floats: the fp32
    scalar arguments; every other non-constexpr argument is int32. Pointers and the `aligned` ints
    (strides that are multiples of 16 at run time) are marked divisible by 16; unit strides are
    passed in `constexprs` as 1, as the runtime specialises them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from squeeze_ops.triton_kernels import FP_FUSION

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name in pointers or (name in aligned and name not in constexprs)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=divisible)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=FP_FUSION))
    assert kernel.asm["cubin"], fn.__name__


def compile_decode_kernel(fn, kv_dtype, constexprs, num_warps, num_stages=2):
    """The decode/cache kernels name their pointers *_ptr (fp32 buffers unless K/V/q/out, int32
    for lengths, positions, budgets and page ids) and their strides stride_*; the position and
    score pages' slot strides (stride_ps, stride_ss) are 1."""
    pointers = {n: "fp32" for n in fn.arg_names if n.endswith("_ptr")}
    pointers.update({n: "i32" for n in ("lens_ptr", "n_ptr", "tokpos_ptr", "pos_ptr", "budget_ptr", "table_ptr")})
    pointers.update({n: kv_dtype for n in ("q_ptr", "k_ptr", "v_ptr", "knew_ptr", "vnew_ptr", "out_ptr")})
    units = {n: 1 for n in ("stride_ps", "stride_ss") if n in fn.arg_names}
    compile_for_sm90(fn, {n: t for n, t in pointers.items() if n in fn.arg_names}, dict(constexprs, **units),
                     floats=("scale_log2",), aligned=[n for n in fn.arg_names if n.startswith("stride")],
                     num_warps=num_warps, num_stages=num_stages)


def cache_ops():
    from squeeze_ops.triton_kernels import cache_ops as co
    from squeeze_ops.triton_kernels import common as cm

    # cache_evict_ launches with BLOCK_C=evict_block(C), num_warps=8; cache_append_ with num_warps 4.
    for kv, C, D, policy, ratio, page in [("bf16", 16384, 128, "h2o", 0.5, 16), ("fp16", 4096, 128, "h2o", 0.7, 1),
                                          ("bf16", 1000, 64, "streaming", 0.0, 16), ("fp16", 512, 64, "window", 0.0,
                                                                                     512)]:
        compile_decode_kernel(co._evict_kernel, kv, dict(PAGE=page, RECENT_RATIO=ratio, POLICY=co.POLICY_CODES[policy],
                                                         BLOCK_C=cm.evict_block(C), BLOCK_D=cm.block_d(D)),
                              num_warps=8)
    for kv, D, page in [("bf16", 128, 16), ("fp16", 64, 1)]:
        compile_decode_kernel(co._append_kernel, kv, dict(PAGE=page, BLOCK_D=cm.block_d(D)), num_warps=4)


def decode_attention():
    from squeeze_ops.triton_kernels import common as da

    # Split pass as run_decode launches it: BLOCK_H = max(16, next_pow2(G)), num_warps 4, num_stages 2.
    for kv, G, D, append, scores, page in [("bf16", 4, 128, True, True, 16), ("bf16", 4, 128, False, False, 16),
                                           ("fp16", 4, 128, True, True, 64), ("bf16", 8, 128, False, True, 1),
                                           ("bf16", 1, 64, False, False, 16), ("fp16", 3, 64, True, False, 7),
                                           ("bf16", 2, 256, True, True, 16)]:
        compile_decode_kernel(da._split_kernel, kv, dict(
            G=G, D=D, S=4, PAGE=page, BLOCK_H=max(16, da.decode_tiles(G, 1, D).block_g), BLOCK_N=da.BLOCK_N,
            BLOCK_D=da.block_d(D), APPEND=append, SCORES=scores, DOT_PRECISION="tf32"), num_warps=4, num_stages=2)
    # Combine pass: SCORE_BLOCK and EVICT_BLOCK from the capacity as run_decode derives them, num_warps 8.
    for kv, G, C, scores, evict, policy in [("bf16", 4, 16384, True, True, "h2o"),
                                            ("fp16", 3, 1000, False, True, "streaming"),
                                            ("bf16", 1, 512, False, False, "window")]:
        tiles = da.decode_tiles(G, C, 128)
        compile_decode_kernel(da._combine_kernel, kv, dict(
            G=G, D=128, S=4, PAGE=16, BLOCK_G=tiles.block_g, BLOCK_D=tiles.block_d,
            SCORE_BLOCK=tiles.score_block, EVICT_BLOCK=tiles.evict_block,
            SCORES=scores, EVICT=evict, POLICY=da.POLICY_CODES[policy], RECENT_RATIO=0.5), num_warps=8)


def prefill_attention():
    from squeeze_ops.triton_kernels import prefill_attention as pa

    # q/k/v [T, heads, D] with D contiguous: every stride is a multiple of D (>= 16).
    strides = ("sq_t", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "so_t", "so_h")
    # Both key-tile addressings where this Triton has block pointers (before 3.9).
    addressings = [True, False] if pa.block_pointers() else [False]
    for kv, D, H, Hkv in [("bf16", 128, 32, 8), ("bf16", 128, 64, 8), ("bf16", 64, 32, 32),
                          ("fp16", 128, 32, 32), ("fp16", 64, 32, 8), ("fp32", 64, 6, 2)]:
        attention, scores = pa.tiles("cuda", D)
        precision = "ieee" if kv == "fp32" else "tf32"
        for block_pointers in addressings:
            compile_for_sm90(pa._attention_kernel, dict(Q=kv, K=kv, V=kv, CU="i32", Out=kv, Lse="fp32"), dict(
                H=H, GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=attention.block_m, BLOCK_N=attention.block_n,
                DOT_PRECISION=precision, BLOCK_POINTERS=block_pointers),
                floats=("qk_scale",), aligned=strides, num_warps=attention.num_warps,
                num_stages=attention.num_stages)
        compile_for_sm90(pa._column_scores_kernel, dict(Q=kv, K=kv, CU="i32", Lse="fp32", Scores="fp32"), dict(
            H=H, HKV=Hkv, GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=scores.block_m, BLOCK_N=scores.block_n,
            DOT_PRECISION=precision),
            floats=("qk_scale",), aligned=strides, num_warps=scores.num_warps, num_stages=scores.num_stages)


def compress_kv():
    from squeeze_ops.triton_kernels import compress_kv as ck

    # compress_kv_ launches one program per (sequence, KV head) with the GPU's tiles("cuda");
    # HAS_SCORES is off when prefill computed no column scores.
    block, block_t = ck.tiles("cuda")
    strides = ("sk_t", "sk_h", "sv_t", "sv_h", "skp_p", "skp_s", "svp_p", "svp_s", "spp_p", "ssp_p")
    for kv, D, policy, has_scores, page in [("bf16", 128, "h2o", True, 16), ("bf16", 128, "streaming", False, 16),
                                            ("bf16", 128, "window", False, 1), ("fp16", 64, "h2o", True, 64),
                                            ("fp16", 64, "streaming", True, 5)]:
        pointers = dict(K=kv, V=kv, Scores="fp32", CU="i32", Budget="i32", Recent="i32", KP=kv, VP=kv,
                        PosP="i32", ScoreP="fp32", Table="i32", Lens="i32")
        compile_for_sm90(ck._compress_kv_kernel, pointers, dict(
            spp_s=1, ssp_s=1, HKV=8, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), PAGE=page,
            POLICY=ck.POLICY_CODES[policy], HAS_SCORES=has_scores, BLOCK=block, BLOCK_T=block_t), aligned=strides,
            num_warps=ck.NUM_WARPS)
    for radius, use_max in [(2, False), (3, True)]:  # the pooling launch before it (pool_size > 1)
        compile_for_sm90(ck._pool_kernel, dict(Scores="fp32", Pooled="fp32", CU="i32"), dict(
            RADIUS=radius, MAX=use_max, HKV=8, BLOCK=block_t), num_warps=ck.NUM_WARPS)


def add_rmsnorm_cossim():
    from squeeze_ops.triton_kernels import add_rmsnorm_cossim as ar

    # launch(): NORM is off for add_cossim, COSSIM off for the benchmark baseline (or no sequence);
    # tiles and warps from _config(d); row strides are d (a multiple of 16 here), cos_sum's is 1.
    for dtype, d, norm, cossim, B in [("bf16", 4096, True, True, 8), ("bf16", 4096, False, True, 8),
                                      ("bf16", 4096, True, False, 8), ("bf16", 4096, False, False, 0),
                                      ("fp16", 4096, True, True, 1), ("bf16", 8192, True, True, 3),
                                      ("fp16", 896, True, True, 2)]:
        block_d, rows, num_warps = ar._config(d)
        pointers = dict(res_ptr=dtype, attn_ptr=dtype, w_ptr=dtype, out_ptr=dtype, cu_ptr="i32", cos_ptr="fp32")
        compile_for_sm90(ar._epilogue_kernel, pointers, dict(
            stride_cos=1, NORM=norm, COSSIM=cossim, ROWS=rows, BLOCK_D=block_d,
            SEARCH_STEPS=max(B - 1, 0).bit_length()),
            floats=("eps",), aligned=("stride_res", "stride_attn", "stride_out"),
            num_warps=num_warps)


MODULES = {f.__name__: f for f in (cache_ops, decode_attention, prefill_attention, compress_kv, add_rmsnorm_cossim)}


@pytest.fixture(scope="module")
def compile_results(request):
    """Compiles the modules of every selected test in one subprocess (importing torch and the
    library takes longer than most compiles); maps each module to its traceback, or "" if it
    compiled, or the reason when this Triton cannot compile ahead of time."""
    modules = [item.callspec.params["module"] for item in request.session.items
               if item.originalname == "test_triton_kernels_compile_for_sm90"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *modules], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.strip(), run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", list(MODULES))
def test_triton_kernels_compile_for_sm90(module, compile_results):
    result = compile_results[module]
    if result.startswith("sm_90 compile unavailable"):
        pytest.skip(result)
    assert not result, f"{module} does not compile for sm_90:\n{result}"


if __name__ == "__main__":
    results = {}
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # a Triton without the ahead-of-time compile API
        results = {name: f"sm_90 compile unavailable: {e}" for name in sys.argv[1:]}
    for name in sys.argv[1:]:
        if name not in results:
            try:
                MODULES[name]()
                results[name] = ""
            except Exception:
                results[name] = traceback.format_exc()
    print(json.dumps(results))
