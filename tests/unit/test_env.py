"""Darkroom and Dark Key-to-Door: dynamics, optimal returns, task splits, the gym API (env/)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from env import (
    ACTION_DELTAS,
    ENVS,
    BatchedDarkKeyToDoor,
    BatchedDarkroom,
    DarkKeyToDoor,
    Darkroom,
    make_env_spec,
    optimal_return,
    split_tasks,
)
from env.dark_key_to_door import optimal_return as key_door_optimal_return
from tests.helpers import compose_cfg


def key_door_env(key, door, grid_size=5, horizon=12, seed=0):
    return BatchedDarkKeyToDoor(np.array([[*key, *door]]), grid_size, horizon, seed)


def best_key_door_return_by_bfs(key, door, start, grid_size, horizon):
    """Exact optimum by dynamic programming over (cell, stage, steps left): no formula involved."""
    cells = list(itertools.product(range(grid_size), repeat=2))
    value = {(c, st): 0.0 for c in cells for st in range(3)}  # stage: 0 no key, 1 key, 2 door done
    for _ in range(horizon):
        new = {}
        for c in cells:
            for st in range(3):
                best = 0.0
                for n in moves(c, grid_size):
                    r, nst = 0.0, st
                    if st == 0 and n == key:
                        r, nst = 1.0, 1
                    elif st == 1 and n == door:
                        r, nst = 1.0, 2
                    best = max(best, r + value[(n, nst)])
                new[(c, st)] = best
        value = new
    return value[(start, 0)]


def best_return_by_planning(goal, grid_size, horizon):
    """Darkroom's exact optimum by dynamic programming over (position, steps left): no formula involved."""
    cells = list(itertools.product(range(grid_size), repeat=2))
    value = {c: 0.0 for c in cells}
    for _ in range(horizon):
        value = {c: max(float(n == tuple(goal)) + value[n] for n in moves(c, grid_size)) for c in cells}
    centre = grid_size // 2
    return value[(centre, centre)]


def walk(env, actions):
    rewards = []
    for a in actions:
        _, r, _ = env.step(np.array([a]))
        rewards.append(float(r[0]))
    return rewards


def moves(cell, grid_size):
    for d in ACTION_DELTAS:
        yield (min(max(cell[0] + d[0], 0), grid_size - 1), min(max(cell[1] + d[1], 0), grid_size - 1))


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


@pytest.mark.parametrize("env_class", [Darkroom, DarkKeyToDoor])
def test_gymnasium_env_checker_passes_with_default_arguments(env_class):
    check_env(env_class(), skip_render_check=True)


def test_split_is_deterministic_disjoint_complete_and_keeps_the_old_test_goals():
    spec = make_env_spec(compose_cfg("collect", []).env)
    train, val, test = (spec.tasks(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (65, 8, 8)
    again = make_env_spec(compose_cfg("collect", []).env)
    assert all((spec.tasks(s) == again.tasks(s)).all() for s in ("train", "val", "test"))
    sets = [{tuple(g) for g in x} for x in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]) and len(sets[0] | sets[1] | sets[2]) == 81
    # the test goals are those of the earlier train/test split (81 goals permuted by seed 0, the last 8)
    cells = np.array([(r, c) for r in range(9) for c in range(9)])
    assert (test == cells[np.random.default_rng(0).permutation(81)[73:]]).all()
    # and validation does not move them
    no_val = split_tasks(81, 0.9, 0.05, 0)
    assert (cells[no_val["test"]] == test).all()
    other = make_env_spec(compose_cfg("collect", ["env.env_split_seed=1"]).env)
    assert not (other.tasks("test") == test).all()


def test_bad_env_config_is_refused():
    with pytest.raises(ValueError, match="Unknown env name"):
        make_env_spec({"name": "lightroom"})
    with pytest.raises(ValueError, match="train_env_ratio"):
        split_tasks(81, 1.0, 0.1, 0)
    with pytest.raises(ValueError, match="val_env_ratio"):
        split_tasks(81, 0.9, 0.0, 0)
    with pytest.raises(ValueError, match="n_eval_tasks=9 exceeds the 8 val tasks"):
        make_env_spec(compose_cfg("collect", ["env.n_eval_tasks=9"]).env)


def test_key_door_rewards_key_then_door_each_once():
    env = key_door_env(key=(0, 1), door=(0, 3))
    env.reset()
    env.pos[:] = [[0, 0]]
    # right onto the key (+1), stay on it (0), right, right onto the door (+1), left, right onto the door again (0)
    assert walk(env, [4, 0, 4, 4, 3, 4]) == [1, 0, 0, 1, 0, 0]
    assert env.has_key.all() and env.door_done.all()


def test_key_door_door_before_key_pays_nothing_and_nothing_after_the_door():
    env = key_door_env(key=(0, 3), door=(0, 1))
    env.reset()
    env.pos[:] = [[0, 0]]
    # onto the door first (0), on to the key (+1), back onto the door (+1), then nothing more
    assert walk(env, [4, 4, 4, 3, 3, 4, 3, 0]) == [0, 0, 1, 0, 1, 0, 0, 0]


def test_key_door_episode_resets_the_key_and_starts_are_random_but_reproducible():
    tasks = np.array([[0, 0, 4, 4]] * 64)
    a, b = BatchedDarkKeyToDoor(tasks, 5, 3, seed=3), BatchedDarkKeyToDoor(tasks, 5, 3, seed=3)
    starts_a = [a.reset().copy() for _ in range(4)]
    starts_b = [b.reset().copy() for _ in range(4)]
    assert all((x == y).all() for x, y in zip(starts_a, starts_b))  # the same seed, the same starts
    assert len(np.unique(np.concatenate(starts_a))) > 15  # spread over the 25 cells
    assert not (starts_a[0] == starts_a[1]).all()  # a new start every episode
    c = BatchedDarkKeyToDoor(tasks, 5, 3, seed=4)
    assert not (c.reset() == starts_a[0]).all()  # another seed, other starts
    # more envs in the batch leave the first ones' starts unchanged (transplant donors rely on it)
    wide = BatchedDarkKeyToDoor(np.concatenate([tasks, tasks]), 5, 3, seed=3)
    assert (wide.reset()[:64] == starts_a[0]).all()
    a.has_key[:] = True
    a.reset()
    assert not a.has_key.any() and not a.door_done.any()


@pytest.mark.parametrize("grid_size,horizon", [(3, 2), (4, 4), (3, 5), (9, 50)])
def test_key_door_optimal_return_formula_matches_bfs(grid_size, horizon):
    cells = list(itertools.product(range(grid_size), repeat=2))
    rng = np.random.default_rng(grid_size * 100 + horizon)
    triples = [(k, d, s) for k in cells for d in cells if k != d for s in cells]
    n = 12 if grid_size == 9 else 150  # the 9x9 planning is slow in pure Python; the optimum there is 2 anyway
    for i in rng.choice(len(triples), size=min(len(triples), n), replace=False):
        key, door, start = triples[i]
        assert key_door_optimal_return(key, door, start, horizon) == best_key_door_return_by_bfs(key, door, start, grid_size, horizon)


def test_key_door_spec_tasks_split_and_optimum():
    spec = make_env_spec(compose_cfg("collect", ["env=dark_key_to_door", "env.n_train_tasks=null", "env.n_eval_tasks=null"]).env)
    assert len(spec.all_tasks()) == 81 * 80 and spec.n_learner_states == 2 * 81
    splits = {s: {tuple(t) for t in spec.tasks(s)} for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [5508, 324, 648]
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert all(t[:2] != t[2:] for t in splits["test"])
    # each held-out pair is unseen, but its cells appear in training pairs
    train_cells = {t[:2] for t in splits["train"]} | {t[2:] for t in splits["train"]}
    assert all(t[:2] in train_cells and t[2:] in train_cells for t in splits["test"])
    assert (spec.optimal_returns(spec.tasks("test")) == 2).all()  # 9x9, horizon 50
    small = make_env_spec({**spec.__dict__, "name": "dark_key_to_door", "grid_size": 4, "horizon": 3})
    assert 0 < small.optimal_returns(small.tasks("test")).mean() < 2  # some starts cannot reach both
    subset = make_env_spec(compose_cfg("collect", ["env=dark_key_to_door"]).env)  # config default: subsets
    assert len(subset.tasks("train")) == 2000 and len(subset.tasks("test")) == 64
    assert (subset.tasks("test") == spec.tasks("test")[:64]).all()


def test_every_registered_env_builds_from_its_config_file():
    for name in ENVS:
        cfg = compose_cfg("collect", [f"env={name}"])
        spec = make_env_spec(cfg.env)
        assert spec.name == name
        env = spec.batched(spec.tasks("val")[:3], seed=0)
        s = env.reset()
        assert s.shape == (3,) and (0 <= s).all() and (s < spec.n_states).all()
        assert env.learner_states().max() < spec.n_learner_states
