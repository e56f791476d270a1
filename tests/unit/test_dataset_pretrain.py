"""Stage-1 data (dataset_pretrain.py): chain depths, streams and chunk lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_pretrain import ADCompressedPretrainDataset, collate_pretrain_batch
from tests.helpers import compose_cfg, labelled_histories
from utils.errors import DatasetError


def pretrain_cfg(**over):
    cfg = compose_cfg("pretrain_encoder", ["experiment=quick", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1"])
    cfg.model.merge_with(over)
    return cfg.model


def test_pretrain_dataset_depths_streams_and_chain_lengths():
    mcfg = pretrain_cfg()
    h = labelled_histories(n_goals=2, n_streams=5, T=400)
    train = ADCompressedPretrainDataset(h, mcfg, "train", n_val_streams=2, depth_weights=[1, 2, 3])
    val = ADCompressedPretrainDataset(h, mcfg, "val", n_val_streams=2)
    batch = train.__getitems__(np.arange(len(train)))
    counts = np.bincount(batch["depth"].numpy(), minlength=4)
    assert counts[0] == 0 and counts[1] < counts[2] < counts[3]  # no depth 0, weighted towards deeper
    lengths = batch["chunk_lengths"]
    used = lengths[torch.arange(3)[None] < batch["depth"][:, None]]
    assert used.min() == mcfg.pretrain_min_compress_length and used.max() == mcfg.max_compress_length
    assert (lengths[torch.arange(3)[None] >= batch["depth"][:, None]] == 0).all()
    for b in range(0, len(train), 37):  # a chain is contiguous steps of one stream
        states = torch.cat([batch["chunks"][b, j, : int(lengths[b, j]), 4] for j in range(int(batch["depth"][b]))]).long()
        assert (states // 1000 == states[0] // 1000).all() and (torch.diff(states) == 1).all()
    stream_of = lambda ds, idx: set((ds.__getitems__(idx)["chunks"][:, 0, 0, 4].long() // 1000).tolist())
    train_streams = stream_of(train, np.arange(0, len(train), 7))
    val_streams = stream_of(val, np.arange(0, len(val), 7))
    assert train_streams and val_streams and not train_streams & val_streams  # held-out streams
    trimmed = collate_pretrain_batch(train.__getitems__(np.arange(0, len(train), 97)[:16]))
    assert trimmed["chunks"].shape[1:3] == (int(trimmed["depth"].max()), int(trimmed["chunk_lengths"].max()))


def test_stage1_chunk_lengths_min_above_max_are_refused():
    
    with pytest.raises(DatasetError, match=r"min_compress_length \(45\) <= model.max_compress_length \(40\)"):
        ADCompressedPretrainDataset(labelled_histories(T=400), pretrain_cfg(pretrain_min_compress_length=45), "train", 1)


def test_positives_come_from_the_same_goal_and_one_stream_goals_hold_out_whole_goals():
    mcfg = pretrain_cfg()
    h = labelled_histories(n_goals=3, n_streams=4, T=400)  # state = stream id * 1000 + t, stream id = goal * 4 + stream
    ds = ADCompressedPretrainDataset(h, mcfg, "train", n_val_streams=1, positives=True)
    b = ds.__getitems__(np.arange(0, len(ds), 13))
    anchor, positive = b["chunks"][:, 0, 0, 4].long(), b["positive_chunks"][:, 0, 0, 4].long()
    stream_a, stream_p = anchor // 1000, positive // 1000
    assert (stream_a // 4 == stream_p // 4).all() and (stream_a // 4 == b["task"]).all()  # same goal
    assert (stream_a != stream_p).all() and (stream_p % 4 < 3).all()  # another stream, none held out
    assert (anchor % 1000 != positive % 1000).float().mean() > 0.9  # at an unrelated point of its history

    one = labelled_histories(n_goals=10, n_streams=1, T=600)
    train = ADCompressedPretrainDataset(one, mcfg, "train", n_val_streams=2, n_val_tasks=3, positives=True)
    val = ADCompressedPretrainDataset(one, mcfg, "val", n_val_streams=2, n_val_tasks=3)
    goals = lambda ds: set((ds.__getitems__(np.arange(0, len(ds), 11))["chunks"][:, 0, 0, 4].long() // 1000).tolist())
    assert goals(train) == set(range(7)) and goals(val) == {7, 8, 9}
    b = train.__getitems__(np.arange(0, len(train), 17))
    anchor, positive = b["chunks"][:, 0, 0, 4].long(), b["positive_chunks"][:, 0, 0, 4].long()
    chain = b["chunk_lengths"].sum(1)
    assert (anchor // 1000 == positive // 1000).all()  # the same stream, not overlapping
    assert ((positive % 1000 - anchor % 1000).abs() >= chain).all()
    with pytest.raises(DatasetError, match="pretrain_val_tasks=0 must be in"):
        ADCompressedPretrainDataset(one, mcfg, "train", n_val_streams=2, n_val_tasks=0)
