"""Darkroom: a hidden goal on a grid.

The agent starts at the centre of a `grid_size` x `grid_size` grid and observes only its own
position. Actions: 0 stay, 1 up, 2 down, 3 left, 4 right (moves off the grid are clipped). Reward is
+1 on every step whose new position is the goal; an episode lasts `horizon` steps. A task is a goal;
the goals are split into train and held-out test goals once, deterministically.

States are cell indices `row * grid_size + col` everywhere outside this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

# (d_row, d_col) per action: stay, up, down, left, right
ACTION_DELTAS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)


def optimal_return(goal, grid_size: int, horizon: int) -> int:
    """Best return for `goal`: walk straight there (d steps), then stay.

    The d-th step is the first that lands on the goal, so steps d..horizon are rewarded:
    horizon - d + 1 of them, or `horizon` when the goal is the start (d = 0).
    """
    centre = grid_size // 2
    d = abs(int(goal[0]) - centre) + abs(int(goal[1]) - centre)
    return max(0, min(horizon - d + 1, horizon))


def split_goals(grid_size: int, train_env_ratio: float, env_split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All goals, shuffled by `env_split_seed`, cut into (train, test); each an int array [n, 2]."""
    if not 0.0 < train_env_ratio < 1.0:
        raise ValueError(f"env.train_env_ratio must lie strictly between 0 and 1, got {train_env_ratio}.")
    goals = np.array([(r, c) for r in range(grid_size) for c in range(grid_size)], dtype=np.int64)
    order = np.random.default_rng(env_split_seed).permutation(len(goals))
    n_train = int(round(len(goals) * train_env_ratio))
    if not 0 < n_train < len(goals):
        raise ValueError(f"env.train_env_ratio={train_env_ratio} leaves no train or no test goal on a {grid_size}x{grid_size} grid.")
    goals = goals[order]
    return goals[:n_train], goals[n_train:]


@dataclass(frozen=True)
class DarkroomSpec:
    """Everything the rest of the code needs to know about the env, derived from the `env` config."""

    grid_size: int
    horizon: int
    train_env_ratio: float
    env_split_seed: int
    n_actions: int = 5

    @classmethod
    def from_config(cls, env_cfg) -> "DarkroomSpec":
        spec = cls(
            grid_size=int(env_cfg["grid_size"]),
            horizon=int(env_cfg["horizon"]),
            train_env_ratio=float(env_cfg["train_env_ratio"]),
            env_split_seed=int(env_cfg["env_split_seed"]),
        )
        if spec.grid_size < 2 or spec.horizon < 1:
            raise ValueError(f"env.grid_size must be >= 2 and env.horizon >= 1, got {spec.grid_size} and {spec.horizon}.")
        return spec

    @property
    def n_states(self) -> int:
        return self.grid_size * self.grid_size

    def goals(self, split: str) -> np.ndarray:
        train, test = split_goals(self.grid_size, self.train_env_ratio, self.env_split_seed)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got '{split}'.")
        return train if split == "train" else test

    def optimal_returns(self, goals: np.ndarray) -> np.ndarray:
        return np.array([optimal_return(g, self.grid_size, self.horizon) for g in goals], dtype=np.float64)


class BatchedDarkroom:
    """Many Darkrooms stepped at once, one goal each; all episodes start and end together."""

    def __init__(self, goals: np.ndarray, grid_size: int, horizon: int):
        self.goals = np.asarray(goals, dtype=np.int64).reshape(-1, 2)
        self.grid_size = grid_size
        self.horizon = horizon
        self.n_envs = len(self.goals)
        self.goal_states = self.goals[:, 0] * grid_size + self.goals[:, 1]
        self.pos = np.zeros((self.n_envs, 2), dtype=np.int64)
        self.t = 0

    def reset(self) -> np.ndarray:
        self.pos[:] = self.grid_size // 2
        self.t = 0
        return self.states()

    def states(self) -> np.ndarray:
        return self.pos[:, 0] * self.grid_size + self.pos[:, 1]

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Returns (next_states, rewards, done). After `done`, call `reset()`."""
        self.pos = np.clip(self.pos + ACTION_DELTAS[actions], 0, self.grid_size - 1)
        self.t += 1
        next_states = self.states()
        rewards = (next_states == self.goal_states).astype(np.float32)
        return next_states, rewards, self.t >= self.horizon


class Darkroom(gym.Env):
    """Single-goal Darkroom with the gymnasium API; observation = (row, col) of the agent."""

    metadata = {"render_modes": []}

    def __init__(self, goal=(0, 0), grid_size: int = 9, horizon: int = 20):
        self.grid_size, self.horizon = grid_size, horizon
        self.goal = np.asarray(goal, dtype=np.int64)
        self.observation_space = gym.spaces.MultiDiscrete([grid_size, grid_size])
        self.action_space = gym.spaces.Discrete(len(ACTION_DELTAS))
        self._env = BatchedDarkroom(self.goal[None], grid_size, horizon)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._env.reset()
        return self._env.pos[0].copy(), {}

    def step(self, action):
        _, rewards, done = self._env.step(np.array([int(action)]))
        # the horizon is a time limit, not a terminal state
        return self._env.pos[0].copy(), float(rewards[0]), False, bool(done), {}
