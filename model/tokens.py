"""The context token: one per time step, the previous transition plus the current state.

Token t holds (s_{t-1}, a_{t-1}, r_{t-1}, s'_{t-1}, s_t) and the model predicts a_t from it and from
everything before it. Every token is therefore both a transition of the history and a query, so the
loss can be taken at every position. At a stream's first step there is no previous transition: its
fields are -1 and embed as zeros. Across an episode boundary s'_{t-1} (where the last episode ended)
differs from s_t (the start), so both are kept.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PREV_STATE, PREV_ACTION, PREV_REWARD, PREV_NEXT_STATE, STATE = range(5)
N_FIELDS = 5


def build_tokens(states, actions, rewards, next_states) -> np.ndarray:
    """Histories [..., T] -> tokens [..., T, 5] (float32; indices are exact in float32)."""
    tokens = np.full(states.shape + (N_FIELDS,), -1.0, dtype=np.float32)
    tokens[..., 1:, PREV_STATE] = states[..., :-1]
    tokens[..., 1:, PREV_ACTION] = actions[..., :-1]
    tokens[..., 1:, PREV_REWARD] = rewards[..., :-1]
    tokens[..., 1:, PREV_NEXT_STATE] = next_states[..., :-1]
    tokens[..., 0, PREV_REWARD] = 0.0
    tokens[..., STATE] = states
    return tokens


def token_dim(n_states: int, n_actions: int) -> int:
    return 3 * n_states + n_actions + 1


def _one_hot_or_zero(index: torch.Tensor, n: int) -> torch.Tensor:
    # index -1 ("no previous transition") maps to the all-zero vector
    return F.one_hot(index.long() + 1, n + 1)[..., 1:]


def token_features(tokens: torch.Tensor, n_states: int, n_actions: int) -> torch.Tensor:
    """tokens [..., 5] -> one-hot features [..., token_dim] for `embed_context`."""
    parts = [
        _one_hot_or_zero(tokens[..., PREV_STATE], n_states),
        _one_hot_or_zero(tokens[..., PREV_ACTION], n_actions),
        tokens[..., PREV_REWARD : PREV_REWARD + 1],
        _one_hot_or_zero(tokens[..., PREV_NEXT_STATE], n_states),
        _one_hot_or_zero(tokens[..., STATE], n_states),
    ]
    return torch.cat([p.to(torch.float32) for p in parts], dim=-1)
