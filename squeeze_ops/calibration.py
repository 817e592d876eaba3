"""Measuring a model's layer-sensitivity profile once, for the Calibrated allocator.

For every calibration window (a prompt and its continuation) and every measured budget
fraction f: the loss of the continuation, teacher-forced through the library's decode path,
when only layer l keeps f * prompt tokens (under the given policy) and every other layer its
full cache, minus the loss with the full cache everywhere. The L x len(fractions) settings of
one window decode as batches of one cache (per-sequence budgets, prompts forked).

    profile = measure_profile(runner, windows, SequencePolicy.h2o(), "SmolLM2-135M-Instruct")
    profile.save("models/smollm2/sensitivity.h2o.json")       # next to the model's settings
    ...
    allocator = Calibrated(SensitivityProfile.load("models/smollm2/sensitivity.h2o.json"))
"""
import torch

from .allocators import Fixed, SensitivityProfile
from .cache import SqueezeKVCache
from .policies import SqueezeSettings

DEFAULT_FRACTIONS = (0.04, 0.1, 0.2, 0.4)


def measure_profile(runner, windows, policy, model, fractions=DEFAULT_FRACTIONS, batch=64, source="",
                    progress=None):
    """SensitivityProfile of `runner`'s model under `policy`.

    runner:    a LlamaRunner (prefill / score through the library's ops).
    windows:   list of (prompt, continuation) 1-D token id tensors.
    fractions: increasing budget fractions of the prompt in (0, 1) at which each layer is measured.
    batch:     sequences decoded together (memory: each holds nearly a full cache).
    progress:  optional callable(message) for a status line.
    values[j][l] = mean over windows of (mean NLL with layer l at fractions[j], every other layer
    full) - (mean NLL with the full cache), nats/token.
    """
    num_layers = runner.num_layers
    cells = [(j, layer) for j in range(len(fractions)) for layer in range(num_layers)]
    totals = torch.zeros(len(fractions), num_layers, dtype=torch.float64)
    for w, (prompt, continuation) in enumerate(windows):
        record, first = runner.prefill([prompt], scores=policy.needs_scores, score_window=policy.score_window)
        gen = len(continuation)
        full = len(prompt) + gen
        targets = continuation[None].to(runner.device)

        def nll_of(settings):
            cache = SqueezeKVCache.build(record, policy, settings, gen, source=[0] * len(settings))
            n = len(settings)
            nll, _ = runner.score(cache, first.expand(n, -1), targets.expand(n, -1))
            return nll.double().mean(1).cpu()

        reference = nll_of([None])[0]
        for start in range(0, len(cells), batch):
            chunk = cells[start : start + batch]
            if progress is not None:
                progress(f"calibrating {policy.describe()}: window {w + 1}/{len(windows)}, "
                         f"settings {start + len(chunk)}/{len(cells)}")
            settings = []
            for j, layer in chunk:
                budgets = [full] * num_layers
                budgets[layer] = max(1, round(fractions[j] * len(prompt)))
                settings.append(SqueezeSettings(base_tokens=1, allocator=Fixed(tuple(budgets))))
            for (j, layer), nll in zip(chunk, nll_of(settings)):
                totals[j, layer] += nll - reference
    values = totals / len(windows)
    return SensitivityProfile(model, num_layers, policy.describe(), tuple(fractions),
                              tuple(tuple(row) for row in values.tolist()), source)
