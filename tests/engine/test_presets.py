"""The allocators recommended for the measured model (engine/presets.py) and the calibration
files they read."""
import pytest

from squeeze_ops.engine.policies import SequencePolicy
from squeeze_ops.engine.presets import MODEL_NAME, recommended, recommended_allocator


@pytest.mark.parametrize("policy, fraction, family", [
    ("window", 0.1, "Uniform"), ("window", 0.2, "Coverage"), ("window", 0.5, "Coverage"),
    ("h2o", 0.1, "SimilarityWeighted"), ("h2o", 0.2, "Perturbation"), ("h2o", 0.3, "Perturbation"), ("h2o", 0.5, "Coverage"),
    ("streaming", 0.1, "Perturbation"), ("streaming", 0.2, "Perturbation"), ("streaming", 0.3, "CalibratedHeads"),
    ("streaming", 0.5, "Uniform"),
    ("h2o", 0.14, "SimilarityWeighted"), ("h2o", 0.16, "Perturbation"), ("streaming", 0.9, "Uniform")])
def test_recommended_allocator_follows_the_measured_table(policy, fraction, family):
    allocator = recommended_allocator(policy, fraction)
    assert type(allocator).__name__ == family
    if family == "Perturbation":  # streaming's reads the model's layer gains, h2o's does not
        assert (allocator.gains is not None) == (policy == "streaming")
        if allocator.gains is not None:
            assert allocator.gains.model == MODEL_NAME and allocator.gains.num_layers == 30
            assert allocator.gains.policy == SequencePolicy.streaming().describe()
    if family == "CalibratedHeads":  # per KV head, from the model's head gains at that budget
        (gains,) = allocator.profiles
        assert (gains.model, gains.num_layers, gains.num_kv_heads, gains.fraction) == (MODEL_NAME, 30, 3, 0.3)
        assert gains.policy == SequencePolicy.streaming().describe()


def test_recommended_allocator_refuses_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        recommended_allocator("snapkv", 0.2)
    with pytest.raises(ValueError, match="fraction"):
        recommended_allocator("h2o", 0.0)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_recommended_configuration_per_workload(fraction):
    policy, settings = recommended(fraction)
    assert policy == SequencePolicy.h2o() and settings.b_init == fraction
    assert settings.allocator == recommended_allocator("h2o", fraction)
    policy, settings = recommended(fraction, workload="retrieval")
    assert policy == SequencePolicy.h2o(score_queries=16, pool_size=15) and settings.b_init == fraction
    assert settings.allocator == recommended_allocator("h2o", fraction)
    with pytest.raises(ValueError, match="workload"):
        recommended(fraction, workload="code")
    with pytest.raises(ValueError, match="fraction"):
        recommended(0.0)
