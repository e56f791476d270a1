"""The source algorithm (algorithm/q_learning.py): it learns, and its noise is flagged and random."""
from __future__ import annotations

import numpy as np

from algorithm.q_learning import greedy_random_tiebreak, run_q_learning
from env import (
    make_env_spec,
)
from tests.helpers import compose_cfg, darkroom

SOURCE = dict(n_episodes_per_stream=40, gamma=0.9, alpha=1.0, q_init=6.0, epsilon_start=0.1, epsilon_end=0.0,
              epsilon_decay_episodes=40, n_replay_sweeps=3)


def test_source_learning_curve_rises():
    spec = darkroom()
    goals = np.repeat(spec.tasks("train"), 4, axis=0)
    out = run_q_learning(spec, goals, SOURCE, np.random.default_rng(0))
    curve = out["episode_returns"].mean(0) / spec.optimal_returns(goals).mean()
    assert curve[:3].mean() < 0.2  # starts near random
    assert curve[-5:].mean() > 0.85  # and learns
    assert out["states"].shape == (len(goals), 40 * 20) and not out["noise"].any()


def test_key_to_door_source_learning_curve_rises():
    """Q-learning over (cell, holds key) with the env file's settings learns Key-to-Door within 100 episodes."""
    cfg = compose_cfg("collect", ["env=dark_key_to_door"])
    spec = make_env_spec(cfg.env)
    tasks = np.repeat(spec.tasks("train")[:60], 2, axis=0)
    out = run_q_learning(spec, tasks, {**cfg.algorithm, "n_episodes_per_stream": 100}, np.random.default_rng(0))
    curve = out["episode_returns"].mean(0) / 2.0
    assert curve[:5].mean() < 0.35  # starts far from optimal
    assert curve[25:35].mean() > curve[:5].mean() + 0.3 and curve[-10:].mean() > 0.9  # and learns
    assert (out["rewards"].reshape(len(tasks), 100, 50).sum(-1) <= 2).all()


def test_step_noise_is_flagged_random_and_corrected():
    spec = darkroom()
    goals = np.repeat(spec.tasks("train")[:20], 8, axis=0)
    cfg = {**SOURCE, "n_episodes_per_stream": 50, "noise_prob": 0.1, "noise_after_episodes": 30}
    out = run_q_learning(spec, goals, cfg, np.random.default_rng(0))
    noise = out["noise"].reshape(len(goals), 50, 20)
    assert not noise[:, :30].any() and 0.07 < noise[:, 30:].mean() < 0.13
    actions = out["actions"].reshape(len(goals), 50, 20)
    assert np.bincount(actions[:, 30:][noise[:, 30:]], minlength=5).min() > 0.1 * noise[:, 30:].sum()  # uniform-ish
    frac = out["episode_returns"][:, 40:] / spec.optimal_returns(goals)[:, None]
    assert frac.mean() > 0.8  # the source still solves the task around its wrong steps


def test_lapses_are_random_episodes_flagged_and_followed_by_a_return_to_the_goal():
    spec = darkroom()
    goals = np.repeat(spec.tasks("train")[:20], 8, axis=0)
    cfg = {**SOURCE, "n_episodes_per_stream": 60, "lapse_prob": 0.2, "noise_after_episodes": 30, "lapse_max_episodes": 2}
    out = run_q_learning(spec, goals, cfg, np.random.default_rng(0))
    lapse = out["noise"].reshape(len(goals), 60, 20)
    assert (lapse == lapse[..., :1]).all()  # whole episodes
    episode_lapse = lapse[..., 0]
    assert not episode_lapse[:, :30].any() and 0.1 < episode_lapse[:, 30:].mean() < 0.4
    runs = np.diff(np.concatenate([np.zeros((len(goals), 1)), episode_lapse, np.zeros((len(goals), 1))], 1).astype(int), axis=1)
    lengths = np.nonzero(runs == -1)[1] - np.nonzero(runs == 1)[1]
    assert lengths.max() <= 2  # never two lapses back to back
    frac = out["episode_returns"] / spec.optimal_returns(goals)[:, None]
    after = np.zeros_like(episode_lapse)
    after[:, 1:] = episode_lapse[:, :-1] & ~episode_lapse[:, 1:]
    assert frac[episode_lapse].mean() < 0.2 and frac[after].mean() > 0.8  # random, then back to the goal
    plain = run_q_learning(spec, goals, {**SOURCE, "n_episodes_per_stream": 60}, np.random.default_rng(0))
    assert (plain["actions"][:, : 30 * 20] == out["actions"][:, : 30 * 20]).all()  # lapses draw from their own generator


def test_next_state_equals_following_state_within_episodes():
    goals = np.array([[0, 0], [8, 8], [4, 4]])
    out = run_q_learning(darkroom(), goals, SOURCE, np.random.default_rng(1))
    s = out["states"].reshape(3, 40, 20)
    s2 = out["next_states"].reshape(3, 40, 20)
    assert (s2[:, :, :-1] == s[:, :, 1:]).all()
    assert (s[:, :, 0] == 4 * 9 + 4).all()  # every episode starts at the centre


def test_tiebreak_is_uniform_among_maxima():
    q = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]] * 3000)
    picks = greedy_random_tiebreak(q, np.random.default_rng(0))
    counts = np.bincount(picks, minlength=5)
    assert counts[0] == counts[3] == 0 and counts[[1, 2, 4]].min() > 900
