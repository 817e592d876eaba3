"""Per-model calibration files, measured once on calibration text through the library's own
decode path: head gains (CalibratedHeads), layer-sensitivity profiles and the layer gains
fitted to them (Perturbation's gains).

For every calibration window (a prompt and its continuation) and every measured budget
fraction f: the loss of the continuation, teacher-forced through the library's decode path,
when only layer l keeps f * prompt tokens (under the given policy) and every other layer
`context` * prompt tokens (context = 1: its full cache), minus the loss with every layer at
the context. The L x len(fractions) settings of one window decode as batches of one cache
(per-sequence budgets, prompts forked).

    profiles = [measure_profile(runner, windows, policy, "SmolLM2-135M-Instruct", in_context_fractions(c),
                                context=c) for c in (0.1, 0.2)]
    fit_gains(runner, windows, policy, profiles, "SmolLM2-135M-Instruct").save("smollm2.streaming.gains.json")
    ...
    allocator = Perturbation(gains=LayerGains.load("smollm2.streaming.gains.json"))

Head gains for the CalibratedHeads allocator: measure_head_gains gives every KV head of every
layer, in turn, its whole context while the others keep the operating point's budget.

Layer gains for the Perturbation allocator: fit_gains relates in-context profiles to the mean
residual perturbation of the same windows (one number per layer and policy, saved the same way).

In context (around the operating point, where the layers interact): one profile per budget the
engine runs at, e.g. context 0.2 with fractions in_context_fractions(0.2).
"""
import torch

from .allocators import HeadGains, LayerGains, SensitivityProfile
from .cache import SqueezeKVCache
from .policies import PrefillNeeds, SqueezeSettings, prefill_needs
from .signals import interpolate, perturbation_knots

DEFAULT_FRACTIONS = (0.04, 0.1, 0.2, 0.4)
# Budgets measured around an operating point c, as multiples of c: deep cut, half, c itself
# (value 0 by definition, not decoded), more.
IN_CONTEXT_MULTIPLES = (0.25, 0.5, 1.0, 1.75)


def in_context_fractions(context):
    """The fractions measured around the operating point `context`; context < 1 / 1.75 keeps
    them all below the full prompt."""
    return tuple(m * context for m in IN_CONTEXT_MULTIPLES)


def score_batch(runner, prefill, targets, policy, settings, on_step=None):
    """Teacher-forced scoring of one prompt under several settings, as one batch (the prompt
    forked into one cache). prefill: (record, logits) of runner.prefill of that one prompt;
    targets int [1, G] on the runner's device; on_step(i) after each step.
    Returns (cache, nll fp32 [n, G], top1 int64 [n, G]), the last two on the host."""
    record, first = prefill
    n, gen = len(settings), targets.shape[1]
    cache = SqueezeKVCache.build(record, policy, settings, gen, source=[0] * n)
    nll, top1 = runner.score(cache, first.expand(n, -1), targets.expand(n, -1), on_step=on_step)
    return cache, nll.cpu(), top1.cpu()


def _mean_loss_changes(runner, windows, policy, cells, reference, budgets_of, batch, progress, label):
    """Per cell, the mean over windows of (mean NLL of the continuation with the cell's budgets)
    - (mean NLL with the reference budgets), teacher-forced through the library's decode path;
    the cells of one window decode as batches of one cache (per-sequence budgets, prompts forked).
    reference(T, G) / budgets_of(T, G, cell): the budgets SqueezeSettings.fixed takes (None:
    the full cache) for a prompt of T tokens and G continuation tokens. float64 [len(cells)]."""
    totals = torch.zeros(len(cells), dtype=torch.float64)
    for w, (prompt, continuation) in enumerate(windows):
        record, first = runner.prefill([prompt], prefill_needs(policy))
        T, gen = len(prompt), len(continuation)
        targets = continuation[None].to(runner.device)

        def nll_of(budgets):
            settings = [None if b is None else SqueezeSettings.fixed(b) for b in budgets]
            _, nll, _ = score_batch(runner, (record, first), targets, policy, settings)
            return nll.double().mean(1)

        base = nll_of([reference(T, gen)])[0]
        for start in range(0, len(cells), batch):
            chunk = range(start, min(start + batch, len(cells)))
            if progress is not None:
                progress(f"{label}: window {w + 1}/{len(windows)}, settings {chunk.stop}/{len(cells)}")
            totals[start : chunk.stop] += nll_of([budgets_of(T, gen, cells[i]) for i in chunk]) - base
    return totals / len(windows)


def measure_profile(runner, windows, policy, model, fractions=DEFAULT_FRACTIONS, batch=64, source="",
                    progress=None, context=1.0):
    """SensitivityProfile of `runner`'s model under `policy`.

    runner:    a LlamaRunner (prefill / score through the library's ops).
    windows:   list of (prompt, continuation) 1-D token id tensors.
    fractions: increasing budget fractions of the prompt in (0, 1) at which each layer is measured.
    context:   fraction of the prompt every other layer keeps (1: the full cache).
    batch:     sequences decoded together (memory: each holds up to a full cache).
    progress:  optional callable(message) for a status line.
    values[j][l] = mean over windows of (mean NLL with layer l at fractions[j], every other layer
    at the context) - (mean NLL with every layer at the context), nats/token; 0 where
    fractions[j] is the context itself.
    """
    if not 0 < context <= 1:
        raise ValueError(f"context: expected a fraction of the prompt in (0, 1], got {context}")
    num_layers = runner.num_layers
    cells = [(j, layer) for j, f in enumerate(fractions) if f != context for layer in range(num_layers)]

    def others(T, gen):  # the operating point as the uniform allocation gives it: floor(context * T) per layer
        return T + gen if context == 1 else max(1, int(context * T))

    def budgets_of(T, gen, cell):
        j, layer = cell
        budgets = [others(T, gen)] * num_layers
        budgets[layer] = max(1, round(fractions[j] * T))
        return budgets

    changes = _mean_loss_changes(
        runner, windows, policy, cells, lambda T, gen: None if context == 1 else [others(T, gen)] * num_layers,
        budgets_of, batch, progress, f"calibrating {policy.describe()} at {context:g}")
    values = torch.zeros(len(fractions), num_layers, dtype=torch.float64)
    for (j, layer), change in zip(cells, changes.tolist()):
        values[j, layer] = change
    return SensitivityProfile(model, num_layers, policy.describe(), tuple(fractions),
                              tuple(tuple(row) for row in values.tolist()), source, context)


def measure_head_gains(runner, windows, policy, model, fraction, batch=32, source="", progress=None):
    """HeadGains of `runner`'s model under `policy` at the operating point `fraction`.

    values[l][h] = mean over windows of (mean NLL with every (layer, KV head) at
    floor(fraction * T) tokens) - (the same with KV head h of layer l at its full cache,
    T + G tokens), nats/token: what that head alone gains from its whole context. One window
    decodes 1 + L * Hkv settings (per-head caches, Hkv rows each), `batch` sequences at a time.
    windows, progress: as in measure_profile.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: expected a fraction of the prompt in (0, 1), got {fraction}")
    num_layers, heads = runner.num_layers, runner.num_kv_heads
    cells = [(layer, h) for layer in range(num_layers) for h in range(heads)]

    def budgets_of(T, gen, cell):
        rows = [[max(1, int(fraction * T))] * heads for _ in range(num_layers)]
        rows[cell[0]][cell[1]] = T + gen
        return rows

    changes = _mean_loss_changes(
        runner, windows, policy, cells, lambda T, gen: [max(1, int(fraction * T))] * num_layers, budgets_of,
        batch, progress, f"head gains {policy.describe()} at {fraction:g}")
    values = (-changes).view(num_layers, heads)
    return HeadGains(model, num_layers, heads, policy.describe(), fraction,
                     tuple(tuple(row) for row in values.tolist()), source)


def fit_gains(runner, windows, policy, profiles, model, observe=32, source="", min_share=0.01):
    """LayerGains of `runner`'s model under `policy`: per layer l, the loss per unit of the
    residual perturbation E_l that Perturbation reads, fitted through the origin to in-context
    profiles measured on the same windows:
        profile value (layer l at f, the others at c)  ~  g_l * (E_l(f T) - E_l(c T)),
    over every profile (context c) and measured fraction f != c, with dE_l the change averaged
    over the windows' prefills (over the last `observe` queries), as the profile values are averages over them.
    g_l = sum(value * dE) / sum(dE^2); a fit below min_share of the mean positive fit (noise:
    compressing the layer did not raise the loss) is raised to it, so that no layer is free; the
    gains are normalised to mean 1.

    profiles: SensitivityProfiles of this model and policy with context < 1 (calibration's
    measure_profile with context=c and in_context_fractions(c)).
    """
    if not profiles or any(p.context >= 1 or p.num_layers != runner.num_layers for p in profiles):
        raise ValueError("profiles: expected in-context profiles (context < 1) of this model's layers")
    num_layers = runner.num_layers
    cells = [(p, f, row) for p in profiles for f, row in zip(p.budgets, p.values) if f != p.context]
    d_e = torch.zeros(len(cells), num_layers, dtype=torch.float64)
    for prompt, _ in windows:
        record, _ = runner.prefill([prompt], prefill_needs(policy).union(PrefillNeeds(observe=observe, perturb=(policy,))))
        curves = torch.stack(record.perturbation[policy], 1).double().cpu()  # [1, L, KNOTS + 1]
        T = len(prompt)
        knots = perturbation_knots(torch.tensor([T]))

        def at(tokens):  # E_l at `tokens` for every layer: [L]
            where = torch.full((1, num_layers, 1), float(tokens), dtype=torch.float64)
            return interpolate(curves, knots, where)[0, :, 0]

        # The budgets measure_profile gave: max(1, int(c T)) for the others, max(1, round(f T)) for the layer.
        for i, (p, f, _) in enumerate(cells):
            d_e[i] += (at(max(1, round(f * T))) - at(max(1, int(p.context * T)))) / len(windows)
    values = torch.tensor([row for _, _, row in cells], dtype=torch.float64)
    num, den = (values * d_e).sum(0), (d_e * d_e).sum(0)
    fit = num / den.clamp_min(1e-300)
    positive = fit[fit > 0]
    floor = min_share * (positive.mean().item() if positive.numel() else 1.0)
    gains = fit.clamp_min(floor)
    gains = gains / gains.mean()
    return LayerGains(model, num_layers, policy.describe(), tuple(gains.tolist()), source)

