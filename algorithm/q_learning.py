"""Tabular Q-learning, vectorized over many independent learning streams, on any grid task.

Optimistic initial values drive exploration, epsilon decays linearly to zero, and every finished
episode is replayed backwards a few times so that reward spreads along the path at once. This makes
a learner whose return rises within a few dozen episodes: the speed AD can distil. The Q-table is
indexed by the env's learner state (the cell for Darkroom, (cell, holds key) for Key-to-Door); the
recorded history holds observations (cells) only.

Noise (context, never targets): after `noise_after_episodes`, each step's action is replaced by a
uniformly random one with probability `noise_prob`, and an episode may begin a lapse of 1 to
`lapse_max_episodes` episodes of random actions with probability `lapse_prob` (never two back to
back). The source keeps learning through them and afterwards acts on what it knew, so the histories
show what a sampled rollout meets and the source otherwise never shows: a wrong step, or the task
lost for an episode or two, then the way back from what was known before. These steps are flagged
(`noise`) and trained on as context only. Noise draws come from their own generator.
"""
from __future__ import annotations

import numpy as np

from env.base import GridTaskSpec


def greedy_random_tiebreak(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """argmax over the last axis, choosing uniformly among tied maxima."""
    is_max = q == q.max(axis=-1, keepdims=True)
    return np.argmax(np.where(is_max, rng.random(q.shape), -1.0), axis=-1)


def run_q_learning(spec: GridTaskSpec, tasks: np.ndarray, cfg, rng: np.random.Generator, env_seed: int = 0,
                   noise_seed=None) -> dict:
    """Run one Q-learner per row of `tasks` for `cfg.n_episodes_per_stream` episodes.

    Returns arrays of shape [n_streams, n_episodes * horizon]: `states`, `actions`, `rewards`,
    `next_states`, `noise` (bool: a noise action, not the source's), plus `episode_returns` [n_streams, n_episodes].
    """
    n_streams, n_actions, horizon = len(tasks), spec.n_actions, spec.horizon
    n_episodes = int(cfg["n_episodes_per_stream"])
    gamma, alpha = float(cfg["gamma"]), float(cfg["alpha"])
    q = np.full((n_streams, spec.n_learner_states, n_actions), float(cfg["q_init"]))
    env = spec.batched(tasks, seed=env_seed)
    rows = np.arange(n_streams)

    T = n_episodes * horizon
    out = {
        "states": np.zeros((n_streams, T), np.int16),
        "actions": np.zeros((n_streams, T), np.int8),
        "rewards": np.zeros((n_streams, T), np.float32),
        "next_states": np.zeros((n_streams, T), np.int16),
        "noise": np.zeros((n_streams, T), bool),
    }
    noise_prob, lapse_prob = float(cfg.get("noise_prob", 0.0)), float(cfg.get("lapse_prob", 0.0))
    noise_rng = np.random.default_rng(noise_seed if noise_seed is not None else [int(cfg.get("collect_seed", 0)), 7])  # apart from exploration's draws
    lapse_left = np.zeros(n_streams, np.int64)  # episodes of the current lapse still to come
    in_lapse = np.zeros(n_streams, bool)
    learner = np.zeros((n_streams, horizon + 1), np.int64)  # this episode's learner states, for the replay

    def update(s, a, r, s2):
        target = r + gamma * q[rows, s2].max(axis=-1)
        q[rows, s, a] += alpha * (target - q[rows, s, a])

    for episode in range(n_episodes):
        decay = min(1.0, episode / max(1, int(cfg["epsilon_decay_episodes"])))
        epsilon = float(cfg["epsilon_start"]) + decay * (float(cfg["epsilon_end"]) - float(cfg["epsilon_start"]))
        noisy_episode = episode >= int(cfg.get("noise_after_episodes", 0))
        if lapse_prob > 0 and noisy_episode:
            begin = (lapse_left == 0) & ~in_lapse & (noise_rng.random(n_streams) < lapse_prob)
            lapse_left = np.where(begin, noise_rng.integers(1, int(cfg["lapse_max_episodes"]) + 1, n_streams), lapse_left)
        in_lapse = lapse_left > 0
        lapse_left = np.maximum(lapse_left - 1, 0)
        obs = env.reset()
        learner[:, 0] = env.learner_states()
        lo = episode * horizon
        for t in range(horizon):
            s = learner[:, t]
            greedy = greedy_random_tiebreak(q[rows, s], rng)
            explore = rng.random(n_streams) < epsilon
            a = np.where(explore, rng.integers(0, n_actions, n_streams), greedy)
            if noisy_episode and (noise_prob > 0 or in_lapse.any()):
                noise = in_lapse | (noise_rng.random(n_streams) < noise_prob)
                a = np.where(noise, noise_rng.integers(0, n_actions, n_streams), a)
                out["noise"][:, lo + t] = noise
            obs2, r, _ = env.step(a)
            learner[:, t + 1] = env.learner_states()
            # the horizon is a time limit: bootstrap through it
            update(s, a, r, learner[:, t + 1])
            out["states"][:, lo + t], out["actions"][:, lo + t] = obs, a
            out["rewards"][:, lo + t], out["next_states"][:, lo + t] = r, obs2
            obs = obs2
        for _ in range(int(cfg["n_replay_sweeps"])):
            for t in reversed(range(horizon)):
                update(learner[:, t], out["actions"][:, lo + t], out["rewards"][:, lo + t], learner[:, t + 1])

    out["episode_returns"] = out["rewards"].reshape(n_streams, n_episodes, horizon).sum(-1)
    return out
