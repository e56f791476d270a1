"""scripts/probe_latents.py: the revealing events, the distance since they left the raw window, and the probe itself."""
from __future__ import annotations

import numpy as np
import torch

from model import build_model
from scripts.probe_latents import (
    accuracy_by_distance,
    compressions_since,
    fit_probe,
    probe_model,
    probe_predict,
    revealing_tokens,
)
from tests.helpers import compose_cfg, random_histories


def test_revealing_tokens_follow_the_rewarded_step_and_split_key_from_door():
    rewards = np.zeros((1, 8))
    rewards[0, [1, 2, 5, 6]] = 1  # episodes of 4 steps: rewards at steps 1, 2 (episode 0) and 5, 6 (episode 1)
    one_pair = revealing_tokens(rewards, horizon=4, n_pairs=1)[0, :, 0]
    assert one_pair.nonzero()[0].tolist() == [2, 3, 6, 7]  # token t + 1 holds step t's reward
    two = revealing_tokens(rewards, horizon=4, n_pairs=2)[0]
    assert two[:, 0].nonzero()[0].tolist() == [2, 6]  # each episode's first reward: the key
    assert two[:, 1].nonzero()[0].tolist() == [3, 7]  # its second: the door


def test_compressions_since_counts_from_the_chunk_that_took_the_event_into_memory():
    reveals = np.zeros((2, 12), dtype=bool)
    reveals[0, 5] = True  # in chunk 2 (tokens 4-7) of chunks of 4
    chunk_start = np.array([0, 4, 8])
    d = compressions_since(reveals, chunk_start, chunk=4)
    assert d[0].tolist() == [-1, -1, 1, 2]  # L_0, L_1 hold no event; L_2 just took it in; L_3 one compression later
    assert d[1].tolist() == [-1, -1, -1, -1]


def test_accuracy_by_distance_bins_and_none():
    correct = np.array([True, False, True, True])
    dist = np.array([-1, -1, 1, 20])
    out = accuracy_by_distance(correct, dist)
    assert out["none"] == (0.5, 2) and out["1"] == (1.0, 1) and out["17+"] == (1.0, 1) and "2" not in out


def test_the_probe_reads_coordinates_that_features_hold_and_not_those_they_do_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 9, (2000, 2))
    informative = np.concatenate([np.eye(9)[y[:, 0]], np.eye(9)[y[:, 1]], rng.normal(size=(2000, 10))], 1)
    noise = rng.normal(size=(2000, 28))
    for hidden in (0, 32):  # linear and one-hidden-layer probes
        for x, high in ((informative, True), (noise, False)):
            probe = fit_probe(x[:1500], y[:1500], 9, hidden, steps=200)
            acc = (probe_predict(probe, x[1500:]) == y[1500:]).all(1).mean()
            assert (acc > 0.9) if high else (acc < 0.1), (hidden, acc)


def test_probe_model_scores_every_pair_on_held_out_splits():
    cfg = compose_cfg("train", ["experiment=quick", "model=ad_compressed_dr", "model.tf_n_layer=1", "model.encoder_n_layer=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 81, 5).eval()
    train, held = random_histories(n_goals=3, T=200, seed=0), random_histories(n_goals=2, T=200, seed=1)
    for h, goals in ((train, [[1, 2], [3, 4], [5, 6]]), (held, [[1, 4], [3, 2]])):
        h["tasks"] = np.array(goals)
    out = probe_model(model, train, {"val": held}, grid_size=9, max_train_histories=6, held_in_streams=1)
    assert set(out) == {"val", "train_other_streams"}
    r = out["val"]["pair0"]
    assert set(r) == {"cell_accuracy", "chance", "by_distance", "coordinate_accuracy"}
    assert sum(n for _, n in r["by_distance"].values()) == 2 * 2 * len(model.schedule.segments(200).chunk_start)
