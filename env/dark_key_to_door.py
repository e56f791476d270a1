"""Dark Key-to-Door (Laskin et al. 2022, Algorithm Distillation): a hidden key, then a hidden door.

A task is an ordered pair (key cell, door cell), key != door. The start cell is drawn at random at
every episode reset. Reward: +1 on the first step of the episode whose new position is the key,
then +1 on the first later step whose new position is the door: at most 2 per episode, and nothing
more after the door (the episode still runs its full horizon). The observation is the agent's cell
only: whether it holds the key is not observed, so a policy must remember the +1 it received.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from env.base import (
    BatchedGridEnv,
    GridTaskEnv,
    GridTaskSpec,
    episode_start_cells,
    manhattan,
)


def optimal_return(key, door, start, horizon: int):
    """Best return from `start` (broadcasts over arrays of cells [..., 2]): walk to the key, then to the door.

    The key pays on the first step that lands on it, which takes max(1, d(start, key)) steps (from
    the key itself, one 'stay'); the door then needs d(key, door) >= 1 more steps. So the return is
    [max(1, d(s, k)) <= H] + [max(1, d(s, k)) + d(k, d) <= H]; 2 whenever 2 (grid_size - 1) * 2 <= H.
    """
    key, door, start = (np.asarray(x) for x in (key, door, start))
    to_key = np.maximum(1, manhattan(start, key))
    to_door = to_key + manhattan(key, door)
    return (to_key <= horizon).astype(np.int64) + (to_door <= horizon)


class BatchedDarkKeyToDoor(BatchedGridEnv):
    """tasks [n, 4] = (key_row, key_col, door_row, door_col); random starts from `seed`."""

    def __init__(self, tasks: np.ndarray, grid_size: int, horizon: int, seed: int = 0):
        super().__init__(tasks, grid_size, horizon, seed)
        self.key_states, self.door_states = self.cells(self.tasks[:, 0:2]), self.cells(self.tasks[:, 2:4])
        self.has_key = np.zeros(self.n_envs, dtype=bool)
        self.door_done = np.zeros(self.n_envs, dtype=bool)

    def learner_states(self) -> np.ndarray:
        """(cell, holds key): what the tabular source learns over (it knows what it picked up)."""
        return self.states() * 2 + self.has_key

    def _reset_tasks(self) -> None:
        start = episode_start_cells(self.seed, self.episode, self.n_envs, self.grid_size**2)
        self.pos = np.stack([start // self.grid_size, start % self.grid_size], axis=1)
        self.has_key[:] = False
        self.door_done[:] = False

    def _rewards(self) -> np.ndarray:
        s = self.states()
        key = ~self.has_key & (s == self.key_states)
        door = self.has_key & ~self.door_done & (s == self.door_states)  # holding the key since an earlier step
        self.has_key |= key
        self.door_done |= door
        return key | door


@dataclass(frozen=True)
class DarkKeyToDoorSpec(GridTaskSpec):
    name: ClassVar[str] = "dark_key_to_door"
    task_fields: ClassVar[tuple[str, ...]] = ("key_row", "key_col", "door_row", "door_col")
    phase_names: ClassVar[tuple[str, ...]] = ("to_key", "to_door", "after_door")
    done_phase: ClassVar[int | None] = 2

    @property
    def n_learner_states(self) -> int:
        return 2 * self.n_states

    def all_tasks(self) -> np.ndarray:
        g = self.grid_size
        cells = [(r, c) for r in range(g) for c in range(g)]
        return np.array([(*k, *d) for k in cells for d in cells if k != d], dtype=np.int64)

    def optimal_returns(self, tasks: np.ndarray) -> np.ndarray:
        """Expected over the uniform random start (2 for every task on 9x9 with horizon 50)."""
        g = self.grid_size
        starts = np.array([(r, c) for r in range(g) for c in range(g)])  # [S, 2]
        tasks = np.asarray(tasks).reshape(-1, 4)[:, None]  # [n, 1, 4]
        return optimal_return(tasks[..., :2], tasks[..., 2:], starts[None], self.horizon).mean(axis=1).astype(np.float64)

    def outcome_rates(self, returns: np.ndarray) -> dict[str, float]:
        """The key pays 1 and the door 1 only after it: return >= 1 took the key, 2 reached the door too."""
        return {"key_rate": float((returns >= 1).mean()), "door_rate": float((returns >= 2).mean())}

    def batched(self, tasks: np.ndarray, seed: int = 0) -> BatchedDarkKeyToDoor:
        return BatchedDarkKeyToDoor(tasks, self.grid_size, self.horizon, seed)


class DarkKeyToDoor(GridTaskEnv):
    """One (key, door) task with the gymnasium API; `reset(seed=...)` makes the starts reproducible."""

    def __init__(self, key=(0, 0), door=(8, 8), grid_size: int = 9, horizon: int = 50, seed: int = 0):
        if tuple(key) == tuple(door):
            raise ValueError(f"key and door must be different cells, got {tuple(key)} twice.")
        super().__init__(BatchedDarkKeyToDoor(np.array([[*key, *door]]), grid_size, horizon, seed))
