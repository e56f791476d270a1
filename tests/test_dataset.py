import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import (ADCompressedDataset, ADDataset, ADStreamDataset, collate_batched, collate_compressed_batch,
                     stream_tokens)
from model.schedule import CompressionSchedule
from model.tokens import NEW_EPISODE, PREV_ACTION, PREV_STATE, STATE, TokenStream, build_tokens
from utils.hashing import hashed_ints


def labelled_histories(n_goals=3, n_streams=4, T=200, horizon=20):
    """Histories whose states encode (stream id, time): state = stream_id * 1000 + t."""
    G, S = n_goals, n_streams
    stream_id = np.arange(G * S).reshape(G, S, 1)
    t = np.arange(T).reshape(1, 1, T)
    states = (stream_id * 1000 + t).astype(np.int64)
    return {"states": states, "next_states": states + 1, "actions": (states % 5).astype(np.int8),
            "rewards": np.zeros(states.shape, np.float32), "tasks": np.zeros((G, 2), np.int64), "horizon": horizon}


def test_tokens_carry_previous_transition_current_state_and_episode_start():
    s = np.array([[3, 4, 5, 6]])
    a, r, s2 = np.array([[1, 2, 0, 3]]), np.array([[0.0, 1.0, 0.0, 0.0]]), np.array([[4, 9, 6, 7]])
    tokens = build_tokens(s, a, r, s2, horizon=2)
    assert tokens[0, 0].tolist() == [-1, -1, 0, -1, 3, 1]  # no previous transition at the stream's start
    assert tokens[0, 2].tolist() == [4, 2, 1, 9, 5, 1]  # an episode begins at step 2
    assert tokens[0, 3, NEW_EPISODE] == 0
    # the rollout's step-by-step tokens are the same
    stream = TokenStream(1)
    online = []
    for t in range(4):
        online.append(stream.query(s[:, t], new_episode=t % 2 == 0))
        stream.record(s[:, t], a[:, t], r[:, t], s2[:, t])
    assert (np.concatenate(online) == tokens[0]).all()


def test_noise_steps_are_context_but_never_targets():
    h = labelled_histories(T=40)
    h["noise"] = np.zeros(h["states"].shape, bool)
    h["noise"][:, :, 20:40] = True
    tokens, targets = stream_tokens(h)
    assert (targets[:, 20:] == -100).all() and (targets[:, :20] >= 0).all()
    assert (tokens[:, 21:, PREV_ACTION] >= 0).all()  # the noise actions are still in the context


def test_ad_windows_never_cross_streams_and_align_targets():
    ds = ADDataset(labelled_histories(), n_transit=50)
    assert len(ds) == 12 * (200 + 50 - 1)
    batch = ds.__getitems__(np.arange(len(ds))[::37])
    valid = batch["target_actions"] != -100
    states = batch["tokens"][..., STATE].long()
    stream = states // 1000
    assert (stream == stream[:, :1]).all()  # one stream per window
    assert ((states[:, 1:] - states[:, :-1])[valid[:, 1:]] == 1).all()  # consecutive steps
    assert (batch["target_actions"][valid] == (states % 5)[valid]).all()  # target = this step's action
    assert valid[:, 0].all() and (valid[:, :-1] >= valid[:, 1:]).all()  # padding only at a window's end
    # the token's previous action is the previous step's target
    both = valid[:, 1:]
    assert (batch["tokens"][:, 1:, PREV_ACTION].long()[both] == batch["target_actions"][:, :-1][both]).all()


def target_density(ds, T: int) -> np.ndarray:
    """How often each stream position is a target, over every sample of the dataset (stream 0 only)."""
    idx = np.arange(ds.n_starts)  # the samples of stream 0
    batch = ds.__getitems__(idx)
    if "chunks" in batch:  # chains: tokens are the uncompressed part only
        t = batch["tokens"][..., STATE].long() % 1000
    else:
        t = torch.arange(batch["target_actions"].shape[1]).expand_as(batch["target_actions"])
        if "first_segment" not in batch:
            t = batch["tokens"][..., STATE].long() % 1000
    return np.bincount(t[batch["target_actions"] != -100].numpy(), minlength=T)


def test_target_density_is_uniform_over_the_stream_for_every_dataset():
    """The first episodes (where first10 and episodes-to-80% are measured) train as often as the interior."""
    T, h = 600, labelled_histories(n_goals=1, n_streams=1, T=600)
    datasets = {
        "AD": ADDataset(h, n_transit=100),
        "CompressedAD stream": ADStreamDataset(h, CompressionSchedule(window=40, chunk=20), span_segments=4),
        "CompressedAD stream, 4 kept": ADStreamDataset(h, CompressionSchedule(window=40, chunk=36), span_segments=8),
        "CompressedAD chains": ADCompressedDataset(h, 8, 20, 40, 20, 40, seed=1),
    }
    for name, ds in datasets.items():
        density = target_density(ds, T).astype(float)
        interior = density[200:400].mean()
        for a, b in ((0, 20), (20, 40), (40, 100)):  # first episode, second episode, steps 40-100
            assert 0.5 <= density[a:b].mean() / interior <= 2.0, (name, a, b, density[a:b].mean() / interior)
        if not name.endswith("chains"):  # exact by construction: every step is a target equally often
            assert density.min() == density.max(), name


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
        if not len(states):  # a part cut away entirely at the stream's start
            continue
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
    idx = np.nonzero(ds.sample_layout(np.arange(len(ds)))[0] <= 1)[0]
    idx = idx[idx % ds.n_starts > 100][:8]  # away from the stream's start, where chains are cut
    batch = collate_compressed_batch(ds.__getitems__(idx))
    assert batch["chunks"].shape[1] == int(batch["depth"].max()) <= 1
    assert batch["chunks"].shape[2] == max(1, int(batch["chunk_lengths"].max()))
    assert batch["tokens"].shape[1] == int((batch["target_actions"] != -100).sum(1).max())


def test_stream_spans_never_cross_streams_and_cover_every_stream_whole():
    h = labelled_histories(n_goals=2, n_streams=3, T=300)
    schedule = CompressionSchedule(window=40, chunk=36)
    ds = ADStreamDataset(h, schedule, span_segments=3)
    seg = schedule.segments(300)
    assert ds.n_segments == seg.n_compressions + 1 == 9 and len(ds) == 6 * (9 + 2)
    batch = ds.__getitems__(np.arange(len(ds)))
    states = batch["tokens"][..., STATE].long()
    assert (states // 1000 == states[:, :1] // 1000).all() and ((states % 1000) == torch.arange(300)).all()
    covered = {}
    for b in range(len(ds)):
        stream = int(states[b, 0]) // 1000
        targets = torch.nonzero(batch["target_actions"][b] != -100).squeeze(1)
        first, n = int(batch["first_segment"][b]), int(batch["n_segments"][b])
        assert 1 <= n <= 3 and 0 <= first and first + n <= 9
        # the targets are exactly the tokens of segments first .. first + n - 1
        assert targets.tolist() == list(range(seg.first_target[first], seg.end[first + n - 1]))
        assert (batch["target_actions"][b, targets] == states[b, targets] % 5).all()
        covered.setdefault(stream, []).append(targets)
    for stream, parts in covered.items():  # every step of every stream, each 3 times (uniform)
        assert np.bincount(torch.cat(parts).numpy(), minlength=300).tolist() == [3] * 300


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
        assert first["tokens"].shape == (16, 50, 6)
        seen.append(set(first["index"].tolist()))
    assert not seen[0] & seen[1]


def test_stream_memory_restarts_lie_before_the_span():
    h = labelled_histories(n_goals=2, n_streams=3, T=300)
    ds = ADStreamDataset(h, CompressionSchedule(window=40, chunk=36), span_segments=3, memory_restart=0.5, seed=2)
    batch = ds.__getitems__(np.arange(len(ds)))
    start, first = batch["memory_start"], batch["first_segment"]
    assert ((start >= 0) & (start <= first)).all()
    restarted = first > 0
    assert 0.25 < (start[restarted] > 0).float().mean() < 0.6  # about half of them (a restart may draw 0)
    assert (ADStreamDataset(h, CompressionSchedule(40, 36), 3).__getitems__(np.arange(len(ds)))["memory_start"] == 0).all()
