"""Stage-1 data: compression chains cut from the same learning histories as the main training.

`ADCompressedPretrainDataset` samples chains of 1..pretrain_max_depth chunks (no depth 0: there
is nothing to compress), weighted towards deeper chains, with chunk lengths uniform in
[pretrain_min_compress_length, max_compress_length]. Only train goals are used; the last `n_val_streams`
streams of every train goal are held out for validation (`split="val"`), or, where every goal has a single stream
(Key-to-Door's quick preset), the last `n_val_tasks` goals, so the reported correlation is measured on unseen
histories. With `positives=True` every chain comes with a second one of the same task (the task-contrastive
objective): from another stream of that goal (the same stream, not overlapping, with one stream per goal), at a
random point of its history. Draws are counter-based (`utils.hashing`): a sample depends on (seed, index) only.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import select_streams, select_tasks, stream_tokens
from utils.errors import DatasetError
from utils.hashing import hashed_ints


class ADCompressedPretrainDataset(Dataset):
    """Index = (stream, position): a chain of `depth` contiguous chunks of one stream, its end spread over the
    stream. `chunk_lengths` [D] is 0 beyond the depth; `chunks` [D, max_compress_length, 6] is padded; `task` is
    the goal's row in this split; with positives, `positive_chunks` is a chain of the same lengths."""

    def __init__(self, histories: dict, model_cfg, split: str, n_val_streams: int, depth_weights=None, seed: int = 0,
                 n_val_tasks: int = 0, positives: bool = False):
        G, S = histories["states"].shape[:2]
        if S > 1:
            if not 0 < n_val_streams < S:
                raise DatasetError(f"pretrain_val_streams={n_val_streams} must leave streams for both training and validation "
                                   f"(the dataset has {S} streams per goal).")
            keep = slice(0, S - n_val_streams) if split == "train" else slice(S - n_val_streams, S)
            histories = select_streams(histories, keep)
        else:  # one stream per goal: hold out whole goals
            if not 0 < n_val_tasks < G:
                raise DatasetError(f"The dataset has one stream per goal, so validation holds out whole goals: "
                                   f"model.pretrain_val_tasks={n_val_tasks} must be in [1, {G - 1}].")
            keep = slice(0, G - n_val_tasks) if split == "train" else slice(G - n_val_tasks, G)
            histories = select_tasks(histories, keep)
        self.tokens, _ = stream_tokens(histories)
        self.streams_per_goal = histories["states"].shape[1]
        self.n_streams, self.T = self.tokens.shape[:2]
        self.positives = positives
        D, lo, hi = model_cfg.pretrain_max_depth, model_cfg.pretrain_min_compress_length, model_cfg.max_compress_length
        if D < 1:
            raise DatasetError("Encoder pre-training needs model.pretrain_max_depth >= 1.")
        if not 1 <= lo <= hi:
            raise DatasetError(f"Stage-1 chunk lengths need 1 <= model.pretrain_min_compress_length ({lo}) <= "
                               f"model.max_compress_length ({hi}).")
        if D * hi >= self.T:
            raise DatasetError(f"A depth-{D} chain spans up to {D * hi} steps but streams have {self.T}: lower "
                               f"model.pretrain_max_depth or the compression lengths, or collect more episodes.")
        if positives and self.streams_per_goal == 1 and 3 * D * hi > self.T:
            raise DatasetError(f"Positive chains from the same stream need streams of at least 3 chains ({3 * D * hi} steps); "
                               f"they have {self.T}: collect more episodes or shorter chains.")
        weights = np.arange(1, D + 1) if depth_weights is None else np.asarray(depth_weights, dtype=np.float64)
        if len(weights) != D or (weights < 0).any() or weights.sum() <= 0:
            raise DatasetError(f"pretrain_depth_weights {list(weights)} must be {D} non-negative numbers, one per depth 1..{D}.")
        self.depth_cdf = np.cumsum(weights) / weights.sum()
        self.max_depth, self.length_range, self.seed = D, (lo, hi), seed

    def __len__(self) -> int:
        return self.n_streams * self.T

    def __getitems__(self, indices) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        stream, position = np.divmod(indices, self.T)
        D, salt = self.max_depth, self.seed * 7919
        u = hashed_ints(indices, salt + 1, 0, 2**40 - 1) / 2.0**40
        depth = 1 + np.minimum(np.searchsorted(self.depth_cdf, u, side="right"), D - 1)
        lengths = np.stack([hashed_ints(indices, salt + 2 + j, *self.length_range) for j in range(D)], axis=1)
        lengths = np.where(np.arange(D) < depth[:, None], lengths, 0)
        chain = lengths.sum(1)
        last = self.T - 1
        start = chain + position * (last - chain) // last - chain  # chain ends spread over [chain, T - 1]
        offsets = np.concatenate([np.zeros((len(indices), 1), np.int64), np.cumsum(lengths, 1)[:, :-1]], 1)
        cut = lambda s, first: torch.from_numpy(  # [B, D, Lc] tokens of the chains starting at `first` in streams `s`
            self.tokens[s[:, None, None], np.minimum((first[:, None] + offsets)[..., None] + np.arange(self.length_range[1]), self.T - 1)])
        S = self.streams_per_goal
        out = {"index": torch.from_numpy(indices), "chunks": cut(stream, start), "chunk_lengths": torch.from_numpy(lengths),
               "depth": torch.from_numpy(depth), "task": torch.from_numpy(stream // S)}
        if self.positives:  # anywhere in the history, so that where a chain sits (episode phase, age) cannot pair them
            if S > 1:  # another stream of the same goal
                other = stream - stream % S + (stream % S + hashed_ints(indices, salt + 2 + D, 1, S - 1)) % S
                first = hashed_ints(indices, salt + 3 + D, 0, self.T - 1 - chain)
            else:  # the same stream, not overlapping the chain: skip the 2 * chain - 1 starts that would
                other = stream
                q = hashed_ints(indices, salt + 3 + D, 0, self.T - 3 * chain)
                first = np.where(q <= start - chain, q, q + 2 * chain - 1)
            out["positive_chunks"] = cut(other, first)
        return out

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def collate_pretrain_batch(batch: dict) -> dict:
    """Trim padding to the batch's deepest chain and longest chunk."""
    depth = int(batch["depth"].max())
    longest = int(batch["chunk_lengths"].max())
    trimmed = {**batch, "chunks": batch["chunks"][:, :depth, :longest], "chunk_lengths": batch["chunk_lengths"][:, :depth]}
    if "positive_chunks" in batch:
        trimmed["positive_chunks"] = batch["positive_chunks"][:, :depth, :longest]
    return trimmed
