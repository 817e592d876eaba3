"""Fenced tensors: a tensor that lies inside a larger buffer between two runs of sentinel
values, so that a test can assert that a kernel wrote nothing before or after it, and (with NaN
sentinels around an input) that nothing it read from there reached its results. The GPU
kernels clamp the indices they cannot check without a host sync; these tests feed them values
the host checks would refuse and look at the fences."""
import math

import torch

PAD = 257  # sentinels on each side: more than a tile row of any kernel


def fenced(t, sentinel=None):
    """(view, intact): a copy of t inside a flat buffer with PAD sentinels before and after it
    (default: 1234.5 for floating point, a write of any other value or an atomic add of a nonzero
    one changes it; -123456789 for integers; NaN to see stray reads in the results); intact()
    asserts that they are unchanged."""
    if sentinel is None:
        sentinel = 1234.5 if t.dtype.is_floating_point else -123456789
    n = math.prod(t.shape)
    buf = torch.full((PAD + n + PAD,), sentinel, dtype=t.dtype, device=t.device)
    view = buf[PAD : PAD + n].view(t.shape)
    view.copy_(t)
    pads = {"before": (buf[:PAD], buf[:PAD].clone()), "after": (buf[PAD + n :], buf[PAD + n :].clone())}

    def intact():
        for side, (pad, saved) in pads.items():
            same = (pad == saved) | (pad.isnan() & saved.isnan()) if pad.is_floating_point() else pad == saved
            changed = (~same).nonzero().flatten().tolist()
            assert not changed, f"written {side} the tensor, at {len(changed)} of its {PAD} pad entries"

    return view, intact
