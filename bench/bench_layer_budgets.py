"""kmeans1d + layer_budgets (one launch) vs the plain ways to plan budgets: a PyTorch Lloyd
loop with host convergence checks, and a round trip to the host (numpy Lloyd, sklearn-free).

CPU: `pytest bench/bench_layer_budgets.py --benchmark-only`.
GPU table: `python -m bench.bench_layer_budgets` (--quick: small grid, also on CPU).
Target (H100/H200, B <= 64, L <= 128): <= 15 us of GPU time, no host synchronisation.
"""
import argparse

import numpy as np
import torch

import squeeze_ops  # noqa: F401  (registers torch.ops.squeeze.*)
from bench.common import copy_bandwidth, environment, time_us, write_table

P, K, MIN_BUDGET = 0.381, 3, 1


def make_inputs(B, L, device):
    sim = (0.8 + 0.2 * torch.rand(B, L)).to(device)
    base = (500 + 2000 * torch.rand(B)).to(device)
    return sim, base


def squeeze_plan(sim, base):
    return torch.ops.squeeze.layer_budgets(sim, base, P, K, MIN_BUDGET, None)


def apply_formula(labels, base, L, xp):
    """The authors' reallocation from group labels (the top group is K - 1), in array module xp."""
    top = labels == K - 1
    G = top.sum(1, keepdims=True) if xp is np else top.sum(1, keepdim=True)
    base = base[:, None]
    other = xp.floor(base * (L - P * G) / (L - G).clip(min=1))
    uniform = (G == 0) | (G == L)
    budgets = xp.where(uniform, xp.floor(base), xp.where(top, xp.floor(P * base), other))
    return budgets.clip(min=MIN_BUDGET)


def torch_lloyd_plan(sim, base, max_iter=100):
    """Lloyd's algorithm batched over sequences, quantile init, host check for convergence
    each iteration (what a plain PyTorch engine would write), then the formula."""
    B, L = sim.shape
    x = sim.double()
    centroids = x.sort(1).values[:, torch.linspace(0, L - 1, K).round().long()]
    for _ in range(max_iter):
        labels = (x[:, :, None] - centroids[:, None, :]).abs().argmin(-1)
        onehot = torch.nn.functional.one_hot(labels, K).double()
        counts = onehot.sum(1)
        new = torch.where(counts > 0, (onehot * x[:, :, None]).sum(1) / counts.clamp_min(1), centroids)
        if torch.equal(new, centroids):  # host synchronisation
            break
        centroids = new
    rank = centroids.argsort(1).argsort(1)  # groups numbered by ascending centroid
    labels = rank.gather(1, labels)
    return apply_formula(labels, base.double(), L, torch).int(), labels.int(), centroids.sort(1).values.float()


def numpy_lloyd_plan(sim, base, max_iter=100):
    """Host round trip: copy to the host, Lloyd's algorithm in numpy, copy the budgets back."""
    x, b = sim.cpu().double().numpy(), base.cpu().double().numpy()
    B, L = x.shape
    centroids = np.sort(x, 1)[:, np.round(np.linspace(0, L - 1, K)).astype(int)]
    for _ in range(max_iter):
        labels = np.abs(x[:, :, None] - centroids[:, None, :]).argmin(-1)
        onehot = labels[:, :, None] == np.arange(K)
        counts = onehot.sum(1)
        new = np.where(counts > 0, (onehot * x[:, :, None]).sum(1) / np.maximum(counts, 1), centroids)
        if np.array_equal(new, centroids):
            break
        centroids = new
    labels = np.argsort(np.argsort(centroids, 1), 1)[np.arange(B)[:, None], labels]
    budgets = apply_formula(labels, b, L, np).astype(np.int32)
    return torch.from_numpy(budgets).to(sim.device)


# ---- pytest-benchmark (CPU kernel vs plain PyTorch) ----

def test_cpu_layer_budgets(benchmark):
    sim, base = make_inputs(8, 32, "cpu")
    budgets, _, _ = benchmark(squeeze_plan, sim, base)
    assert budgets.shape == (8, 32)


def test_cpu_torch_lloyd(benchmark):
    sim, base = make_inputs(8, 32, "cpu")
    budgets, _, _ = benchmark(torch_lloyd_plan, sim, base)
    assert budgets.shape == (8, 32)


def test_cpu_numpy_lloyd(benchmark):
    sim, base = make_inputs(8, 32, "cpu")
    budgets = benchmark(numpy_lloyd_plan, sim, base)
    assert budgets.shape == (8, 32)


# ---- GPU table ----

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small grid (works on CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = [(1, 32), (8, 80)] if args.quick else [(B, L) for B in (1, 8, 64) for L in (32, 80, 128)]
    providers = {"squeeze": squeeze_plan, "torch Lloyd": torch_lloyd_plan, "host numpy Lloyd": numpy_lloyd_plan}
    bw = copy_bandwidth(device)
    rows = []
    for B, L in grid:
        sim, base = make_inputs(B, L, device)
        nbytes = B * L * 4 + B * 4 + 2 * B * L * 4 + B * K * 4  # sim, base in; budgets, labels, centroids out
        timings = {}
        if device == "cuda":
            # The op in a CUDA graph (GPU time of the launch), and launched eagerly (+ host cost).
            timings["squeeze (CUDA graph)"] = time_us(lambda: squeeze_plan(sim, base), device, cuda_graph=True)
        for name, fn in providers.items():
            timings[name] = time_us(lambda: fn(sim, base), device)
        ref = timings.get("squeeze (CUDA graph)", timings["squeeze"])[0]
        for name, (med, p20, p80) in timings.items():
            rows.append({"B": B, "L": L, "provider": name, "time_us": med, "p20_us": p20, "p80_us": p80,
                         "bytes": nbytes, "GB/s": nbytes / med / 1e3,
                         "% copy bw": 100 * nbytes / (med * 1e-6) / bw, "slower than squeeze": med / ref})
    columns = ["B", "L", "provider", "time_us", "p20_us", "p80_us", "bytes", "GB/s", "% copy bw",
               "slower than squeeze"]
    note = (f"k = {K}, p = {P}. Copy bandwidth of this run: {bw / 1e9:.0f} GB/s. Latency-bound: the bandwidth "
            "columns only show how far from it. Target: squeeze <= 15 us (CUDA graph) for B <= 64, L <= 128.")
    # Smoke runs (quick, or on the CPU) stay out of bench/results/.
    name = "layer_budgets_quick" if args.quick or device == "cpu" else "layer_budgets"
    print(write_table(name, rows, columns, environment(device), note))


if __name__ == "__main__":
    main()
