import itertools

import numpy as np
import pytest

from env import ACTION_DELTAS, BatchedDarkroom, Darkroom, make_env_spec, optimal_return, split_goals


def best_return_by_planning(goal, grid_size, horizon):
    """Exact optimum by dynamic programming over (position, steps left): no formula involved."""
    cells = list(itertools.product(range(grid_size), repeat=2))
    value = {c: 0.0 for c in cells}
    for _ in range(horizon):
        new = {}
        for c in cells:
            best = -1.0
            for d in ACTION_DELTAS:
                n = (min(max(c[0] + d[0], 0), grid_size - 1), min(max(c[1] + d[1], 0), grid_size - 1))
                best = max(best, float(n == tuple(goal)) + value[n])
            new[c] = best
        value = new
    centre = grid_size // 2
    return value[(centre, centre)]


@pytest.mark.parametrize("grid_size,horizon", [(9, 20), (5, 3), (7, 6)])
def test_optimal_return_formula_matches_planning(grid_size, horizon):
    for goal in itertools.product(range(grid_size), repeat=2):
        assert optimal_return(goal, grid_size, horizon) == best_return_by_planning(goal, grid_size, horizon), goal


def test_dynamics_moves_clips_and_rewards():
    env = BatchedDarkroom(np.array([[4, 5], [0, 4]]), grid_size=9, horizon=3)
    s = env.reset()
    assert (s == 4 * 9 + 4).all()
    s, r, done = env.step(np.array([4, 1]))  # right; up
    assert s.tolist() == [4 * 9 + 5, 3 * 9 + 4] and r.tolist() == [1.0, 0.0] and not done
    s, r, done = env.step(np.array([0, 3]))  # stay on goal: rewarded again
    assert r.tolist() == [1.0, 0.0] and not done
    s, r, done = env.step(np.array([0, 0]))
    assert done
    env = BatchedDarkroom(np.array([[0, 0]]), grid_size=3, horizon=5)
    env.reset()
    for _ in range(3):
        s, _, _ = env.step(np.array([1]))  # up, clipped at the border
    assert s.tolist() == [0 * 3 + 1]


def test_gym_env_api():
    env = Darkroom(goal=(4, 3), grid_size=9, horizon=2)
    obs, info = env.reset(seed=0)
    assert obs.tolist() == [4, 4] and env.observation_space.contains(obs)
    obs, r, terminated, truncated, _ = env.step(3)
    assert obs.tolist() == [4, 3] and r == 1.0 and not terminated and not truncated
    _, _, _, truncated, _ = env.step(0)
    assert truncated


def test_split_is_deterministic_disjoint_and_complete():
    train, test = split_goals(9, 0.9, 0)
    assert (len(train), len(test)) == (73, 8)
    again_train, again_test = split_goals(9, 0.9, 0)
    assert (train == again_train).all() and (test == again_test).all()
    all_goals = {tuple(g) for g in np.concatenate([train, test])}
    assert len(all_goals) == 81
    other_train, _ = split_goals(9, 0.9, 1)
    assert not (other_train == train).all()
    spec = make_env_spec({"name": "darkroom", "grid_size": 9, "horizon": 20, "train_env_ratio": 0.9, "env_split_seed": 0})
    assert (spec.goals("test") == test).all()


def test_bad_env_config_is_refused():
    with pytest.raises(ValueError, match="Unknown env name"):
        make_env_spec({"name": "lightroom"})
    with pytest.raises(ValueError, match="train_env_ratio"):
        split_goals(9, 1.0, 0)
