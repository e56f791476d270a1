"""Stage-1 data: compression chains cut from the same learning histories as the main training.

`ADCompressedPretrainDataset` samples chains of 1..pretrain_max_depth chunks (no depth 0: there
is nothing to compress), weighted towards deeper chains, with chunk lengths from the CompressedAD
config. Only train goals are used; the last `n_val_streams` streams of every train goal are held
out for validation (`split="val"`), so the reported correlation is measured on unseen histories.
"""
from __future__ import annotations

import numpy as np
import torch

from dataset import ADCompressedDataset, DatasetError


class ADCompressedPretrainDataset(ADCompressedDataset):
    def __init__(self, histories: dict, model_cfg, split: str, n_val_streams: int, depth_weights=None, seed: int = 0):
        S = histories["states"].shape[1]
        if not 0 < n_val_streams < S:
            raise DatasetError(f"pretrain_val_streams={n_val_streams} must leave streams for both training and validation "
                               f"(the dataset has {S} streams per goal).")
        keep = slice(0, S - n_val_streams) if split == "train" else slice(S - n_val_streams, S)
        sliced = {k: (v[:, keep] if isinstance(v, np.ndarray) and v.ndim == 3 else v) for k, v in histories.items()}
        D = model_cfg.pretrain_max_depth
        if D < 1:
            raise DatasetError("Encoder pre-training needs model.pretrain_max_depth >= 1.")
        super().__init__(
            sliced, D, model_cfg.min_compress_length, model_cfg.max_compress_length,
            min_uncompressed_length=1, max_uncompressed_length=1, seed=seed, min_depth=1,
            depth_weights=depth_weights if depth_weights is not None else np.arange(1, D + 1), cut_chain_to_fit=False,
        )


def collate_pretrain_batch(batch: dict) -> dict:
    """Trim padding to the batch's deepest chain and longest chunk, and group samples by stage:
    `stage_index[j]` holds the samples that have a j-th chunk, so each stage runs batched."""
    lengths = batch["chunk_lengths"]
    depth = int(batch["depth"].max())
    longest = int(lengths.max())
    lengths = lengths[:, :depth]
    return {
        "index": batch["index"],
        "chunks": batch["chunks"][:, :depth, :longest],
        "chunk_lengths": lengths,
        "depth": batch["depth"],
        "stage_index": [torch.nonzero(lengths[:, j] > 0).squeeze(1) for j in range(depth)],
    }
