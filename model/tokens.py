"""The context token: one per time step, the previous transition plus the current state.

Token t holds (s_{t-1}, a_{t-1}, r_{t-1}, s'_{t-1}, s_t, new_episode_t) and the model predicts a_t
from it and from everything before it. Every token is therefore both a transition of the history and
a query, so the loss can be taken at every position. At a stream's first step there is no previous
transition: its fields are -1 (reward 0). Across an episode boundary s'_{t-1} (where the last
episode ended) differs from s_t (the new start), and `new_episode` is 1 at the first step of every
episode: the reset the agent is told of (with random starts, as in Key-to-Door, the jump alone can
hide it).

States are cell indices of a square grid and are embedded by their normalised (row, col), not as
one-hot cells: measured on held-out goals (quick preset, 1000 steps), one-hot cells let AD memorise
the 73 training goal cells (0.15 of optimal on held-out goals vs 0.93 on train goals) while
coordinates generalise (0.71 at the same step).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PREV_STATE, PREV_ACTION, PREV_REWARD, PREV_NEXT_STATE, STATE, NEW_EPISODE = range(6)
N_FIELDS = 6
NO_TARGET = -100  # the target of a step the loss skips (noise steps, padding): F.cross_entropy's ignore_index


def build_tokens(states, actions, rewards, next_states, horizon: int) -> np.ndarray:
    """Histories [..., T] of whole episodes of `horizon` steps -> tokens [..., T, 6] (float32; indices are exact)."""
    tokens = np.full(states.shape + (N_FIELDS,), -1.0, dtype=np.float32)
    tokens[..., 1:, PREV_STATE] = states[..., :-1]
    tokens[..., 1:, PREV_ACTION] = actions[..., :-1]
    tokens[..., 1:, PREV_REWARD] = rewards[..., :-1]
    tokens[..., 1:, PREV_NEXT_STATE] = next_states[..., :-1]
    tokens[..., 0, PREV_REWARD] = 0.0
    tokens[..., STATE] = states
    tokens[..., NEW_EPISODE] = np.arange(states.shape[-1]) % horizon == 0
    return tokens


def episode_phase(rewards: np.ndarray, horizon: int, n_phases: int | None = None) -> np.ndarray:
    """rewards [..., T] of whole episodes -> int [..., T]: the rewarded steps earlier in each step's episode (what its
    token's history shows), capped at n_phases - 1 when given (Key-to-Door: 0 seeks the key, 1 the door)."""
    rewarded = rewards > 0
    before = np.cumsum(rewarded, axis=-1) - rewarded  # rewarded steps before each step, since the stream began
    count = before - before[..., np.arange(rewards.shape[-1]) // horizon * horizon]  # ... since its episode began
    return count if n_phases is None else np.minimum(count, n_phases - 1)


class TokenStream:
    """Builds the rollout's tokens step by step, exactly as `build_tokens` builds them from a history."""

    def __init__(self, n_envs: int):
        self.token = np.full((n_envs, N_FIELDS), -1.0, dtype=np.float32)
        self.token[:, PREV_REWARD] = 0.0

    def query(self, states: np.ndarray, new_episode: bool) -> np.ndarray:
        """This step's token (a copy: the caller may keep it) for the current states."""
        self.token[:, STATE] = states
        self.token[:, NEW_EPISODE] = float(new_episode)
        return self.token.copy()

    def record(self, states, actions, rewards, next_states) -> None:
        """The transition just taken becomes the next token's previous-transition fields."""
        t = self.token
        t[:, PREV_STATE], t[:, PREV_ACTION], t[:, PREV_REWARD], t[:, PREV_NEXT_STATE] = states, actions, rewards, next_states


def grid_side(n_states: int) -> int:
    side = math.isqrt(n_states)
    if side * side != n_states:
        raise ValueError(f"token features expect a square grid of cells, got n_states={n_states}.")
    return side


def token_dim(n_states: int, n_actions: int) -> int:
    return 3 * 2 + n_actions + 1 + 1 + 1


def _coords(index: torch.Tensor, side: int) -> torch.Tensor:
    i = index.long().clamp(min=0)
    return torch.stack([i // side, i % side], dim=-1).float() / max(1, side - 1)


def token_features(tokens: torch.Tensor, n_states: int, n_actions: int) -> torch.Tensor:
    """tokens [..., 6] -> features [..., token_dim] for `embed_context`: (row, col) of s, s' and the
    current state, one-hot previous action, previous reward, and flags for "has a previous transition"
    and "first step of an episode"."""
    side = grid_side(n_states)
    has_prev = (tokens[..., PREV_ACTION] >= 0).float()
    prev_action = F.one_hot(tokens[..., PREV_ACTION].long().clamp(min=0), n_actions).float() * has_prev[..., None]
    return torch.cat([
        _coords(tokens[..., PREV_STATE], side) * has_prev[..., None],
        prev_action,
        tokens[..., PREV_REWARD : PREV_REWARD + 1].float(),
        _coords(tokens[..., PREV_NEXT_STATE], side) * has_prev[..., None],
        _coords(tokens[..., STATE], side),
        has_prev[..., None],
        tokens[..., NEW_EPISODE : NEW_EPISODE + 1].float(),
    ], dim=-1)


def random_tokens(shape: tuple, n_states: int, n_actions: int, seed: int = 0) -> torch.Tensor:
    """Synthetic tokens [*shape, 6] with every field in its valid range (tests and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    highs = (n_states, n_actions, 2, n_states, n_states, 2)  # per field, in field order
    return torch.stack([torch.randint(0, h, tuple(shape), generator=g) for h in highs], dim=-1).float()
