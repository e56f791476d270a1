"""Learning histories on disk, and the training datasets cut from them.

A history dataset lives in `<data_root>/<env>-<algorithm>-<hash>/` (the hash covers the env and
algorithm configs, so a changed config never reuses old data): `train.npz` and `test.npz` hold
`states`, `actions`, `rewards`, `next_states` of shape [n_goals, n_streams, T] and `goals`
[n_goals, 2]; `metadata.json` (written last, so its presence marks a complete dataset) holds the
config, the goal split and the source algorithm's learning curve.

Datasets index windows of one stream, never across streams or goals, and implement
`__getitems__`, so a DataLoader gathers a whole batch with one vectorized numpy indexing step.
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

from model.tokens import build_tokens

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
        mismatch = {k: (meta["config"]["env"].get(k), v) for k, v in _plain(cfg.env).items() if meta["config"]["env"].get(k) != v}
        raise DatasetError(
            f"Dataset '{path}' was made for another env config; (dataset, this run) differ in {mismatch}. "
            f"Use a matching dataset_path or make one with:\n    {collect_command()}"
        )
    return meta


def load_histories(cfg, split: str) -> dict:
    """Arrays of one split: `states`, `actions`, `rewards`, `next_states` [G, S, T] and `goals` [G, 2]."""
    load_metadata(cfg)
    file = histories_dir(cfg) / f"{split}.npz"
    try:
        with np.load(file) as data:
            arrays = {k: data[k] for k in (*HISTORY_KEYS, "goals")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetError(f"Dataset file '{file}' is missing or truncated ({e}). Regenerate it with:\n    {collect_command()} force=true") from None
    return arrays


def stream_tokens(histories: dict) -> tuple[np.ndarray, np.ndarray]:
    """[G, S, T] histories -> tokens [G*S, T, 5] and target actions [G*S, T]: one row per stream."""
    G, S, T = histories["states"].shape
    tokens = build_tokens(*(histories[k].reshape(G * S, T) for k in HISTORY_KEYS))
    return tokens, histories["actions"].reshape(G * S, T).astype(np.int64)


def collate_batched(batch):
    """The datasets return whole batches from `__getitems__`; the collate step has nothing left to do."""
    return batch


class ADDataset(Dataset):
    """Windows of `n_transit` consecutive tokens of one stream; index = (stream, start)."""

    def __init__(self, histories: dict, n_transit: int):
        self.tokens, self.actions = stream_tokens(histories)
        self.n_transit = n_transit
        self.n_streams, T = self.actions.shape
        if n_transit > T:
            raise DatasetError(f"n_transit={n_transit} is longer than a stream ({T} steps): lower model.n_transit or collect more episodes.")
        self.n_starts = T - n_transit + 1

    def __len__(self) -> int:
        return self.n_streams * self.n_starts

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, start = np.divmod(indices, self.n_starts)
        t = start[:, None] + np.arange(self.n_transit)
        return {
            "index": torch.from_numpy(indices),
            "tokens": torch.from_numpy(self.tokens[stream[:, None], t]),
            "target_actions": torch.from_numpy(self.actions[stream[:, None], t]),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def hashed_ints(index: np.ndarray, salt: int, low, high) -> np.ndarray:
    """Deterministic pseudo-random ints in [low, high] per index (splitmix64): a sample's random
    choices depend on its index and the seed only, so they are the same on every rank and run."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    span = np.asarray(high, dtype=np.int64) - np.asarray(low, dtype=np.int64) + 1
    return np.asarray(low, dtype=np.int64) + (z % span.astype(np.uint64)).astype(np.int64)


class ADCompressedDataset(Dataset):
    """Contiguous history of one stream, cut into a compression chain: index = (stream, start).

    A sample has depth k in [min_depth, max_compression_depth] (uniform unless `depth_weights`), k chunks of lengths in
    [min_compress_length, max_compress_length] that the model compresses stage by stage, then an
    uncompressed part of length in [min_uncompressed_length, max_uncompressed_length] whose actions
    are the targets. Arrays are padded to the maxima (`chunk_lengths` = 0 marks a missing stage,
    targets of -100 mark padding); `collate_compressed_batch` trims them to the batch's longest.
    """

    def __init__(self, histories: dict, max_compression_depth: int, min_compress_length: int, max_compress_length: int,
                 min_uncompressed_length: int, max_uncompressed_length: int, seed: int = 0, min_depth: int = 0,
                 depth_weights=None, same_depth_per_batch: bool = False):
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
        self.same_depth_per_batch = same_depth_per_batch
        self.n_streams, T = self.actions.shape
        self.max_span = max_compression_depth * max_compress_length + max_uncompressed_length
        if self.max_span > T:
            raise DatasetError(f"A depth-{max_compression_depth} sample spans up to {self.max_span} steps but streams have {T}: "
                               f"lower the compression lengths or collect more episodes.")
        # index = (stream, position): the position places the uncompressed part uniformly over the
        # positions its own chain leaves room for (see __getitems__), so that every depth, depth 0
        # included, trains on the whole stream, its converged end included.
        self.n_starts = T - max_uncompressed_length + 1

    def __len__(self) -> int:
        return self.n_streams * self.n_starts

    def sample_layout(self, indices: np.ndarray, ignore_depth: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per index: depth [B], chunk lengths [B, D] (0 beyond the depth, unless `ignore_depth`), uncompressed length [B]."""
        D = self.depth_range[1]
        u = hashed_ints(indices, self.seed * 7919 + 1, 0, 2**40 - 1) / 2.0**40
        depth = self.depth_range[0] + np.minimum(np.searchsorted(self.depth_cdf, u, side="right"), len(self.depth_cdf) - 1)
        chunk_len = np.stack([hashed_ints(indices, self.seed * 7919 + 2 + j, *self.compress_range) for j in range(D)], axis=1) \
            if D else np.zeros((len(indices), 0), np.int64)
        if not ignore_depth:
            chunk_len = np.where(np.arange(D) < depth[:, None], chunk_len, 0)
        uncompressed_len = hashed_ints(indices, self.seed * 7919 + 100, *self.uncompressed_range)
        return depth, chunk_len, uncompressed_len

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, start = np.divmod(indices, self.n_starts)
        depth, chunk_len, uncompressed_len = self.sample_layout(indices)
        if self.same_depth_per_batch and len(indices):  # the batch takes its first sample's depth
            full = self.sample_layout(indices, ignore_depth=True)[1]
            depth = np.full_like(depth, depth[0])
            chunk_len = np.where(np.arange(full.shape[1]) < depth[:, None], full, 0)
        T = self.tokens.shape[1]
        # the uncompressed part starts at a position in [chain length, T - max_uncompressed_length], spread
        # evenly by `start`; the chain lies just before it. (Anchoring the chain's start instead would keep
        # shallow samples away from the stream's end: with depth 0-8 on 1200-step streams, depth-0 targets
        # would never come from the last 27% of the stream, where the source has converged.)
        chain = chunk_len.sum(1)
        last = T - self.uncompressed_range[1]
        start = (chain + start * (last - chain) // max(1, last)) - chain  # chain start
        chunk_start = start[:, None] + np.concatenate([np.zeros((len(indices), 1), np.int64), np.cumsum(chunk_len, 1)[:, :-1]], 1) \
            if chunk_len.shape[1] else np.zeros((len(indices), 0), np.int64)
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
    longest uncompressed part, and count its depth mix (logged to TensorBoard)."""
    lengths = batch["chunk_lengths"]
    depth = int(batch["depth"].max()) if len(batch["depth"]) else 0
    longest_chunk = max(1, int(lengths.max())) if lengths.numel() else 1
    longest_recent = int((batch["target_actions"] != -100).sum(1).max())
    out = dict(batch)
    out["chunks"] = batch["chunks"][:, :depth, :longest_chunk]
    out["chunk_lengths"] = lengths[:, :depth]
    out["tokens"] = batch["tokens"][:, :longest_recent]
    out["target_actions"] = batch["target_actions"][:, :longest_recent]
    out["depth_histogram"] = torch.bincount(batch["depth"], minlength=lengths.shape[1] + 1)
    return out


def build_dataset(model_cfg, histories: dict, seed: int = 0) -> Dataset:
    """The training dataset a model needs, from its config group."""
    if model_cfg.model == "AD":
        return ADDataset(histories, model_cfg.n_transit)
    if model_cfg.model == "CompressedAD":
        return ADCompressedDataset(
            histories, model_cfg.max_compression_depth, model_cfg.min_compress_length, model_cfg.max_compress_length,
            model_cfg.min_uncompressed_length, model_cfg.max_uncompressed_length, seed=seed,
            same_depth_per_batch=model_cfg.get("same_depth_per_batch", False),
        )
    raise ValueError(f"No dataset for model '{model_cfg.model}'.")


def collate_fn_for(model_cfg):
    return collate_compressed_batch if model_cfg.model == "CompressedAD" else collate_batched
