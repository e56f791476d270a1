"""The context token and what is read from it (model/tokens.py)."""
from __future__ import annotations

import numpy as np

from model.tokens import episode_phase


def test_episode_phase_counts_the_rewards_earlier_in_the_same_episode():
    """Key-to-Door: 0 before the key, 1 after it, 2 after the door; the count restarts at every episode, and a
    reward on an episode's last step does not leak into the next episode's first token."""
    H = 5
    rewards = np.array([[0, 1, 0, 1, 0,   0, 0, 0, 0, 1,   1, 1, 1, 0, 0]], dtype=np.float32)
    phase = episode_phase(rewards, H, 3)
    assert phase.tolist() == [[0, 0, 1, 1, 2,   0, 0, 0, 0, 0,   0, 1, 2, 2, 2]]
    assert episode_phase(rewards, H, 2).max() == 1  # capped: Darkroom's "at_goal"
