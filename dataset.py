"""Learning histories on disk, and the training datasets cut from them.

A history dataset lives in `<data_root>/<env>-<algorithm>-<hash>/` (the hash covers the env and
algorithm configs, so a changed config never reuses old data): `train.npz`, `val.npz` and
`test.npz` hold `states`, `actions`, `rewards`, `next_states`, `noise` (steps that are context, never
targets) of shape [n_tasks, n_streams, T] and `tasks` [n_tasks, task_dim]; `metadata.json` (written last, so its presence marks a complete
dataset) holds the config, the task split and the source algorithm's learning curve.

AD's dataset indexes windows of one stream, never across streams or tasks, and implements
`__getitems__`, so a DataLoader gathers a whole batch with one vectorized numpy indexing step.
CompressedAD's `HistoryLanes` reads whole streams in order, a few segments a step. Both train on
every step of a stream equally often (uniform target density), the first episodes included: that
start is where in-context learning is measured.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from env import ENVS
from model.ad import WindowBatch
from model.ad_compressed import LaneBatch
from model.schedule import CompressionSchedule
from model.tokens import NO_TARGET, build_tokens, episode_phase
from utils.errors import DatasetError
from utils.hashing import hashed_ints

HISTORY_KEYS = ("states", "actions", "rewards", "next_states")


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def histories_key(cfg) -> dict:
    """The part of the config that determines the histories."""
    # noise_seeding: a change of how the histories are drawn that no config key expresses (old datasets are not reused)
    # short_name: an env key of runs made before it was removed (it named files); it never shaped the histories
    env = {k: v for k, v in _plain(cfg.env).items() if k != "short_name"}
    return {"env": env, "algorithm": _plain(cfg.algorithm), "noise_seeding": "per_split"}


def histories_dir(cfg) -> Path:
    if cfg.get("dataset_path"):
        return Path(cfg.dataset_path)
    digest = hashlib.sha256(json.dumps(histories_key(cfg), sort_keys=True).encode()).hexdigest()[:10]
    env = cfg.env
    return Path(cfg.data_root) / f"{env.name}{env.grid_size}-h{env.horizon}-{cfg.algorithm.name}-{digest}"


def collect_command() -> str:
    """The collect.py command matching this run's env/algorithm overrides (for error messages)."""
    overrides = []
    try:
        from hydra.core.hydra_config import HydraConfig

        prefixes = ("env", "algorithm", "experiment", "data_root", "dataset_path")
        overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith(prefixes)]
    except Exception:  # not under Hydra (tests, notebooks)
        pass
    return " ".join(["python collect.py", *overrides])


def save_histories(path: Path, splits: dict, metadata: dict) -> None:
    """Write a complete dataset directory atomically: build it under a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for split, arrays in splits.items():
        np.savez(tmp / f"{split}.npz", **arrays)
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    if path.exists():  # force=true: replace the old complete dataset only now that the new one is complete
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def load_metadata(cfg) -> dict:
    path = histories_dir(cfg)
    meta_file = path / "metadata.json"
    if not meta_file.is_file():
        state = "is incomplete (collection was interrupted)" if path.exists() else "does not exist"
        raise DatasetError(f"Dataset '{path}' {state}. Make it with:\n    {collect_command()}")
    meta = json.loads(meta_file.read_text())
    if meta["config"]["env"] != histories_key(cfg)["env"]:
        theirs, ours = meta["config"]["env"], histories_key(cfg)["env"]
        mismatch = {k: (theirs.get(k), ours.get(k)) for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)}
        raise DatasetError(
            f"Dataset '{path}' was made for another env config; (dataset, this run) differ in {mismatch}. "
            f"Use a matching dataset_path or make one with:\n    {collect_command()}"
        )
    return meta


def load_histories(cfg, split: str) -> dict:
    """Arrays of one split: `states`, `actions`, `rewards`, `next_states` [G, S, T], `tasks` [G, task_dim],
    the episode length `horizon`, and the env's `done_phase` (None, or the episode phase whose steps are not targets)."""
    meta = load_metadata(cfg)
    file = histories_dir(cfg) / f"{split}.npz"
    try:
        with np.load(file) as data:
            arrays = {k: data[k] for k in (*HISTORY_KEYS, "noise", "tasks")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"Dataset file '{file}' is missing or truncated ({e}). Regenerate it with:\n    {collect_command()} force=true") from None
    arrays["horizon"] = int(meta["config"]["env"]["horizon"])
    arrays["done_phase"] = ENVS[meta["config"]["env"]["name"]].done_phase
    return arrays


def select_streams(histories: dict, picked: slice) -> dict:
    """The same histories with only the streams `picked` of every task (the [G, S, T] arrays sliced on S)."""
    return {k: (v[:, picked] if k in (*HISTORY_KEYS, "noise") else v) for k, v in histories.items()}


def select_tasks(histories: dict, picked: slice) -> dict:
    """The same histories with only the tasks `picked` (the [G, S, T] arrays and `tasks` sliced on G)."""
    return {k: (v[picked] if k in (*HISTORY_KEYS, "noise", "tasks") else v) for k, v in histories.items()}


def stream_tokens(histories: dict) -> tuple[np.ndarray, np.ndarray]:
    """[G, S, T] histories -> tokens [G*S, T, 6] and target actions [G*S, T], one row per stream. NO_TARGET on noise
    steps and on the steps of the env's `done_phase` (after Key-to-Door's door): context, never targets."""
    G, S, T = histories["states"].shape
    tokens = build_tokens(*(histories[k].reshape(G * S, T) for k in HISTORY_KEYS), horizon=histories["horizon"])
    targets = histories["actions"].reshape(G * S, T).astype(np.int64)
    if "noise" in histories:
        targets[histories["noise"].reshape(G * S, T)] = NO_TARGET
    done = histories.get("done_phase")
    if done is not None:
        targets[episode_phase(histories["rewards"].reshape(G * S, T), histories["horizon"], done + 1) == done] = NO_TARGET
    return tokens, targets


def collate_batched(batch):
    """The datasets return whole batches from `__getitems__`; the collate step has nothing left to do."""
    return batch


class ADDataset(Dataset):
    """Windows of up to `n_transit` consecutive tokens of one stream; index = (stream, start).

    Starts run from -(n_transit - 1) to T - 1 and windows are cut to the stream, so every step is a
    target of exactly n_transit windows: the stream's first and last steps train as often as its
    middle. A window's first token sits at position 0, as after a rollout's reset or drop; positions
    past a cut window's end are padding (target NO_TARGET) that the causal mask keeps from the others.
    """

    def __init__(self, histories: dict, n_transit: int):
        self.tokens, self.actions = stream_tokens(histories)
        self.n_transit = n_transit
        self.n_streams, self.T = self.actions.shape
        if n_transit > self.T:
            raise DatasetError(f"n_transit={n_transit} is longer than a stream ({self.T} steps): lower model.n_transit or "
                               f"collect more episodes.")
        self.n_starts = self.T + n_transit - 1

    def __len__(self) -> int:
        return self.n_streams * self.n_starts

    def __getitems__(self, indices) -> WindowBatch:
        indices = np.asarray(indices, dtype=np.int64)
        stream, start = np.divmod(indices, self.n_starts)
        start = start - (self.n_transit - 1)
        t = np.maximum(start, 0)[:, None] + np.arange(self.n_transit)
        valid = t < np.minimum(self.T, start + self.n_transit)[:, None]
        t = np.minimum(t, self.T - 1)
        targets = np.where(valid, self.actions[stream[:, None], t], NO_TARGET)
        return {
            "index": torch.from_numpy(indices),
            "tokens": torch.from_numpy(self.tokens[stream[:, None], t]),
            "target_actions": torch.from_numpy(targets),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class HistoryLanes:
    """CompressedAD's training data: `n_lanes` lanes, each reading whole learning histories in order,
    `segments_per_step` segments per optimizer step.

    A segment is the span of steps during which the rollout holds the latents L_k (model/schedule.py cuts
    a history into them from its first step); segment k >= 1 begins with compression k. A lane's batch row
    holds, for each of its segments this step, the chunk that compression compresses, the raw window the
    decoder sees and the targets in it; the model carries the lane's memory from segment to segment and
    from step to step (CompressedAD.forward). Every step of a stream is a target exactly once per epoch.

    Which segments a lane reads at a step is a function of (seed, step, lane) alone, so a resume needs only
    the carried latents: lane i reads histories j = i, i + n_lanes, i + 2 n_lanes, ... of a sequence that
    lists every stream once per epoch, in an order drawn from (seed, epoch). Lanes start staggered (lane i at
    segment i * n_segments // n_lanes of its first history), so every batch mixes depths. With
    `segments_per_step` null every step reads `n_lanes` whole histories from their first step: nothing is
    carried between steps. `memory_restart`: the probability that a lane's memory restarts empty at a
    segment (k >= 1), as if its history began there (augmentation; the states `clear` and `truncate` test).
    """

    def __init__(self, histories: dict, schedule: CompressionSchedule, n_lanes: int, segments_per_step: int | None,
                 seed: int = 0, memory_restart: float = 0.0):
        self.tokens, self.actions = stream_tokens(histories)
        self.n_streams, self.T = self.actions.shape
        self.n_lanes, self.seed, self.memory_restart = n_lanes, seed, memory_restart
        seg = schedule.segments(self.T)
        self.n_segments = seg.n_compressions + 1
        if segments_per_step is not None and segments_per_step < 1:
            raise DatasetError(f"segments_per_step={segments_per_step} must be >= 1, or null for whole histories.")
        self.whole_histories = segments_per_step is None or segments_per_step >= self.n_segments
        self.segments_per_step = self.n_segments if self.whole_histories else segments_per_step
        self.offset = np.zeros(n_lanes, np.int64) if self.whole_histories else np.arange(n_lanes) * self.n_segments // n_lanes
        # per segment k: the token positions of its chunk (k = 0 has none: a placeholder), of its window, its targets
        chunk_start = np.concatenate([[0], seg.chunk_start])
        self.chunk_t = np.minimum(chunk_start[:, None] + np.arange(schedule.chunk), self.T - 1)  # [K + 1, c]
        t, self.is_target = seg.windows()  # [K + 1, W]
        self.window_t = np.minimum(t, self.T - 1)
        self._orders = {}

    def _stream(self, j: np.ndarray) -> np.ndarray:
        """The stream of the j-th history in the reading sequence (every stream once per epoch)."""
        epoch, pos = np.divmod(j, self.n_streams)
        out = np.empty_like(j)
        for e in np.unique(epoch):
            if e not in self._orders:
                if len(self._orders) > 4:
                    self._orders.pop(min(self._orders))
                self._orders[e] = np.random.default_rng([self.seed, int(e)]).permutation(self.n_streams)
            out[epoch == e] = self._orders[e][pos[epoch == e]]
        return out

    def position(self, step: int, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(history j, segment k) of each lane's segments at `step`: [L, S] each."""
        g = self.offset[lanes, None] + step * self.segments_per_step + np.arange(self.segments_per_step)
        h, k = np.divmod(g, self.n_segments)
        return h * self.n_lanes + lanes[:, None], k

    def restarts(self, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Whether the memory of history j restarts empty at segment k (never at k = 0, which is empty anyway)."""
        if not self.memory_restart:
            return np.zeros(np.shape(k), bool)
        u = hashed_ints(np.asarray(j) * self.n_segments + k, self.seed * 7919 + 13, 0, 2**40 - 1) / 2.0**40
        return (u < self.memory_restart) & (np.asarray(k) >= 1)

    def batch(self, step: int, lanes: np.ndarray) -> LaneBatch:
        """The tokens of `lanes`' segments at `step` (model input, see CompressedAD.forward)."""
        return self.segments(*self.position(step, lanes))

    def segments(self, j: np.ndarray, k: np.ndarray) -> LaneBatch:
        """The tokens of segments k [L, S] of histories j [L, S]; `index` names each segment (stream * n_segments
        + k) and targets are NO_TARGET outside a segment's own steps and on noise."""
        stream = self._stream(j)
        t = self.window_t[k]  # [L, S, W]
        return {
            "index": torch.from_numpy(stream * self.n_segments + k),
            "chunks": torch.from_numpy(self.tokens[stream[..., None], self.chunk_t[k]]),
            "windows": torch.from_numpy(self.tokens[stream[..., None], t]),
            "target_actions": torch.from_numpy(np.where(self.is_target[k], self.actions[stream[..., None], t], NO_TARGET)
                                               .reshape(-1, t.shape[-1])),
            "memory_reset": torch.from_numpy((k == 0) | self.restarts(j, k)),
        }

    def carried(self, step: int, lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What each lane's carried memory at the start of `step` should be, exactly: L_k of `stream`'s history
        with its memory begun empty at segment `start` (its last restart, else 0). Where k = start it is L_0.
        Returns (stream, k, start), [L] each (the warm start at step 0, and the staleness reference)."""
        j, first = (x[:, 0] for x in self.position(step, lanes))
        k = np.maximum(first - 1, 0)  # a history's first segment starts from L_0: nothing carried
        segments = np.arange(self.n_segments)
        restarted = self.restarts(j[:, None], segments[None]) & (segments[None] <= k[:, None])
        start = np.where(restarted.any(1), self.n_segments - 1 - np.argmax(restarted[:, ::-1], 1), 0)
        return self._stream(j), k, start


def build_dataset(model_cfg, training_cfg, histories: dict, seed: int = 0) -> ADDataset | HistoryLanes:
    """The training data a model needs, from its architecture and training recipe: AD's windows (a torch Dataset)
    or CompressedAD's lanes (`train_batch_size` of them, global)."""
    if model_cfg.model == "AD":
        return ADDataset(histories, model_cfg.n_transit)
    if model_cfg.model == "CompressedAD":
        from model import (
            model_config,  # the schedule the model will use: one object, built from its config
        )

        return HistoryLanes(histories, model_config(model_cfg).schedule, training_cfg.train_batch_size,
                            training_cfg.segments_per_step, seed=seed, memory_restart=training_cfg.memory_restart)
    raise ValueError(f"No dataset for model '{model_cfg.model}'.")
