"""Host cost of one layer's decode step, eager: what the Python path of the Triton decode_step_
launcher costs before the GPU sees anything, at the SmolLM2 shape (H 9 / Hkv 3 / D 64, rows of
256 tokens in 16-slot pages), B 1..64; a step of that model runs it 30 times (per_step_us).

    python -m bench.bench_launch [--device cuda]     (writes bench/results/launch_<device>.md)

Paths, per layer:
  checks               the launcher's argument checks and output allocation (_checks.decode_step_)
  launcher             triton_kernels.decode_step.decode_step_ as it runs on a GPU (no value
                       checks): checks, split plan, buffer allocation, the two launches' argument
                       lists; the kernels' launches replaced by no-ops (launches_skipped)
  dispatch+launcher    the same launcher reached through the dispatcher as a CUDA call reaches it
                       (on the CPU an op of the same schema whose CPU kernel is the launcher,
                       Library.impl; on a GPU torch.ops.squeeze.decode_step_ itself)
  op on CPU (C++)      torch.ops.squeeze.decode_step_ on CPU tensors: dispatch, the C++ checks
                       and the C++ kernel's work (value checks included), for comparison
Triton's own launch cost (binding the arguments, the compiled-kernel lookup, the driver call; about
17 us per launch on the H100, docs/DEVICE.md) is not included on the CPU. On a GPU (--device cuda)
two more rows time it: the launcher and the op with their real launches (host time per call,
the GPU's work on these short rows being smaller).
"""
import argparse
import contextlib
import os
import statistics
import time

import torch

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import environment, paged_layer, sync, write_table
from squeeze_ops import _checks
from squeeze_ops.triton_kernels import common, decode_step

H, HKV, D, HELD, PAGE, LAYERS = 9, 3, 64, 256, 16, 30  # SmolLM2-135M's attention, 30 layers
BATCHES = (1, 4, 16, 64)


def _no_launch(*args, **kwargs):
    return None


@contextlib.contextmanager
def launches_skipped():
    """Within the block the decode kernels' launches (`kernel[grid](...)` of common._split_kernel and
    common._combine_kernel) do nothing: what a launcher call costs then is its own Python path."""
    kernels = (common._split_kernel, common._combine_kernel)
    saved = [vars(k).get("run") for k in kernels]
    for k in kernels:
        k.run = _no_launch  # KernelInterface.__getitem__ calls self.run: the instance attribute wins
    try:
        yield
    finally:
        for k, run in zip(kernels, saved):
            if run is None:
                del k.run
            else:
                k.run = run


_DISPATCHED = None  # the bench namespace's op, defined once per process


def dispatched_launcher():
    """squeeze_bench::decode_step_: the schema of squeeze::decode_step_ with the Triton launcher as
    its CPU kernel (Library.impl, as _library registers it for CUDA), so that a CPU call pays the
    dispatch a CUDA call pays."""
    global _DISPATCHED
    if _DISPATCHED is None:
        lib = torch.library.Library("squeeze_bench", "DEF")
        lib.define(str(torch.ops.squeeze.decode_step_.default._schema).split("::", 1)[1])
        lib.impl("decode_step_", decode_step.decode_step_, "CPU")
        _DISPATCHED = lib, torch.ops.squeeze_bench.decode_step_
    return _DISPATCHED[1]


def step_args(B, device):
    """The arguments of one layer's decode_step_ over B sequences in the steady state (rows of
    HELD tokens at budget HELD, shuffled 16-slot pages), in the op's order."""
    g = torch.Generator().manual_seed(B)
    q = torch.randn(B, H, D, generator=g).to(device)
    k, v = (torch.randn(B, HKV, HELD, D, generator=g).to(device) for _ in range(2))
    lens = torch.full((B, HKV), HELD, dtype=torch.int32, device=device)
    k_new, v_new = (torch.randn(B, HKV, D, generator=g).to(device) for _ in range(2))
    pos = torch.full((B,), HELD, dtype=torch.int32, device=device)
    return (q, k_new, v_new, pos, *paged_layer(k, v, lens, PAGE, g), lens, lens.clone(), D**-0.5, "h2o", 4, 0.5,
            True)


def per_call_us(fn, device, calls=200, repeats=15):
    """Median, p20 and p80 over `repeats` runs of the mean time of `calls` calls of fn, in
    microseconds. On the CPU the calling thread's CPU time (time.thread_time: the host cost, not
    the time the thread waited for a core when other jobs share it); on a GPU the wall time up to
    a synchronisation after each run (the host cost when the device keeps up)."""
    clock = time.thread_time if device == "cpu" else time.perf_counter
    for _ in range(10):
        fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        sync(device)
        runs.append((clock() - t0) / calls * 1e6)
    runs.sort()
    return statistics.median(runs), runs[len(runs) // 5], runs[(4 * len(runs)) // 5]


def paths(args, device):
    """name -> (zero-argument callable, whether its kernels really run) of every path timed on
    `device` (see the module docstring). On a GPU the op itself dispatches to the launcher."""
    fns = {
        "checks": (lambda: _checks.decode_step_(*args), False),
        "launcher": (lambda: decode_step.decode_step_(*args), False),
    }
    if device == "cpu":
        fns["dispatch+launcher"] = (lambda: dispatched_launcher()(*args), False)
        fns["op on CPU (C++)"] = (lambda: torch.ops.squeeze.decode_step_(*args), True)
    else:
        fns["dispatch+launcher"] = (lambda: torch.ops.squeeze.decode_step_(*args), False)
        fns["launcher + Triton launches"] = (lambda: decode_step.decode_step_(*args), True)
        fns["op + Triton launches"] = (lambda: torch.ops.squeeze.decode_step_(*args), True)
    return fns


def run_table(device, batches=BATCHES, calls=200, repeats=15):
    """Rows (dicts) of every batch and path."""
    rows = []
    for B in batches:
        args = step_args(B, device)
        for name, (fn, real) in paths(args, device).items():
            with contextlib.ExitStack() as stack:
                if not real:
                    stack.enter_context(launches_skipped())
                    stack.enter_context(_checks.forced_value_checks(False))  # as on a GPU without SQUEEZE_DEBUG
                med, p20, p80 = per_call_us(fn, device, calls, repeats)
            rows.append(dict(B=B, path=name, us_per_layer=med, p20_us=p20, p80_us=p80, per_step_us=LAYERS * med))
            print(f"B {B:3d} {name:28s} {med:8.2f} us per layer ({p20:.2f} - {p80:.2f}), "
                  f"{LAYERS * med / 1e3:.2f} ms per step", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (the host path is one thread)")
    parser.add_argument("--quick", action="store_true", help="B 1 and 16, fewer calls (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = run_table(args.device, (1, 16), 20, 3) if args.quick else run_table(args.device)
    env = environment(args.device)
    note = (f"Host cost per layer of one decode step at H {H} / Hkv {HKV} / D {D} (SmolLM2-135M), rows of {HELD} "
            f"tokens in pages of {PAGE}, eager; per_step_us = {LAYERS} layers. Triton's own launch cost is not "
            "included in the rows with launches skipped (the kernels' launches are no-ops there). "
            + ("Times: the calling thread's CPU time. " if args.device == "cpu" else "Times: wall clock. ")
            + "torch threads "
            f"{torch.get_num_threads()}; 1-minute load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at "
            "the end (other jobs shared the cores when it is above the thread count).")
    columns = ["B", "path", "us_per_layer", "p20_us", "p80_us", "per_step_us"]
    print(write_table(f"launch_{args.device}" + ("_quick" if args.quick else ""), rows, columns, env, note))


if __name__ == "__main__":
    main()
