"""The compression schedule (model/schedule.py) against a token-by-token rollout."""
from __future__ import annotations

import numpy as np
import pytest

from model.schedule import CompressionSchedule


@pytest.mark.parametrize("window,chunk", [(40, 20), (40, 36), (40, 40), (7, 3)])
def test_schedule_segments_follow_the_rollout_rule(window, chunk):
    schedule = CompressionSchedule(window=window, chunk=chunk)
    T = 157
    seg = schedule.segments(T)
    # every token is the target of exactly one segment, in order
    assert seg.first_target[0] == 0 and (seg.end[:-1] == seg.first_target[1:]).all() and seg.end[-1] == T
    assert (seg.segment_of(np.arange(T)) == np.repeat(np.arange(len(seg.end)), seg.end - seg.first_target)).all()
    # chunk k is the k-th block of `chunk` tokens; the window after it starts where it ends
    assert (seg.chunk_start == chunk * np.arange(seg.n_compressions)).all()
    assert (seg.window_start[1:] == seg.chunk_start + chunk).all()
    assert (seg.end - seg.window_start).max() <= window  # the decoder never sees more than the window
    assert ((seg.first_target[1:] - seg.window_start[1:]) == window - chunk).all()  # what survives a compression
    # a token-by-token simulation of the rollout agrees
    n_recent, compressions = 0, []
    for t in range(T):
        if schedule.compress_now(n_recent):
            compressions.append(t)
            n_recent -= chunk
        n_recent += 1
    assert compressions == seg.first_target[1:].tolist()
