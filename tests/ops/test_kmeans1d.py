"""kmeans1d: exact optimal 1-D K-Means, C++ CPU kernel (and CUDA kernel) vs reference and
brute force; ties, fewer distinct values than k, bad inputs."""
import itertools
import os
import shutil
import subprocess

import pytest
import torch

from squeeze_ops import reference


def kmeans(x, k):
    return torch.ops.squeeze.kmeans1d(x, k)


def sse(x, labels):
    """Within-group sum of squares of a labelling, float64."""
    x = x.double()
    return sum(((x[labels == g] - x[labels == g].mean()) ** 2).sum() for g in labels.unique())


def brute_force_sse(row, k):
    """Least sum of squares over every split of the sorted distinct values into min(k, m)
    contiguous groups (equal values together)."""
    values = row.double().unique()
    m = len(values)
    kk = min(k, m)
    counts = torch.stack([(row.double() == v).sum() for v in values]).double()
    best = float("inf")
    for cuts in itertools.combinations(range(1, m), kk - 1):
        bounds = (0, *cuts, m)
        total = 0.0
        for i, j in zip(bounds, bounds[1:]):
            v, w = values[i:j], counts[i:j]
            mean = (v * w).sum() / w.sum()
            total += float((w * (v - mean) ** 2).sum())
        best = min(best, total)
    return best


def check_structure(x, k, labels, centroids):
    """Groups numbered by ascending centroid, centroids = member means, equal values share a
    label, exactly min(k, distinct) groups used, empty groups NaN."""
    for b in range(x.shape[0]):
        m = len(x[b].unique())
        kk = min(k, m)
        assert sorted(labels[b].unique().tolist()) == list(range(kk))
        means = torch.stack([x[b][labels[b] == g].double().mean() for g in range(kk)])
        torch.testing.assert_close(centroids[b, :kk].double(), means, atol=1e-6, rtol=1e-6)
        assert (centroids[b, :kk].diff() > 0).all()
        assert centroids[b, kk:].isnan().all()
        for v in x[b].unique():
            assert len(labels[b][x[b] == v].unique()) == 1


@pytest.mark.parametrize("B,N,k", [(1, 1, 1), (1, 7, 3), (5, 33, 1), (5, 33, 2), (3, 33, 3), (2, 80, 5),
                                   (1, 256, 3), (2, 17, 17)])
def test_matches_reference(B, N, k):
    x = torch.randn(B, N)
    labels, centroids = kmeans(x, k)
    ref_labels, ref_centroids = reference.kmeans1d(x, k)
    assert labels.dtype == torch.int32 and centroids.dtype == torch.float32
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, atol=1e-6, rtol=1e-6, equal_nan=True)
    check_structure(x, k, labels, centroids)


@pytest.mark.parametrize("N", range(1, 9))
def test_optimal_against_brute_force(N):
    # SimilarityWeighted values, and values from a small set (ties, fewer distinct values than k).
    rows = [torch.rand(N) for _ in range(3)] + [torch.randint(0, 3, (N,)).float() / 4 for _ in range(3)]
    for row in rows:
        for k in range(1, N + 1):
            labels, centroids = kmeans(row[None], k)
            check_structure(row[None], k, labels, centroids)
            assert float(sse(row, labels[0])) == pytest.approx(brute_force_sse(row, k), abs=1e-9, rel=1e-9)


def test_fewer_distinct_values_than_k():
    x = torch.tensor([[0.5, 0.2, 0.5, 0.5, 0.2, 0.5, 0.5, 0.2],
                      [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    labels, centroids = kmeans(x, 3)
    assert labels.tolist() == [[1, 0, 1, 1, 0, 1, 1, 0], [0] * 8]
    torch.testing.assert_close(centroids, torch.tensor([[0.2, 0.5, float("nan")], [0.3] + [float("nan")] * 2]),
                               equal_nan=True)


def test_cost_ties_pick_the_smallest_split():
    # {0},{1,2} and {0,1},{2} both cost 0.5: the split that makes the last group largest wins.
    labels, centroids = kmeans(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), 2)
    assert labels.tolist() == [[0, 1, 1], [1, 1, 0]]
    assert centroids.tolist() == [[0.0, 1.5], [0.0, 1.5]]


def test_signed_zeros_are_one_value():
    labels, _ = kmeans(torch.tensor([[-0.0, 0.0, 1.0, -0.0, 5.0]]), 3)
    assert labels.tolist() == [[0, 0, 1, 0, 2]]


def test_permutation_invariant_and_deterministic():
    x = torch.randint(0, 6, (4, 41)).float() + 0.01 * torch.randn(4, 1)
    labels, centroids = kmeans(x, 3)
    perm = torch.randperm(41)
    labels_p, centroids_p = kmeans(x[:, perm], 3)
    assert torch.equal(labels_p, labels[:, perm])
    assert torch.equal(centroids_p, centroids)
    assert torch.equal(kmeans(x, 3)[0], labels)


def test_strided_rows():
    big = torch.randn(3, 50)
    x = big[:, 5:38]  # row stride 50, last dim contiguous
    labels, centroids = kmeans(x, 4)
    ref_labels, ref_centroids = reference.kmeans1d(x.contiguous(), 4)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(centroids, ref_centroids, atol=1e-6, rtol=1e-6)


def test_empty_batch():
    labels, centroids = kmeans(torch.empty(0, 5), 2)
    assert labels.shape == (0, 5) and centroids.shape == (0, 2)


def test_opcheck():
    torch.library.opcheck(torch.ops.squeeze.kmeans1d.default, (torch.randn(3, 19), 3))


@pytest.mark.parametrize("x,k,name", [
    (torch.randn(2, 8).double(), 3, "x"),
    (torch.randn(8), 3, "x"),
    (torch.randn(2, 3, 8), 3, "x"),
    (torch.randn(8, 2).t(), 1, "x"),
    (torch.randn(2, 257), 3, "x"),
    (torch.tensor([[0.0, float("nan"), 1.0]]), 2, "x"),
    (torch.tensor([[0.0, float("inf"), 1.0]]), 2, "x"),
    (torch.randn(2, 8), 0, "k"),
    (torch.randn(2, 8), 9, "k"),
], ids=["float64", "rank1", "rank3", "last-dim-strided", "N>256", "nan", "inf", "k<1", "k>N"])
def test_bad_inputs_raise(x, k, name):
    before = x.clone()
    with pytest.raises((ValueError, RuntimeError), match=name):
        kmeans(x, k)
    torch.testing.assert_close(x, before, atol=0, rtol=0, equal_nan=True)


# ---- GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("N,k", [(1, 1), (7, 3), (32, 3), (80, 3), (128, 5), (256, 3), (256, 256), (200, 64)])
def test_cuda_identical_to_cpu(N, k):
    rows = [torch.randn(16, N), torch.randint(0, 4, (16, N)).float(), torch.rand(16, N) * 1e-3 + 0.97]
    for x in rows:
        labels, centroids = kmeans(x.cuda(), k)
        ref_labels, ref_centroids = kmeans(x, k)
        assert torch.equal(labels.cpu(), ref_labels)
        torch.testing.assert_close(centroids.cpu(), ref_centroids, atol=0, rtol=0, equal_nan=True)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x = torch.randn(8, 40, device="cuda")
    kmeans(x, 3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        labels, centroids = kmeans(x, 3)
    x.copy_(torch.randn(8, 40))
    graph.replay()
    assert torch.equal(labels.cpu(), kmeans(x.cpu(), 3)[0])


@pytest.mark.cuda
def test_cuda_bad_inputs_raise():
    with pytest.raises(RuntimeError, match="k"):
        kmeans(torch.randn(2, 8, device="cuda"), 9)
    with pytest.raises(RuntimeError, match="x"):
        kmeans(torch.randn(2, 300, device="cuda"), 3)


def test_gpu_work_division_gives_the_serial_answer(tmp_path):
    """The CUDA kernel's division of the prefix sums among threads and of a DP cell's scan among
    lanes (merged as its shuffles do), run on the host: bit for bit the CPU kernel's serial
    answer, for every thread count and lane width it can use (tests/ops/cpp/kmeans1d_partitions.cpp)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    exe = str(tmp_path / "kmeans1d_partitions")
    subprocess.run([compiler, "-O2", "-std=c++20", "-ffp-contract=off", "-I", os.path.join(root, "csrc"),
                    os.path.join(root, "tests", "ops", "cpp", "kmeans1d_partitions.cpp"), "-o", exe], check=True)
    run = subprocess.run([exe], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "0 mismatches", run.stdout + run.stderr
