"""The memory CompressedAD's training lanes carry from step to step (dataset.HistoryLanes): its warm start, its
staleness against the current weights, and its place in the checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from utils.errors import UserConfigError

if TYPE_CHECKING:  # type names only: utils/ imports nothing above it
    from dataset import HistoryLanes


def exact_memory(raw_model, lanes: HistoryLanes, step: int, my_lanes: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory each lane carries into `step`, recomputed from its history's start with the current weights
    (model.memory_at): the warm start of a fresh run and the reference that staleness is measured against."""
    stream, k, start = lanes.carried(step, my_lanes)
    empty = k == start
    memory = raw_model.encoder.empty_memory(len(my_lanes)).detach().clone()
    if not empty.all():
        tokens = torch.from_numpy(lanes.tokens[stream[~empty]]).to(device)
        memory[torch.from_numpy(~empty).to(device)] = raw_model.memory_at(tokens, torch.from_numpy(k[~empty]).to(device),
                                                                          torch.from_numpy(start[~empty]).to(device))
    return memory, torch.from_numpy(empty).to(device)


def memory_staleness(raw_model, lanes: HistoryLanes, step: int, my_lanes: np.ndarray, carried, n_lanes: int = 8) -> torch.Tensor:
    """Mean over (up to n_lanes of) this rank's lanes that carry a non-empty memory into `step` of
    |carried - fresh| / |fresh|, fresh being that memory recomputed from the history's start with the current
    weights; NaN where no lane does. (A lane about to begin a new history carries nothing.)"""
    memory, empty = carried[0][:n_lanes], carried[1][:n_lanes]
    fresh, fresh_empty = exact_memory(raw_model, lanes, step, my_lanes[:n_lanes], memory.device)
    continues = torch.from_numpy(lanes.position(step, my_lanes[:n_lanes])[1][:, 0] > 0).to(memory.device)
    assert torch.equal(empty[continues], fresh_empty[continues]), "a lane's carried empty flag disagrees with its schedule"
    compared = continues & ~empty
    if not compared.any():
        return torch.tensor(float("nan"), device=memory.device)
    return ((memory - fresh)[compared].flatten(1).norm(dim=1) / fresh[compared].flatten(1).norm(dim=1)).mean()


def lane_state(lanes: HistoryLanes, accelerator, carried) -> dict:
    """Every lane's carried memory (gathered from all ranks, in lane order) and what it depends on."""
    memory, empty = carried
    return {"memory": accelerator.gather(memory.contiguous()).cpu(), "memory_empty": accelerator.gather(empty.long()).cpu().bool(),
            **lane_layout(lanes)}


def lane_layout(lanes: HistoryLanes) -> dict:
    return {"n_lanes": lanes.n_lanes, "segments_per_step": lanes.segments_per_step, "n_segments": lanes.n_segments,
            "n_streams": lanes.n_streams, "history_length": lanes.T}


def restore_lanes(state: dict | None, lanes: HistoryLanes, my_lanes: np.ndarray, path: Path, device) -> tuple:
    """This rank's carried memory from a checkpoint; refused, naming the keys, if the lanes were laid out otherwise."""
    if state is None:
        raise UserConfigError(f"resume=true: {path} holds no lane memory (it was written by another training recipe). "
                              f"Start afresh with overwrite=true.")
    now = lane_layout(lanes)
    differ = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if differ:
        raise UserConfigError(f"resume=true with lanes laid out otherwise than in {path}: (then, now) = {differ}. "
                              f"Resume with the run's own lane count, segments per step and dataset.")
    idx = torch.from_numpy(my_lanes)
    return state["memory"][idx].to(device), state["memory_empty"][idx].to(device)
