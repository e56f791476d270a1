"""Tabular Q-learning, vectorized over many independent learning streams.

Optimistic initial values drive exploration, epsilon decays linearly to zero, and every finished
episode is replayed backwards a few times so that the goal's value spreads along the path at once.
This makes a learner whose return rises within a few dozen episodes: the speed AD can distil.
"""
from __future__ import annotations

import numpy as np

from env.darkroom import BatchedDarkroom


def greedy_random_tiebreak(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """argmax over the last axis, choosing uniformly among tied maxima."""
    is_max = q == q.max(axis=-1, keepdims=True)
    return np.argmax(np.where(is_max, rng.random(q.shape), -1.0), axis=-1)


def run_q_learning(goals: np.ndarray, grid_size: int, horizon: int, cfg, rng: np.random.Generator) -> dict:
    """Run one Q-learner per row of `goals` for `cfg.n_episodes` episodes.

    Returns int/float arrays of shape [n_streams, n_episodes * horizon]: `states`, `actions`,
    `rewards`, `next_states`, plus `episode_returns` [n_streams, n_episodes].
    """
    n_streams, n_states, n_actions = len(goals), grid_size * grid_size, 5
    n_episodes = int(cfg["n_episodes"])
    gamma, alpha = float(cfg["gamma"]), float(cfg["alpha"])
    q = np.full((n_streams, n_states, n_actions), float(cfg["q_init"]))
    env = BatchedDarkroom(goals, grid_size, horizon)
    rows = np.arange(n_streams)

    T = n_episodes * horizon
    out = {
        "states": np.zeros((n_streams, T), np.int16),
        "actions": np.zeros((n_streams, T), np.int8),
        "rewards": np.zeros((n_streams, T), np.float32),
        "next_states": np.zeros((n_streams, T), np.int16),
    }

    def update(s, a, r, s2):
        target = r + gamma * q[rows, s2].max(axis=-1)
        q[rows, s, a] += alpha * (target - q[rows, s, a])

    for episode in range(n_episodes):
        decay = min(1.0, episode / max(1, int(cfg["epsilon_decay_episodes"])))
        epsilon = float(cfg["epsilon_start"]) + decay * (float(cfg["epsilon_end"]) - float(cfg["epsilon_start"]))
        s = env.reset()
        lo = episode * horizon
        for t in range(horizon):
            greedy = greedy_random_tiebreak(q[rows, s], rng)
            explore = rng.random(n_streams) < epsilon
            a = np.where(explore, rng.integers(0, n_actions, n_streams), greedy)
            s2, r, _ = env.step(a)
            # the horizon is a time limit: bootstrap through it
            update(s, a, r, s2)
            out["states"][:, lo + t], out["actions"][:, lo + t] = s, a
            out["rewards"][:, lo + t], out["next_states"][:, lo + t] = r, s2
            s = s2
        for _ in range(int(cfg["n_replay_sweeps"])):
            for t in reversed(range(lo, lo + horizon)):
                update(out["states"][:, t], out["actions"][:, t], out["rewards"][:, t], out["next_states"][:, t])

    out["episode_returns"] = out["rewards"].reshape(n_streams, n_episodes, horizon).sum(-1)
    return out
