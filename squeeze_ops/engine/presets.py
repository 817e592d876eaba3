"""The allocator the held-out evaluation recommends per policy and budget, the configuration
(policy and settings) it recommends per workload and budget, for the one model it was measured
on (SmolLM2-135M-Instruct; research/README.md has the evidence), and the two calibration files
those recommendations read (profiles/).

    settings = SqueezeSettings(b_init=0.3, allocator=recommended_allocator("h2o", 0.3))
    policy, settings = recommended(0.2, workload="retrieval")

Other models: the families carry over (SimilarityWeighted, Coverage and Perturbation without
gains need no calibration), the measured choice and the StreamingLLM layer and head gains
(per-model files, engine.calibration) do not.
"""
import os

from ..vocabulary import POLICIES
from .allocators import CalibratedHeads, Coverage, HeadGains, LayerGains, Perturbation, SimilarityWeighted, Uniform
from .policies import SequencePolicy, SqueezeSettings

MODEL_NAME = "SmolLM2-135M-Instruct"
PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
# The budgets the evaluation measured; a request's budget reads the nearest.
MEASURED_FRACTIONS = (0.1, 0.2, 0.3, 0.5)
# What the KV must serve: "text" (continuing or answering about the whole prompt; measured as
# teacher-forced NLL) or "retrieval" (an exact span of a long prompt to reproduce, such as a
# key or a number; measured on the pass-key task).
WORKLOADS = ("text", "retrieval")


def recommended_allocator(policy, fraction):
    """The allocator recommended for SmolLM2-135M-Instruct under `policy` ("window" |
    "streaming" | "h2o") at a total budget of `fraction` of the prompt (the nearest measured
    budget of 10/20/30/50% decides).

    Rule, over the largest held-out evidence per cell: the allocator that beats uniform in
    >= 70% of the windows, the larger mean gain if several do; where none does, the one of
    larger mean gain if that is at least two standard errors below zero; else Uniform().
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if not fraction > 0:
        raise ValueError(f"fraction: expected > 0, got {fraction}")
    budget = min(MEASURED_FRACTIONS, key=lambda f: abs(f - fraction))
    if policy == "window":
        return Coverage(gamma=0.0, floor=0.5, cap=2.0) if budget >= 0.2 else Uniform()
    if policy == "h2o":
        return {0.1: SimilarityWeighted(gamma=1.0, floor=0.75, cap=1.5),
                0.5: Coverage(gamma=1.0, floor=0.5, cap=2.0)}.get(budget, Perturbation(4.0, 0.5, 2.0))
    if budget == 0.5:
        return Uniform()
    if budget == 0.3:
        heads = HeadGains.load(os.path.join(PROFILE_DIR, f"{MODEL_NAME}.streaming.heads0.3.json"))
        return CalibratedHeads(heads, gamma=1.0, floor=0.5, cap=3.0)
    gains = LayerGains.load(os.path.join(PROFILE_DIR, f"{MODEL_NAME}.streaming.gains.json"))
    return Perturbation(1.0, 0.5, 2.0, gains=gains)


def recommended(fraction, workload="text"):
    """(SequencePolicy, SqueezeSettings) recommended for SmolLM2-135M-Instruct at a KV budget of
    `fraction` of the prompt per layer on average, for a `workload` of WORKLOADS.

    Both are H2O with recommended_allocator("h2o", fraction). "text": scores from every
    later prompt query (the lowest NLL at 10/20/30%). "retrieval": the prompt ranked by the
    last 16 prompt queries' scores (the question and the chat template's turn markers)
    max-pooled over 15 positions, so that a multi-token span the question points at survives
    whole (the pass key at 20-30%), at a higher NLL.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload: expected one of {WORKLOADS}, got {workload!r}")
    allocator = recommended_allocator("h2o", fraction)
    policy = SequencePolicy.h2o() if workload == "text" else SequencePolicy.h2o(score_queries=16, pool_size=15)
    return policy, SqueezeSettings(b_init=fraction, allocator=allocator)
