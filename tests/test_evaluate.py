"""The evaluation summary's metrics on hand-made returns."""
import numpy as np

from env import make_env_spec
from evaluate import episodes_to_fraction, miss_rate_after_first_success, summarize
from tests.conftest import compose_cfg


def test_miss_rate_counts_only_episodes_after_the_first_success():
    returns = np.array([[[0, 0, 5, 0, 3, 3], [0, 0, 0, 0, 0, 0]]], float)  # [goal, repeat, episode]
    assert miss_rate_after_first_success(returns) == 1 / 3  # episodes 3-5 of repeat 0; repeat 1 never found it
    assert miss_rate_after_first_success(np.zeros((1, 2, 4))) is None


def test_summary_against_optimal():
    spec = make_env_spec(compose_cfg("collect", []).env)
    goals = spec.goals("test")[:2]
    optimal = spec.optimal_returns(goals)
    returns = np.broadcast_to(optimal[:, None, None] * np.linspace(0, 1, 20), (2, 3, 20)).copy()
    out = summarize(goals, spec, {"returns": returns, "seconds": 1.0, "seconds_per_env_step": 0.1})
    assert np.isclose(out["fraction_of_optimal_last10"], np.linspace(0, 1, 20)[-10:].mean())
    assert out["episodes_to_80pct"] == episodes_to_fraction(np.linspace(0, 1, 20), 0.8) == 14
    assert out["miss_rate_after_first_success"] == 0.0 and out["fraction_of_optimal_last10_stderr"] == 0.0
