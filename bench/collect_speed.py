"""Collection speed: the vectorized Q-learning source against a plain per-stream Python loop.

    python bench/collect_speed.py

Both run the same algorithm (optimistic tabular Q-learning, decaying epsilon, backward replay) with
the default quick-preset settings; the ratio is measured in one run on the same machine.
"""
from __future__ import annotations

import time

import numpy as np

from algorithm.q_learning import run_q_learning
from env import ACTION_DELTAS, DarkroomSpec

CFG = dict(n_episodes_per_stream=60, gamma=0.9, alpha=1.0, q_init=6.0, epsilon_start=0.1, epsilon_end=0.0,
           epsilon_decay_episodes=40, n_replay_sweeps=3)


def per_stream_loop(goal, grid_size=9, horizon=20, rng=None) -> int:
    """The same algorithm for one stream, written as plain Python loops; returns env steps."""
    q = np.full((grid_size * grid_size, 5), CFG["q_init"])
    centre = grid_size // 2
    steps = 0
    for episode in range(CFG["n_episodes_per_stream"]):
        eps = CFG["epsilon_start"] + min(1.0, episode / CFG["epsilon_decay_episodes"]) * (CFG["epsilon_end"] - CFG["epsilon_start"])
        r_, c_ = centre, centre
        episode_transitions = []
        for _ in range(horizon):
            s = r_ * grid_size + c_
            if rng.random() < eps:
                a = int(rng.integers(5))
            else:
                best = np.flatnonzero(q[s] == q[s].max())
                a = int(rng.choice(best))
            r_ = min(max(r_ + ACTION_DELTAS[a][0], 0), grid_size - 1)
            c_ = min(max(c_ + ACTION_DELTAS[a][1], 0), grid_size - 1)
            s2 = r_ * grid_size + c_
            reward = float(r_ == goal[0] and c_ == goal[1])
            q[s, a] += CFG["alpha"] * (reward + CFG["gamma"] * q[s2].max() - q[s, a])
            episode_transitions.append((s, a, reward, s2))
            steps += 1
        for _ in range(CFG["n_replay_sweeps"]):
            for s, a, reward, s2 in reversed(episode_transitions):
                q[s, a] += CFG["alpha"] * (reward + CFG["gamma"] * q[s2].max() - q[s, a])
    return steps


def main() -> None:
    spec = DarkroomSpec(grid_size=9, horizon=20, train_env_ratio=0.9, val_env_ratio=0.1, env_split_seed=0)
    goals = np.repeat(spec.tasks("train"), 16, axis=0)  # the quick preset: 65 goals x 16 streams
    t0 = time.perf_counter()
    out = run_q_learning(spec, goals, CFG, np.random.default_rng(0))
    vec_seconds = time.perf_counter() - t0
    vec_rate = out["states"].size / vec_seconds

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    steps = sum(per_stream_loop(g, rng=rng) for g in goals[:16])
    loop_rate = steps / (time.perf_counter() - t0)
    print(f"vectorized ({len(goals)} streams): {vec_rate / 1e6:.2f}M env steps/s ({vec_seconds:.2f} s for {out['states'].size:,} steps)")
    print(f"per-stream Python loop:       {loop_rate / 1e3:.1f}k env steps/s")
    print(f"ratio: {vec_rate / loop_rate:.0f}x")


if __name__ == "__main__":
    main()
