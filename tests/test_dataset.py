import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import ADCompressedDataset, ADDataset, collate_batched, collate_compressed_batch, hashed_ints
from model.tokens import PREV_ACTION, PREV_STATE, STATE, build_tokens


def labelled_histories(n_goals=3, n_streams=4, T=200):
    """Histories whose states encode (stream id, time): state = stream_id * 1000 + t."""
    G, S = n_goals, n_streams
    stream_id = np.arange(G * S).reshape(G, S, 1)
    t = np.arange(T).reshape(1, 1, T)
    states = (stream_id * 1000 + t).astype(np.int64)
    return {"states": states, "next_states": states + 1, "actions": (states % 5).astype(np.int8),
            "rewards": np.zeros(states.shape, np.float32), "goals": np.zeros((G, 2), np.int64)}


def test_tokens_carry_previous_transition_and_current_state():
    s = np.array([[3, 4, 5]])
    tokens = build_tokens(s, np.array([[1, 2, 0]]), np.array([[0.0, 1.0, 0.0]]), np.array([[4, 9, 6]]))
    assert tokens[0, 0].tolist() == [-1, -1, 0, -1, 3]  # no previous transition at the stream's start
    assert tokens[0, 2].tolist() == [4, 2, 1, 9, 5]


def test_ad_windows_never_cross_streams_and_align_targets():
    ds = ADDataset(labelled_histories(), n_transit=50)
    assert len(ds) == 12 * (200 - 50 + 1)
    batch = ds.__getitems__(np.arange(len(ds))[::37])
    states = batch["tokens"][..., STATE].long()
    stream = states // 1000
    assert (stream == stream[:, :1]).all()  # one stream per window
    assert ((states[:, 1:] - states[:, :-1]) == 1).all()  # consecutive steps
    assert (batch["target_actions"] == states % 5).all()  # target = this step's action
    # the token's previous action is the previous step's target
    assert (batch["tokens"][:, 1:, PREV_ACTION].long() == batch["target_actions"][:, :-1]).all()


def test_compressed_samples_respect_ranges_and_streams():
    ds = ADCompressedDataset(labelled_histories(T=300), max_compression_depth=3, min_compress_length=5,
                             max_compress_length=9, min_uncompressed_length=4, max_uncompressed_length=7, seed=3)
    idx = np.arange(len(ds))
    depth, chunk_len, unc_len = ds.sample_layout(idx)
    assert set(np.unique(depth)) == {0, 1, 2, 3}
    assert np.bincount(depth).min() > 0.2 * len(idx)  # roughly uniform
    used = chunk_len[np.arange(3) < depth[:, None]]
    assert used.min() == 5 and used.max() == 9 and (chunk_len[np.arange(3) >= depth[:, None]] == 0).all()
    assert unc_len.min() == 4 and unc_len.max() == 7

    batch = ds.__getitems__(idx[::11])
    B = len(idx[::11])
    for b in range(B):
        d = int(batch["depth"][b])
        pieces = [batch["chunks"][b, j, : int(batch["chunk_lengths"][b, j]), STATE] for j in range(d)]
        n_unc = int((batch["target_actions"][b] != -100).sum())
        pieces.append(batch["tokens"][b, :n_unc, STATE])
        states = torch.cat(pieces).long()
        assert (states // 1000 == states[0] // 1000).all()  # one stream
        assert ((states[1:] - states[:-1]) == 1).all()  # chunks then uncompressed part: contiguous
    # deterministic: same index, same sample
    again = ds.__getitems__(idx[::11])
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_every_depth_covers_the_whole_stream():
    """Shallow samples must also train on the stream's end (where the source has converged)."""
    T = 300
    ds = ADCompressedDataset(labelled_histories(T=T), 8, 20, 30, 10, 20, seed=1)
    batch = ds.__getitems__(np.arange(len(ds)))
    t_last = (batch["tokens"][..., STATE].long() % 1000).masked_fill(batch["target_actions"] == -100, -1).amax(1)
    t_first = torch.where(batch["depth"] > 0, batch["chunks"][:, 0, 0, STATE].long() % 1000, batch["tokens"][:, 0, STATE].long() % 1000)
    for d in range(9):
        at = batch["depth"] == d
        assert t_first[at].min() <= 5  # chains start near the stream's first step ...
        assert t_last[at].max() >= T - 10  # ... and targets reach its last steps


def test_collate_trims_to_the_batch():
    ds = ADCompressedDataset(labelled_histories(T=300), 3, 5, 9, 4, 7, seed=0)
    idx = np.nonzero(ds.sample_layout(np.arange(len(ds)))[0] <= 1)[0][:8]
    batch = collate_compressed_batch(ds.__getitems__(idx))
    assert batch["chunks"].shape[1] == int(batch["depth"].max()) <= 1
    assert batch["chunks"].shape[2] == max(1, int(batch["chunk_lengths"].max()))
    assert batch["tokens"].shape[1] == int((batch["target_actions"] != -100).sum(1).max())
    assert batch["depth_histogram"].tolist()[:2] == torch.bincount(batch["depth"], minlength=4).tolist()[:2]


def test_hashed_ints_cover_range():
    x = hashed_ints(np.arange(10000), 5, 2, 6)
    assert x.min() == 2 and x.max() == 6 and np.bincount(x)[2:].min() > 1800


def test_distributed_sampler_gives_ranks_disjoint_windows():
    ds = ADDataset(labelled_histories(), n_transit=50)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=16, sampler=sampler, collate_fn=collate_batched)
        first = next(iter(loader))
        assert first["tokens"].shape == (16, 50, 5)
        seen.append({tuple(x) for x in first["tokens"][:, 0, [PREV_STATE, STATE]].tolist()})
    assert not seen[0] & seen[1]


def test_same_depth_per_batch():
    ds = ADCompressedDataset(labelled_histories(T=600), 8, 20, 40, 20, 40, same_depth_per_batch=True)
    depths = set()
    for start in range(0, 2000, 100):
        batch = ds.__getitems__(np.arange(start, start + 16))
        assert (batch["depth"] == batch["depth"][0]).all()
        assert ((batch["chunk_lengths"] > 0).sum(1) == batch["depth"]).all()
        depths.add(int(batch["depth"][0]))
    assert len(depths) > 3
