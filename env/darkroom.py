"""Darkroom: a hidden goal on a grid.

The agent starts at the centre of a `grid_size` x `grid_size` grid and observes only its own cell.
Reward is +1 on every step whose new position is the goal; an episode lasts `horizon` steps. A task
is a goal cell (row, col).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from env.base import BatchedGridEnv, GridTaskEnv, GridTaskSpec


def optimal_return(goal, grid_size: int, horizon: int) -> int:
    """Best return for `goal`: walk straight there (d steps), then stay.

    The d-th step is the first that lands on the goal, so steps d..horizon are rewarded:
    horizon - d + 1 of them, or `horizon` when the goal is the start (d = 0).
    """
    centre = grid_size // 2
    d = abs(int(goal[0]) - centre) + abs(int(goal[1]) - centre)
    return max(0, min(horizon - d + 1, horizon))


class BatchedDarkroom(BatchedGridEnv):
    def __init__(self, goals: np.ndarray, grid_size: int, horizon: int, seed: int = 0):
        super().__init__(goals, grid_size, horizon, seed)
        self.goal_states = self.cells(self.tasks[:, :2])

    def _reset_tasks(self) -> None:
        self.pos[:] = self.grid_size // 2

    def _rewards(self) -> np.ndarray:
        return self.states() == self.goal_states


@dataclass(frozen=True)
class DarkroomSpec(GridTaskSpec):
    name: ClassVar[str] = "darkroom"
    task_fields: ClassVar[tuple[str, ...]] = ("goal_row", "goal_col")
    phase_names: ClassVar[tuple[str, ...]] = ("to_goal", "at_goal")

    def all_tasks(self) -> np.ndarray:
        g = self.grid_size
        return np.array([(r, c) for r in range(g) for c in range(g)], dtype=np.int64)

    def optimal_returns(self, tasks: np.ndarray) -> np.ndarray:
        return np.array([optimal_return(t, self.grid_size, self.horizon) for t in tasks], dtype=np.float64)

    def batched(self, tasks: np.ndarray, seed: int = 0) -> BatchedDarkroom:
        return BatchedDarkroom(tasks, self.grid_size, self.horizon, seed)


class Darkroom(GridTaskEnv):
    """Single-goal Darkroom with the gymnasium API."""

    def __init__(self, goal=(0, 0), grid_size: int = 9, horizon: int = 20):
        self.goal = np.asarray(goal, dtype=np.int64)
        super().__init__(BatchedDarkroom(self.goal[None], grid_size, horizon))
