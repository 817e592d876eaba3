"""The launcher-cost benchmark on the CPU: launches_skipped turns the decode kernels' launches into
no-ops and puts them back, the launcher and the dispatched launcher run the step's Python path with
nothing launched, and main writes its table."""
import torch

from bench import bench_launch
from squeeze_ops import _checks
from squeeze_ops.triton_kernels import common, decode_step


def test_launches_skipped_launch_nothing_and_come_back(monkeypatch):
    calls = []
    for kernel in (common._split_kernel, common._combine_kernel):
        monkeypatch.setattr(kernel, "run", lambda *args, name=kernel.__name__, **kwargs: calls.append(name))
    args = bench_launch.step_args(2, "cpu")
    pool = [t.clone() for t in args[4:10]]
    with bench_launch.launches_skipped(), _checks.forced_value_checks(False):
        out = decode_step.decode_step_(*args)
        bench_launch.dispatched_launcher()(*args)
    assert out.shape == args[0].shape and calls == []
    assert all(torch.equal(a, b) for a, b in zip(args[4:10], pool))  # no kernel touched the rows
    decode_step.decode_step_(*args)  # the patched runs are back: both launches seen
    assert calls == ["_split_kernel", "_combine_kernel"]


def test_launches_skipped_restore_the_class_method():
    with bench_launch.launches_skipped():
        assert common._split_kernel.run is bench_launch._no_launch
    assert "run" not in vars(common._split_kernel) and "run" not in vars(common._combine_kernel)


def test_main_writes_the_table(capsys):
    bench_launch.main(["--quick"])
    out = capsys.readouterr().out
    for path in ("checks", "launcher", "dispatch+launcher", "op on CPU (C++)"):
        assert f"| 16 | {path} |" in out
    assert "Triton's own launch cost is not included" in out
