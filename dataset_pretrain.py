"""Stage-1 data: compression chains cut from the same learning histories as the main training.

`ADCompressedPretrainDataset` samples chains of 1..pretrain_max_depth chunks (no depth 0: there
is nothing to compress), weighted towards deeper chains, with chunk lengths uniform in
[pretrain_min_compress_length, max_compress_length]. Only train goals are used; the last `n_val_streams`
streams of every train goal are held out for validation (`split="val"`), so the reported
correlation is measured on unseen histories. Draws are counter-based (`utils.hashing`): a sample
depends on (seed, index) only.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset import select_streams, stream_tokens
from utils.errors import DatasetError
from utils.hashing import hashed_ints


class ADCompressedPretrainDataset(Dataset):
    """Index = (stream, position): a chain of `depth` contiguous chunks of one stream, its end spread over the
    stream. `chunk_lengths` [D] is 0 beyond the depth; `chunks` [D, max_compress_length, 6] is padded."""

    def __init__(self, histories: dict, model_cfg, split: str, n_val_streams: int, depth_weights=None, seed: int = 0):
        S = histories["states"].shape[1]
        if not 0 < n_val_streams < S:
            raise DatasetError(f"pretrain_val_streams={n_val_streams} must leave streams for both training and validation "
                               f"(the dataset has {S} streams per goal).")
        keep = slice(0, S - n_val_streams) if split == "train" else slice(S - n_val_streams, S)
        self.tokens, _ = stream_tokens(select_streams(histories, keep))
        self.n_streams, self.T = self.tokens.shape[:2]
        D, lo, hi = model_cfg.pretrain_max_depth, model_cfg.pretrain_min_compress_length, model_cfg.max_compress_length
        if D < 1:
            raise DatasetError("Encoder pre-training needs model.pretrain_max_depth >= 1.")
        if not 1 <= lo <= hi:
            raise DatasetError(f"Stage-1 chunk lengths need 1 <= model.pretrain_min_compress_length ({lo}) <= "
                               f"model.max_compress_length ({hi}).")
        if D * hi >= self.T:
            raise DatasetError(f"A depth-{D} chain spans up to {D * hi} steps but streams have {self.T}: lower "
                               f"model.pretrain_max_depth or the compression lengths, or collect more episodes.")
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
        chunk_start = start[:, None] + np.concatenate([np.zeros((len(indices), 1), np.int64), np.cumsum(lengths, 1)[:, :-1]], 1)
        t = np.minimum(chunk_start[..., None] + np.arange(self.length_range[1]), self.T - 1)  # [B, D, Lc]
        return {
            "index": torch.from_numpy(indices),
            "chunks": torch.from_numpy(self.tokens[stream[:, None, None], t]),
            "chunk_lengths": torch.from_numpy(lengths),
            "depth": torch.from_numpy(depth),
        }

    def __getitem__(self, index: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def collate_pretrain_batch(batch: dict) -> dict:
    """Trim padding to the batch's deepest chain and longest chunk."""
    depth = int(batch["depth"].max())
    longest = int(batch["chunk_lengths"].max())
    return {**batch, "chunks": batch["chunks"][:, :depth, :longest], "chunk_lengths": batch["chunk_lengths"][:, :depth]}
