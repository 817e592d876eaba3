"""Fenced tensors: a tensor that lies inside a larger buffer between two runs of sentinel
values, so that a test can assert that a kernel wrote nothing before or after it, and (with NaN
sentinels around an input) that nothing it read from there reached its results. The GPU
kernels clamp the indices they cannot check without a host sync; these tests feed them values
the host checks would refuse and look at the fences."""
import torch

PAD = 257  # sentinels on each side: more than a tile row of any kernel


def _distinct(t):
    """t without the repeats of its stride-0 dims (what copy_ and fill_ may write to)."""
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if size > 1 and stride == 0:
            t = t.narrow(dim, 0, 1)
    return t


def fenced(t, sentinel=None):
    """(view, intact): a copy of t, with t's strides (a strided, padded or expanded layout stays
    one), inside a flat buffer with PAD sentinels before and after it and in the gaps between its
    elements (default: 1234.5 for floating point, a write of any other value or an atomic add of
    a nonzero one changes it; -123456789 for integers; NaN to see stray reads in the results);
    intact() asserts that they are unchanged."""
    if sentinel is None:
        sentinel = 1234.5 if t.dtype.is_floating_point else -123456789
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    buf = torch.full((PAD + span + PAD,), sentinel, dtype=t.dtype, device=t.device)
    view = buf.as_strided(t.shape, t.stride(), PAD)
    _distinct(view).copy_(_distinct(t))
    covered = torch.zeros(buf.shape, dtype=torch.bool, device=t.device)
    _distinct(covered.as_strided(t.shape, t.stride(), PAD)).fill_(True)
    saved = buf.clone()

    def intact():
        same = (buf == saved) | (buf.isnan() & saved.isnan()) if buf.is_floating_point() else buf == saved
        changed = (~same & ~covered).nonzero().flatten().tolist()
        for side, inside in (("before", lambda i: i < PAD), ("after", lambda i: i >= PAD + span),
                             ("between the elements of", lambda i: PAD <= i < PAD + span)):
            hits = [i for i in changed if inside(i)]
            assert not hits, f"written {side} the tensor, at {len(hits)} of its pad entries"

    return view, intact
