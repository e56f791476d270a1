"""The interface every grid task implements, and the parts they share.

A grid task lives on a `grid_size` x `grid_size` grid with the same 5 actions (stay, up, down, left,
right; moves off the grid are clipped), fixed-length episodes of `horizon` steps, and an observation
that is the agent's cell only (`row * grid_size + col` everywhere outside env/). A *task* is a row of
ints (Darkroom: the goal cell; Key-to-Door: key and door cells). What differs per env:

- `all_tasks()`: every task, in a fixed order (the split permutes it);
- `optimal_returns(tasks)`: the best expected return per task (over the env's start distribution);
- `batched(tasks, seed)`: a `BatchedGridEnv` stepping one env per row of `tasks`;
- `n_learner_states`: the size of the state a tabular source algorithm learns over (it may know what
  it did itself, e.g. whether it holds the key; the model sees observations and rewards only).

Adding a grid task = one file with a `GridTaskSpec` subclass and its `BatchedGridEnv`, an entry in
`env/__init__.py`'s registry, and `config/env/<name>.yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np

from utils.hashing import hashed_ints

# (d_row, d_col) per action: stay, up, down, left, right
ACTION_DELTAS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.int64)
SPLITS = ("train", "val", "test")


def split_tasks(n_tasks: int, train_env_ratio: float, val_env_ratio: float, env_split_seed: int) -> dict[str, np.ndarray]:
    """Indices of the train / val / test tasks: one permutation by `env_split_seed`, cut into
    train+val (the first round(n * train_env_ratio)) and test (the rest); val is the last
    round(n * val_env_ratio) of train+val. Test is therefore independent of `val_env_ratio`."""
    if not 0.0 < train_env_ratio < 1.0:
        raise ValueError(f"env.train_env_ratio must lie strictly between 0 and 1, got {train_env_ratio}.")
    order = np.random.default_rng(env_split_seed).permutation(n_tasks)
    n_train_val = int(round(n_tasks * train_env_ratio))
    n_val = int(round(n_tasks * val_env_ratio))
    if not 0 < n_train_val < n_tasks:
        raise ValueError(f"env.train_env_ratio={train_env_ratio} leaves no train or no test task ({n_tasks} tasks).")
    if not 0 < n_val < n_train_val:
        raise ValueError(f"env.val_env_ratio={val_env_ratio} gives {n_val} validation tasks; it must give at least one "
                         f"(every choice is made on them) and leave train tasks ({n_train_val} before validation is carved out).")
    return {"train": order[: n_train_val - n_val], "val": order[n_train_val - n_val : n_train_val], "test": order[n_train_val:]}


def manhattan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a[..., 0] - b[..., 0]) + np.abs(a[..., 1] - b[..., 1])


class BatchedGridEnv:
    """Many envs of one kind stepped at once, one task each; all episodes start and end together.

    Subclasses set `self.pos` in `_reset_tasks` and compute rewards in `_rewards`.
    """

    def __init__(self, tasks: np.ndarray, grid_size: int, horizon: int, seed: int = 0):
        self.tasks = np.asarray(tasks, dtype=np.int64).reshape(len(tasks), -1)
        self.grid_size, self.horizon = grid_size, horizon
        self.n_envs = len(self.tasks)
        self.seed = seed
        self.pos = np.zeros((self.n_envs, 2), dtype=np.int64)
        self.t = 0
        self.episode = -1

    def cells(self, pos: np.ndarray) -> np.ndarray:
        return pos[..., 0] * self.grid_size + pos[..., 1]

    def states(self) -> np.ndarray:
        """The observation: the agent's cell."""
        return self.cells(self.pos)

    def learner_states(self) -> np.ndarray:
        """The state a tabular source learns over (the cell unless the env says otherwise)."""
        return self.states()

    def reset(self) -> np.ndarray:
        self.episode += 1
        self.t = 0
        self._reset_tasks()
        return self.states()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Returns (next_states, rewards, done). After `done`, call `reset()`."""
        self.pos = np.clip(self.pos + ACTION_DELTAS[actions], 0, self.grid_size - 1)
        self.t += 1
        return self.states(), self._rewards().astype(np.float32), self.t >= self.horizon

    def _reset_tasks(self) -> None:
        raise NotImplementedError

    def _rewards(self) -> np.ndarray:
        raise NotImplementedError


def episode_start_cells(seed: int, episode: int, n_envs: int, n_cells: int) -> np.ndarray:
    """Random start cells for one episode: a function of (seed, episode, env index) only, so that
    adding envs to a batch (memory transplants' donors) leaves the others' starts unchanged."""
    index = np.arange(n_envs, dtype=np.int64) + np.int64(episode) * np.int64(1 << 32)
    return hashed_ints(index, 0x5EED + 7919 * int(seed), 0, n_cells - 1)


@dataclass(frozen=True)
class GridTaskSpec:
    """Everything outside env/ needs to know about a grid task, built from its `env` config group."""

    name: ClassVar[str]
    task_fields: ClassVar[tuple[str, ...]]  # names of a task row's columns
    grid_size: int
    horizon: int
    train_env_ratio: float
    val_env_ratio: float
    env_split_seed: int
    n_train_tasks: int | None = None  # train tasks used (collected); None = all
    n_eval_tasks: int | None = None  # val / test tasks used (collected and evaluated); None = all
    n_actions: ClassVar[int] = len(ACTION_DELTAS)
    # what an episode's rewards so far say the agent is doing (phase k: k rewarded steps earlier in the episode,
    # the last name for k and more); the held-out loss is reported per phase
    phase_names: ClassVar[tuple[str, ...]] = ()
    # the phase from which no action can change the episode's return (Key-to-Door: after the door), or None;
    # its steps are context only, never targets (dataset.stream_tokens): there is no behaviour there to distil
    done_phase: ClassVar[int | None] = None

    @classmethod
    def from_config(cls, env_cfg) -> "GridTaskSpec":
        get = lambda k, default=None: env_cfg[k] if k in env_cfg and env_cfg[k] is not None else default
        spec = cls(
            grid_size=int(env_cfg["grid_size"]), horizon=int(env_cfg["horizon"]),
            train_env_ratio=float(env_cfg["train_env_ratio"]), val_env_ratio=float(get("val_env_ratio", 0.0)),
            env_split_seed=int(env_cfg["env_split_seed"]),
            n_train_tasks=None if get("n_train_tasks") is None else int(get("n_train_tasks")),
            n_eval_tasks=None if get("n_eval_tasks") is None else int(get("n_eval_tasks")),
        )
        if spec.grid_size < 2 or spec.horizon < 1:
            raise ValueError(f"env.grid_size must be >= 2 and env.horizon >= 1, got {spec.grid_size} and {spec.horizon}.")
        spec.check()
        return spec

    def check(self) -> None:
        """Raise ValueError naming the values that cannot work (the split, the subset sizes)."""
        sizes = {s: len(i) for s, i in split_tasks(len(self.all_tasks()), self.train_env_ratio, self.val_env_ratio,
                                                     self.env_split_seed).items()}
        for key, splits in (("n_train_tasks", ("train",)), ("n_eval_tasks", ("val", "test"))):
            n = getattr(self, key)
            if n is not None and not 1 <= n:
                raise ValueError(f"env.{key}={n} must be >= 1 (or null for all).")
            for s in splits:
                if n is not None and sizes[s] and n > sizes[s]:
                    raise ValueError(f"env.{key}={n} exceeds the {sizes[s]} {s} tasks of this split.")

    @property
    def n_states(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def n_learner_states(self) -> int:
        return self.n_states

    def all_tasks(self) -> np.ndarray:
        raise NotImplementedError

    def tasks(self, split: str) -> np.ndarray:
        """The tasks of one split: deterministic from the env config, the same in every script."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
        all_tasks = self.all_tasks()
        index = split_tasks(len(all_tasks), self.train_env_ratio, self.val_env_ratio, self.env_split_seed)[split]
        limit = self.n_train_tasks if split == "train" else self.n_eval_tasks
        return all_tasks[index[:limit]]

    def optimal_returns(self, tasks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batched(self, tasks: np.ndarray, seed: int = 0) -> BatchedGridEnv:
        raise NotImplementedError

    def outcome_rates(self, returns: np.ndarray) -> dict[str, float]:
        """Env-specific shares of episodes (returns [..., episodes]) that reached each milestone."""
        return {}


class GridTaskEnv(gym.Env):
    """One task of a batched grid env with the gymnasium API; observation = (row, col) of the agent.
    The horizon is a time limit (truncation), never a terminal state."""

    metadata = {"render_modes": []}

    def __init__(self, batched: BatchedGridEnv):
        self._env = batched
        g = batched.grid_size
        self.observation_space = gym.spaces.MultiDiscrete([g, g])
        self.action_space = gym.spaces.Discrete(len(ACTION_DELTAS))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # a new start sequence, reproducible from the seed
            self._env.seed, self._env.episode = int(seed), -1
        self._env.reset()
        return self._env.pos[0].copy(), {}

    def step(self, action):
        _, rewards, done = self._env.step(np.array([int(action)]))
        return self._env.pos[0].copy(), float(rewards[0]), False, bool(done), {}
