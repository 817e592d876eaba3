"""Calibration files: per-model measurements saved once as JSON and loaded at run time.

    LayerGains          loss per unit of residual perturbation, per layer (Perturbation's gains)
    HeadGains           loss fall when one KV head keeps its whole context (CalibratedHeads)
    SensitivityProfile  loss rise when one layer is compressed (calibration.fit_gains' input)

Each file carries its format name and version; load() refuses another.
"""
import json
from dataclasses import dataclass

PROFILE_FORMAT = "squeeze-ops/sensitivity-profile"
GAINS_FORMAT = "squeeze-ops/layer-gains"
HEAD_GAINS_FORMAT = "squeeze-ops/head-gains"
PROFILE_VERSION = 1


class _JsonFile:
    """save / load of a calibration result through its to_json / from_json."""

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(json.load(f))


def _check_format(data, fmt):
    if data.get("format") != fmt or data.get("version") != PROFILE_VERSION:
        raise ValueError(f"profile: expected format {fmt!r} version {PROFILE_VERSION}, got "
                         f"{data.get('format')!r} version {data.get('version')}")


@dataclass(frozen=True)
class LayerGains(_JsonFile):
    """How much one model's loss moves per unit of a layer's residual perturbation.

    values[l] > 0: nats/token of loss per unit of E_l (Perturbation's signal) under `policy`,
    normalised to mean 1 over the layers (only their ratios matter to an allocation). Fitted
    once per model and policy on calibration text (squeeze_ops.engine.calibration.fit_gains); keep the
    file next to the model's settings and load it at run time.
    """

    model: str
    num_layers: int
    policy: str
    values: tuple
    source: str = ""

    def __post_init__(self):
        if len(self.values) != self.num_layers or not all(v > 0 for v in self.values):
            raise ValueError(f"values: expected {self.num_layers} positive layer gains, got {self.values}")

    def to_json(self):
        return {"format": GAINS_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "policy": self.policy, "values": list(self.values),
                "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, GAINS_FORMAT)
        return cls(data["model"], int(data["num_layers"]), data["policy"], tuple(float(v) for v in data["values"]),
                   data.get("source", ""))



@dataclass(frozen=True)
class HeadGains(_JsonFile):
    """How much one model's loss falls when a single KV head keeps its whole context.

    values[l][h]: mean NLL decrease (nats/token) when only KV head h of layer l keeps its full
    cache while every other (layer, head) keeps `fraction` * prompt length tokens under
    `policy`, relative to all of them at the fraction (small negative values: noise). Measured
    once per model and policy on calibration text (squeeze_ops.engine.calibration.measure_head_gains);
    keep the file next to the model's settings and load it at run time.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    policy: str
    fraction: float
    values: tuple
    source: str = ""

    def __post_init__(self):
        if len(self.values) != self.num_layers or any(len(row) != self.num_kv_heads for row in self.values):
            raise ValueError(f"values: expected {self.num_layers} rows of {self.num_kv_heads} head gains")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction: expected a fraction of the prompt in (0, 1), got {self.fraction}")

    def to_json(self):
        return {"format": HEAD_GAINS_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "policy": self.policy,
                "fraction": self.fraction, "values": [list(row) for row in self.values], "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, HEAD_GAINS_FORMAT)
        return cls(data["model"], int(data["num_layers"]), int(data["num_kv_heads"]), data["policy"],
                   float(data["fraction"]), tuple(tuple(float(v) for v in row) for row in data["values"]),
                   data.get("source", ""))



@dataclass(frozen=True)
class SensitivityProfile(_JsonFile):
    """How much one model's loss rises when a single layer's cache is compressed.

    values[j][l]: mean NLL change (nats/token) when only layer l keeps budgets[j] * prompt
    length tokens (under `policy`) while every other layer keeps `context` * prompt length
    tokens, relative to every layer at `context`. context = 1: the other layers keep their full
    cache (the layer's loss in isolation); context < 1: the profile is measured around that
    operating point (in context: values above it are gains, below it losses), which sees how
    layers interact once all of them are compressed. budgets: increasing fractions of the
    prompt, all in (0, 1). Measured once per model, policy and context on calibration text
    (squeeze_ops.engine.calibration.measure_profile); keep the file next to the model's settings and
    load it at run time.
    """

    model: str
    num_layers: int
    policy: str
    budgets: tuple
    values: tuple
    source: str = ""
    context: float = 1.0

    def __post_init__(self):
        if list(self.budgets) != sorted(set(self.budgets)) or not all(0 < f < 1 for f in self.budgets):
            raise ValueError(f"budgets: expected increasing fractions in (0, 1), got {self.budgets}")
        if len(self.values) != len(self.budgets) or any(len(row) != self.num_layers for row in self.values):
            raise ValueError(f"values: expected {len(self.budgets)} rows of {self.num_layers} layer values")
        if not 0 < self.context <= 1:
            raise ValueError(f"context: expected a fraction of the prompt in (0, 1], got {self.context}")

    def to_json(self):
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": self.model,
                "num_layers": self.num_layers, "policy": self.policy, "context": self.context,
                "budgets": list(self.budgets), "values": [list(row) for row in self.values], "source": self.source}

    @classmethod
    def from_json(cls, data):
        _check_format(data, PROFILE_FORMAT)
        return cls(data["model"], int(data["num_layers"]), data["policy"], tuple(float(f) for f in data["budgets"]),
                   tuple(tuple(float(v) for v in row) for row in data["values"]), data.get("source", ""),
                   float(data.get("context", 1.0)))

    def loss_curves(self):
        """Per layer, the loss at the knots budgets + (1,) as a non-negative, non-increasing
        list ending at 0 (host data). Past the largest measured budget the loss is taken flat:
        exactly 0 at the full prompt for context = 1, no further gain assumed otherwise."""
        curves = []
        for layer in range(self.num_layers):
            tail = 0.0 if self.context == 1 else self.values[-1][layer]
            loss = [max(row[layer] - tail, 0.0) for row in self.values] + [0.0]
            for j in range(len(loss) - 2, -1, -1):
                loss[j] = max(loss[j], loss[j + 1])
            curves.append(loss)
        return curves

