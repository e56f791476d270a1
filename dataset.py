"""Learning histories on disk, and the training datasets cut from them.

A history dataset lives in `<data_root>/<env>-<algorithm>-<hash>/` (the hash covers the env and
algorithm configs, so a changed config never reuses old data): `train.npz`, `val.npz` and
`test.npz` hold `states`, `actions`, `rewards`, `next_states`, `noise` (steps that are context, never
targets) of shape [n_tasks, n_streams, T] and `tasks` [n_tasks, task_dim]; `metadata.json` (written last, so its presence marks a complete
dataset) holds the config, the task split and the source algorithm's learning curve.

Datasets index windows of one stream, never across streams or tasks, and implement
`__getitems__`, so a DataLoader gathers a whole batch with one vectorized numpy indexing step.
Every dataset trains on every step of a stream equally often (uniform target density), the first
episodes included: that start is where in-context learning is measured.
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

from model.schedule import CompressionSchedule
from model.tokens import build_tokens
from utils.hashing import hashed_ints

HISTORY_KEYS = ("states", "actions", "rewards", "next_states")


class DatasetError(RuntimeError):
    """A dataset that is missing, incomplete or made for another config; the message says what to run."""


def _plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def histories_key(cfg) -> dict:
    """The part of the config that determines the histories."""
    return {"env": _plain(cfg.env), "algorithm": _plain(cfg.algorithm)}


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
    if meta["config"]["env"] != _plain(cfg.env):
        theirs, ours = meta["config"]["env"], _plain(cfg.env)
        mismatch = {k: (theirs.get(k), ours.get(k)) for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)}
        raise DatasetError(
            f"Dataset '{path}' was made for another env config; (dataset, this run) differ in {mismatch}. "
            f"Use a matching dataset_path or make one with:\n    {collect_command()}"
        )
    return meta


def load_histories(cfg, split: str) -> dict:
    """Arrays of one split: `states`, `actions`, `rewards`, `next_states` [G, S, T], `tasks` [G, task_dim],
    and the episode length `horizon`."""
    meta = load_metadata(cfg)
    file = histories_dir(cfg) / f"{split}.npz"
    try:
        with np.load(file) as data:
            arrays = {k: data[k] for k in (*HISTORY_KEYS, "noise", "tasks")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"Dataset file '{file}' is missing or truncated ({e}). Regenerate it with:\n    {collect_command()} force=true") from None
    arrays["horizon"] = int(meta["config"]["env"]["horizon"])
    return arrays


def stream_tokens(histories: dict) -> tuple[np.ndarray, np.ndarray]:
    """[G, S, T] histories -> tokens [G*S, T, 6] and target actions [G*S, T] (-100 on noise steps): one row per stream."""
    G, S, T = histories["states"].shape
    tokens = build_tokens(*(histories[k].reshape(G * S, T) for k in HISTORY_KEYS), horizon=histories["horizon"])
    targets = histories["actions"].reshape(G * S, T).astype(np.int64)
    if "noise" in histories:
        targets[histories["noise"].reshape(G * S, T)] = -100
    return tokens, targets


def collate_batched(batch):
    """The datasets return whole batches from `__getitems__`; the collate step has nothing left to do."""
    return batch


class ADDataset(Dataset):
    """Windows of up to `n_transit` consecutive tokens of one stream; index = (stream, start).

    Starts run from -(n_transit - 1) to T - 1 and windows are cut to the stream, so every step is a
    target of exactly n_transit windows: the stream's first and last steps train as often as its
    middle. A window's first token sits at position 0, as after a rollout's reset or drop; positions
    past a cut window's end are padding (target -100) that the causal mask keeps from the others.
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

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, start = np.divmod(indices, self.n_starts)
        start = start - (self.n_transit - 1)
        t = np.maximum(start, 0)[:, None] + np.arange(self.n_transit)
        valid = t < np.minimum(self.T, start + self.n_transit)[:, None]
        t = np.minimum(t, self.T - 1)
        targets = np.where(valid, self.actions[stream[:, None], t], -100)
        return {
            "index": torch.from_numpy(indices),
            "tokens": torch.from_numpy(self.tokens[stream[:, None], t]),
            "target_actions": torch.from_numpy(targets),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ADStreamDataset(Dataset):
    """CompressedAD `stream` mode: spans of `span_segments` consecutive segments of one stream, the
    segments being those the rollout's compression schedule cuts the stream into from its first step
    (model/schedule.py); index = (stream, first segment).

    A sample holds the whole stream's tokens (the model compresses everything before the span, as the
    rollout would have) and targets only in the span. First segments run from -(span_segments - 1)
    to the last segment and spans are cut to the stream, so every step is a target equally often.
    """

    def __init__(self, histories: dict, schedule: CompressionSchedule, span_segments: int, memory_restart: float = 0.0,
                 seed: int = 0):
        self.tokens, self.actions = stream_tokens(histories)
        self.memory_restart, self.seed = memory_restart, seed
        self.n_streams, self.T = self.actions.shape
        if span_segments < 1:
            raise DatasetError(f"stream_span_segments={span_segments} must be >= 1.")
        self.segments = schedule.segments(self.T)
        self.n_segments = self.segments.n_compressions + 1
        self.span = span_segments
        self.n_starts = self.n_segments + span_segments - 1
        self.segment_of = self.segments.segment_of(np.arange(self.T))  # [T]

    def __len__(self) -> int:
        return self.n_streams * self.n_starts

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, first = np.divmod(indices, self.n_starts)
        first = first - (self.span - 1)
        last = np.minimum(first + self.span, self.n_segments)  # exclusive
        first = np.maximum(first, 0)
        in_span = (self.segment_of[None] >= first[:, None]) & (self.segment_of[None] < last[:, None])
        # with probability memory_restart the memory begins empty after a random compression before the span
        restart = hashed_ints(indices, self.seed * 7919 + 11, 0, 2**40 - 1) / 2.0**40 < self.memory_restart
        memory_start = np.where(restart, hashed_ints(indices, self.seed * 7919 + 12, 0, first), 0)
        return {
            "index": torch.from_numpy(indices),
            "tokens": torch.from_numpy(self.tokens[stream]),
            "target_actions": torch.from_numpy(np.where(in_span, self.actions[stream], -100)),
            "first_segment": torch.from_numpy(first),
            "n_segments": torch.from_numpy(last - first),
            "memory_start": torch.from_numpy(memory_start),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ADCompressedDataset(Dataset):
    """CompressedAD `chains` mode: contiguous history of one stream cut into a compression chain; index = (stream, start).

    A sample has depth k in [min_depth, max_compression_depth] (uniform unless `depth_weights`), k chunks of lengths in
    [min_compress_length, max_compress_length] that the model compresses stage by stage, then an
    uncompressed part of length in [min_uncompressed_length, max_uncompressed_length] whose actions
    are the targets. Arrays are padded to the maxima (`chunk_lengths` = 0 marks a missing stage,
    targets of -100 mark padding); `collate_compressed_batch` trims them to the batch's longest.

    With `cut_chain_to_fit` (training) the uncompressed part starts uniformly over the stream and the
    chain keeps only the chunks that fit before it, so targets are uniform over the stream, its first
    episodes included. Without it (stage-1 chains) every chain keeps its depth and the uncompressed
    part is spread over the positions the chain leaves room for.
    """

    def __init__(self, histories: dict, max_compression_depth: int, min_compress_length: int, max_compress_length: int,
                 min_uncompressed_length: int, max_uncompressed_length: int, seed: int = 0, min_depth: int = 0,
                 depth_weights=None, cut_chain_to_fit: bool = True):
        self.tokens, self.actions = stream_tokens(histories)
        self.depth_range = (min_depth, max_compression_depth)
        n_depths = max_compression_depth - min_depth + 1
        weights = np.ones(n_depths) if depth_weights is None else np.asarray(depth_weights, dtype=np.float64)
        if len(weights) != n_depths or (weights < 0).any() or weights.sum() <= 0:
            raise DatasetError(f"depth_weights {list(weights)} must be {n_depths} non-negative numbers, one per depth "
                               f"{min_depth}..{max_compression_depth}.")
        self.depth_cdf = np.cumsum(weights) / weights.sum()
        self.compress_range = (min_compress_length, max_compress_length)
        self.uncompressed_range = (min_uncompressed_length, max_uncompressed_length)
        self.seed = seed
        self.cut_chain_to_fit = cut_chain_to_fit
        self.n_streams, T = self.actions.shape
        self.max_span = max_compression_depth * max_compress_length + max_uncompressed_length
        if self.max_span > T:
            raise DatasetError(f"A depth-{max_compression_depth} sample spans up to {self.max_span} steps but streams have {T}: "
                               f"lower the compression lengths or collect more episodes.")
        # cut: uncompressed parts start from -(max_uncompressed_length - 1) and are cut to the stream, so
        # every step is a target equally often; otherwise every part lies whole inside the stream
        self.n_starts = T + max_uncompressed_length - 1 if cut_chain_to_fit else T - max_uncompressed_length + 1

    def __len__(self) -> int:
        return self.n_streams * self.n_starts

    def sample_layout(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per index, as drawn (before any cut): depth [B], chunk lengths [B, D] (0 beyond the depth), uncompressed length [B]."""
        D = self.depth_range[1]
        u = hashed_ints(indices, self.seed * 7919 + 1, 0, 2**40 - 1) / 2.0**40
        depth = self.depth_range[0] + np.minimum(np.searchsorted(self.depth_cdf, u, side="right"), len(self.depth_cdf) - 1)
        chunk_len = np.stack([hashed_ints(indices, self.seed * 7919 + 2 + j, *self.compress_range) for j in range(D)], axis=1) \
            if D else np.zeros((len(indices), 0), np.int64)
        chunk_len = np.where(np.arange(D) < depth[:, None], chunk_len, 0)
        uncompressed_len = hashed_ints(indices, self.seed * 7919 + 100, *self.uncompressed_range)
        return depth, chunk_len, uncompressed_len

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, start = np.divmod(indices, self.n_starts)
        depth, chunk_len, uncompressed_len = self.sample_layout(indices)
        T, D = self.tokens.shape[1], chunk_len.shape[1]
        if self.cut_chain_to_fit:  # the uncompressed part covers [start, start + length) cut to the stream; the chain
            # keeps the newest chunks that fit before it
            start = start - (self.uncompressed_range[1] - 1)
            u_start = np.maximum(start, 0)
            uncompressed_len = np.minimum(T, start + uncompressed_len) - u_start  # <= 0: a sample without targets
            fits = (np.cumsum(chunk_len[:, ::-1], 1)[:, ::-1] <= u_start[:, None]) & (chunk_len > 0)
            depth = fits.sum(1)
            dropped = (chunk_len > 0).sum(1) - depth
            shifted = np.take_along_axis(chunk_len, np.minimum(np.arange(D)[None] + dropped[:, None], max(D - 1, 0)), 1) \
                if D else chunk_len
            chunk_len = np.where(np.arange(D)[None] < depth[:, None], shifted, 0)
            start = u_start - chunk_len.sum(1)  # chain start
        else:  # the uncompressed part spread over [chain length, T - max_uncompressed_length]
            chain = chunk_len.sum(1)
            last = T - self.uncompressed_range[1]
            start = (chain + start * (last - chain) // max(1, last)) - chain
        chunk_start = start[:, None] + np.concatenate([np.zeros((len(indices), 1), np.int64), np.cumsum(chunk_len, 1)[:, :-1]], 1) \
            if D else np.zeros((len(indices), 0), np.int64)
        t_chunks = np.minimum(chunk_start[..., None] + np.arange(self.compress_range[1]), T - 1)  # [B, D, Lc]
        t_recent = np.minimum((start + chunk_len.sum(1))[:, None] + np.arange(self.uncompressed_range[1]), T - 1)
        targets = self.actions[stream[:, None], t_recent]
        targets[np.arange(self.uncompressed_range[1]) >= uncompressed_len[:, None]] = -100
        return {
            "index": torch.from_numpy(indices),
            "chunks": torch.from_numpy(self.tokens[stream[:, None, None], t_chunks]),
            "chunk_lengths": torch.from_numpy(chunk_len),
            "depth": torch.from_numpy(depth),
            "tokens": torch.from_numpy(self.tokens[stream[:, None], t_recent]),
            "target_actions": torch.from_numpy(targets),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def collate_compressed_batch(batch: dict) -> dict:
    """Trim a batch from `ADCompressedDataset.__getitems__` to its longest chunk, deepest stage and
    longest uncompressed part."""
    lengths = batch["chunk_lengths"]
    depth = int(batch["depth"].max()) if len(batch["depth"]) else 0
    longest_chunk = max(1, int(lengths.max())) if lengths.numel() else 1
    longest_recent = max(1, int((batch["target_actions"] != -100).sum(1).max()))
    out = dict(batch)
    out["chunks"] = batch["chunks"][:, :depth, :longest_chunk]
    out["chunk_lengths"] = lengths[:, :depth]
    out["tokens"] = batch["tokens"][:, :longest_recent]
    out["target_actions"] = batch["target_actions"][:, :longest_recent]
    return out


def compression_schedule(model_cfg) -> CompressionSchedule:
    return CompressionSchedule(window=model_cfg.max_uncompressed_length, chunk=model_cfg.rollout_compress_length)


def build_dataset(model_cfg, histories: dict, seed: int = 0) -> Dataset:
    """The training dataset a model needs, from its config group."""
    if model_cfg.model == "AD":
        return ADDataset(histories, model_cfg.n_transit)
    if model_cfg.model == "CompressedAD" and model_cfg.training_mode == "stream":
        return ADStreamDataset(histories, compression_schedule(model_cfg), model_cfg.stream_span_segments,
                               model_cfg.get("stream_memory_restart", 0.0), seed=seed)
    if model_cfg.model == "CompressedAD":
        return ADCompressedDataset(
            histories, model_cfg.max_compression_depth, model_cfg.min_compress_length, model_cfg.max_compress_length,
            model_cfg.min_uncompressed_length, model_cfg.max_uncompressed_length, seed=seed,
        )
    raise ValueError(f"No dataset for model '{model_cfg.model}'.")


def collate_fn_for(model_cfg):
    chains = model_cfg.model == "CompressedAD" and model_cfg.get("training_mode") != "stream"
    return collate_compressed_batch if chains else collate_batched
