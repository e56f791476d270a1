"""Counter-based pseudo-random numbers: a draw depends on (index, salt) only, never on call order."""
from __future__ import annotations

import numpy as np


def hashed_ints(index: np.ndarray, salt: int, low, high) -> np.ndarray:
    """Deterministic pseudo-random ints in [low, high] per index (splitmix64): the same on every rank,
    run and batch composition."""
    index = np.asarray(index)
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    span = np.asarray(high, dtype=np.int64) - np.asarray(low, dtype=np.int64) + 1
    if (span < 1).any():
        raise ValueError(f"hashed_ints needs low <= high, got low={low}, high={high}")
    return np.asarray(low, dtype=np.int64) + (z % span.astype(np.uint64)).astype(np.int64)
