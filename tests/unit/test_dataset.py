"""Stage-2 data (dataset.py): tokens, AD windows, CompressedAD's history lanes, hashing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dataset import ADDataset, HistoryLanes, collate_batched, stream_tokens
from model.schedule import CompressionSchedule
from model.tokens import NEW_EPISODE, PREV_ACTION, STATE, TokenStream, build_tokens
from tests.helpers import labelled_histories
from utils.hashing import hashed_ints


def ad_target_density(ds, T: int) -> np.ndarray:
    """How often each stream position is a target, over every sample of the dataset (stream 0 only)."""
    batch = ds.__getitems__(np.arange(ds.n_starts))  # the samples of stream 0
    t = batch["tokens"][..., STATE].long() % 1000
    return np.bincount(t[batch["target_actions"] != -100].numpy(), minlength=T)


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


def test_steps_after_the_done_phase_are_context_but_never_targets():
    """Key-to-Door: once the door paid, no action changes the return; those steps are context only."""
    h = labelled_histories(T=40, horizon=20)
    h["rewards"][..., 3] = h["rewards"][..., 7] = 1.0  # key at step 3, door at step 7 of the first episode
    h["done_phase"] = 2
    tokens, targets = stream_tokens(h)
    assert (targets[:, :8] >= 0).all() and (targets[:, 8:20] == -100).all()  # from the step after the door
    assert (targets[:, 20:] >= 0).all()  # the next episode seeks the key again
    assert (tokens[:, 9:20, PREV_ACTION] >= 0).all()  # and the done steps stay in the context
    h["done_phase"] = None
    assert (stream_tokens(h)[1] >= 0).all()  # Darkroom: every step is a target


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


def test_ad_target_density_is_uniform_over_the_stream():
    """The first episodes (where first10 and episodes-to-80% are measured) train as often as the interior."""
    density = ad_target_density(ADDataset(labelled_histories(n_goals=1, n_streams=1, T=600), n_transit=100), 600)
    assert density.min() == density.max()


@pytest.mark.parametrize("segments_per_step", [None, 1, 3])
def test_lanes_read_whole_streams_in_order_and_every_step_once_per_epoch(segments_per_step):
    h = labelled_histories(n_goals=2, n_streams=3, T=300)  # 6 streams of 9 segments (window 40, chunk 36)
    lanes = HistoryLanes(h, CompressionSchedule(window=40, chunk=36), n_lanes=3, segments_per_step=segments_per_step, seed=1)
    assert lanes.n_segments == 9 and lanes.whole_histories == (segments_per_step is None)
    S = lanes.segments_per_step
    batch = lanes.batch(0, np.arange(3))
    assert batch["windows"].shape == (3, S, 40, 6) and batch["chunks"].shape == (3, S, 36, 6)
    assert batch["target_actions"].shape == (3 * S, 40)
    # windows: consecutive steps of one stream; targets: that step's action, only on the segment's own steps
    states = batch["windows"][..., STATE].long().flatten(0, 1)
    valid = batch["target_actions"] != -100
    assert (states // 1000 == states[:, :1] // 1000).all()
    assert (batch["target_actions"][valid] == states[valid] % 5).all()
    # the chunk of segment k >= 1 is the 36 steps that end where its window's first surviving token begins
    k = lanes.position(0, np.arange(3))[1].flatten()
    chunk_t = batch["chunks"][..., STATE].long().flatten(0, 1) % 1000
    compressed = k >= 1
    assert (chunk_t[compressed] == (torch.as_tensor(k[compressed]) - 1)[:, None] * 36 + torch.arange(36)).all()
    assert batch["memory_reset"].flatten().tolist() == (k == 0).tolist()
    # every lane reads histories segment after segment; over whole epochs every step of every stream is a
    # target equally often (a lane's first history starts staggered, so it counts from the second on)
    n_steps = 4 * 6 * 9 // (3 * S) + 9
    order = [lanes.position(step, np.arange(3)) for step in range(n_steps)]
    j = np.concatenate([o[0] for o in order], axis=1)  # [lanes, steps * S]
    seg = np.concatenate([o[1] for o in order], axis=1)
    for lane in range(3):
        new = np.nonzero(np.diff(j[lane]))[0] + 1
        assert (seg[lane, new] == 0).all() and (np.diff(seg[lane])[np.diff(j[lane]) == 0] == 1).all()
    picked = []  # histories 6 .. 23: epochs 1-3, every stream three times (the staggered first ones are in epoch 0)
    for step in range(n_steps):
        batch = lanes.batch(step, np.arange(3))
        history = lanes.position(step, np.arange(3))[0].flatten()
        states = batch["windows"][..., STATE].long().flatten(0, 1)
        valid = (batch["target_actions"] != -100) & torch.from_numpy((history >= 6) & (history < 24))[:, None]
        picked.append(states[valid])
    counts = np.bincount(torch.cat(picked).numpy(), minlength=6000).reshape(6, 1000)[:, :300]
    assert counts.min() == counts.max() == 3


def test_lanes_are_a_function_of_the_step_and_ranks_read_disjoint_histories():
    h = labelled_histories(n_goals=4, n_streams=4, T=300)
    lanes = HistoryLanes(h, CompressionSchedule(window=40, chunk=36), n_lanes=8, segments_per_step=1, seed=0)
    a, b = lanes.batch(17, np.arange(8)), lanes.batch(17, np.arange(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lanes.position(0, np.arange(8))[1].flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # staggered depths
    read = [set(), set()]  # rank 0 owns lanes 0-3, rank 1 lanes 4-7: every history is read by one lane of one rank
    for step in range(0, 60):
        for r in range(2):
            read[r] |= set(lanes.position(step, np.arange(r * 4, r * 4 + 4))[0].flatten().tolist())
    assert not read[0] & read[1] and len(read[0] | read[1]) > 16  # more than an epoch
    epoch0 = [lanes.batch(0, np.arange(r * 4, r * 4 + 4))["index"] // lanes.n_segments for r in range(2)]
    assert not set(epoch0[0].flatten().tolist()) & set(epoch0[1].flatten().tolist())  # within an epoch: other streams
    other = HistoryLanes(h, CompressionSchedule(window=40, chunk=36), n_lanes=8, segments_per_step=1, seed=1)
    assert not torch.equal(other.batch(30, np.arange(8))["index"], a["index"])  # the seed draws the order


def test_memory_restarts_are_drawn_per_segment_and_carried_names_the_last_one():
    h = labelled_histories(n_goals=4, n_streams=4, T=600)
    lanes = HistoryLanes(h, CompressionSchedule(window=40, chunk=36), n_lanes=8, segments_per_step=2, seed=0, memory_restart=0.3)
    resets, ks = [], []
    for step in range(100):
        b = lanes.batch(step, np.arange(8))
        resets.append(b["memory_reset"].numpy())
        ks.append(lanes.position(step, np.arange(8))[1])
    reset, k = np.concatenate(resets, 1), np.concatenate(ks, 1)
    assert reset[k == 0].all() and 0.2 < reset[k > 0].mean() < 0.4
    for step in (5, 37, 80):  # the carried memory is L_{k0 - 1} begun at the last reset at or before it
        stream, kc, start = lanes.carried(step, np.arange(8))
        first = lanes.position(step, np.arange(8))[1][:, 0]
        assert (kc == np.maximum(first - 1, 0)).all()
        col = step * 2 - 1  # the segment just before this step
        for lane in range(8):
            if first[lane] >= 1:
                history = k[lane, : col + 1]
                begun = np.nonzero(reset[lane, : col + 1] & (np.cumsum(history == 0) == np.cumsum(history == 0)[-1]))[0]
                assert start[lane] == k[lane, begun[-1]]
    assert (HistoryLanes(h, CompressionSchedule(40, 36), 8, 2).batch(3, np.arange(8))["memory_reset"].numpy()
            == (lanes.position(3, np.arange(8))[1] == 0)).all()


def test_hashed_ints_cover_range():
    x = hashed_ints(np.arange(10000), 5, 2, 6)
    with pytest.raises(ValueError, match="low <= high"):
        hashed_ints(np.arange(3), 5, 6, 2)
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


def test_the_dataset_hash_covers_what_shapes_the_histories_and_nothing_else():
    from dataset import histories_dir
    from tests.helpers import compose_cfg

    base = histories_dir(compose_cfg("collect", ["experiment=quick"]))
    assert histories_dir(compose_cfg("collect", ["experiment=quick", "force=true", "seed=3"])) == base
    assert histories_dir(compose_cfg("collect", ["experiment=quick", "algorithm.noise_prob=0.2"])) != base
    assert histories_dir(compose_cfg("collect", ["experiment=quick", "env.horizon=30"])) != base
