"""When CompressedAD compresses, and what: the one rule that the rollout and the training both follow.

The decoder sees `[latents | raw window]`. The raw window holds at most `window` tokens; when a new
token would exceed it, the oldest `chunk` tokens are compressed with the latents into new latents
and `window - chunk` raw tokens survive (0 when chunk == window: memory is then the only route to
the past right after a compression). The schedule is anchored at the first token of a history: the
rollout's step 0, and a learning history's step 0 in training.

`CompressedADRollout` calls `compress_now` at every step. `segments` derives the teacher-forced view
of a whole history by running that same rule over a counter, so the two cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Segments:
    """A history of `n_tokens` tokens cut at its compressions.

    Compression k (1-based) compresses tokens [chunk_start[k-1], chunk_start[k-1] + chunk). Segment
    k (0-based; segment 0 precedes any compression) is the span during which the latents are L_k:
    the decoder input is [L_k | tokens window_start[k] .. t] for each t in [first_target[k], end[k]),
    and those t are the segment's targets. Every token is the target of exactly one segment.
    """

    chunk_start: np.ndarray  # [K]
    window_start: np.ndarray  # [K + 1]
    first_target: np.ndarray  # [K + 1]
    end: np.ndarray  # [K + 1]

    @property
    def n_compressions(self) -> int:
        return len(self.chunk_start)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per segment k, the token positions of its decoder window (window_start[k] onwards, as wide as the
        widest window) and which of them are its targets: ([K + 1, W], [K + 1, W] bool). The one place target
        positions are derived: training's lanes and the teacher-forced view both read them from here."""
        t = self.window_start[:, None] + np.arange(int((self.end - self.window_start).max()))
        return t, (t >= self.first_target[:, None]) & (t < self.end[:, None])

    def segment_of(self, t: np.ndarray) -> np.ndarray:
        """The segment whose target token t is (= the number of compressions before it)."""
        return np.searchsorted(self.first_target, t, side="right") - 1


@dataclass(frozen=True)
class CompressionSchedule:
    window: int  # the most raw tokens the decoder sees (max_uncompressed_length)
    chunk: int  # tokens compressed when the window is full (rollout_compress_length)

    def __post_init__(self):
        if not 1 <= self.chunk <= self.window:
            raise ValueError(f"need 1 <= rollout_compress_length ({self.chunk}) <= max_uncompressed_length ({self.window})")

    @property
    def kept(self) -> int:
        """Raw tokens that survive a compression."""
        return self.window - self.chunk

    def compress_now(self, n_recent: int) -> bool:
        """Before appending a token to a window of `n_recent` raw tokens: compress its oldest `chunk` first?"""
        return n_recent == self.window

    def segments(self, n_tokens: int) -> Segments:
        return _segments(self, int(n_tokens))


@lru_cache(maxsize=64)
def _segments(schedule: CompressionSchedule, n_tokens: int) -> Segments:
    chunk_start, window_start, first_target = [], [0], [0]
    start, n_recent = 0, 0
    for t in range(n_tokens):  # the rollout's loop, without the model
        if schedule.compress_now(n_recent):
            chunk_start.append(start)
            start, n_recent = start + schedule.chunk, n_recent - schedule.chunk
            window_start.append(start)
            first_target.append(t)
        n_recent += 1
    end = first_target[1:] + [n_tokens]
    as_array = lambda x: np.asarray(x, dtype=np.int64)
    return Segments(as_array(chunk_start), as_array(window_start), as_array(first_target), as_array(end))
