"""collect.py as a library: saves, skips an existing dataset, detects bad data, names its command."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from algorithm.q_learning import run_q_learning
from collect import collect, noise_free_curve
from dataset import (
    histories_dir,
    load_histories,
)
from env import (
    make_env_spec,
)
from tests.helpers import TINY, compose_cfg
from utils.errors import DatasetError


def test_collect_saves_skips_and_detects_bad_data(tmp_path, capsys):
    cfg = compose_cfg("collect", TINY + [f"data_root={tmp_path}"])
    path = histories_dir(cfg)
    collect(cfg)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["config"]["env"]["grid_size"] == 9 and len(meta["learning_curve"]["train"]) == 10
    train = load_histories(cfg, "train")
    assert train["states"].shape == (65, 2, 200) and train["tasks"].shape == (65, 2) and train["horizon"] == 20
    assert load_histories(cfg, "test")["states"].shape == (8, 2, 200)
    assert (load_histories(cfg, "val")["tasks"] == make_env_spec(cfg.env).tasks("val")).all()

    stamp = (path / "train.npz").stat().st_mtime_ns
    collect(cfg)
    assert "skipping collection" in capsys.readouterr().out
    assert (path / "train.npz").stat().st_mtime_ns == stamp

    # a different algorithm config gets a different directory
    other = compose_cfg("collect", TINY + [f"data_root={tmp_path}", "algorithm.q_init=5.0"])
    assert histories_dir(other) != path

    # an interrupted collection (no metadata.json) is never used
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "metadata.json").unlink()
    with pytest.raises(DatasetError, match="(?s)incomplete.*python collect.py"):
        load_histories(compose_cfg("collect", TINY + [f"dataset_path={broken}"]), "train")

    # a dataset made for another env config is refused with the differing keys
    with pytest.raises(DatasetError, match="(?s)another env config.*horizon"):
        load_histories(compose_cfg("collect", TINY + [f"dataset_path={path}", "env.horizon=10"]), "train")

    # a truncated file is detected
    (path / "test.npz").write_bytes((path / "test.npz").read_bytes()[:1000])
    with pytest.raises(DatasetError, match="truncated"):
        load_histories(cfg, "test")


def test_missing_dataset_names_the_command(tmp_path):
    cfg = compose_cfg("collect", TINY + [f"data_root={tmp_path}"])
    with pytest.raises(DatasetError, match="does not exist. Make it with:\n    python collect.py"):
        load_histories(cfg, "train")


def test_each_split_has_its_own_noise_and_the_training_histories_keep_theirs(tmp_path):
    cfg = compose_cfg("collect", TINY + [f"data_root={tmp_path}", "algorithm.n_episodes_per_stream=30", "algorithm.noise_after_episodes=0"])
    collect(cfg)
    val, test = load_histories(cfg, "val"), load_histories(cfg, "test")
    assert val["noise"].shape == test["noise"].shape and val["noise"].any()
    assert not np.array_equal(val["noise"], test["noise"])  # once they were identical, draw for draw
    meta = json.loads((histories_dir(cfg) / "metadata.json").read_text())
    assert set(meta["learning_curve_noise_free"]) == {"train", "val", "test"} and len(meta["learning_curve_noise_free"]["val"]) == 30
    # the train split is drawn as it always was: the default noise seed of the source algorithm
    spec = make_env_spec(cfg.env)
    tasks = np.repeat(spec.tasks("train"), 2, axis=0)
    seed = cfg.algorithm.collect_seed
    old = run_q_learning(spec, tasks, cfg.algorithm, np.random.default_rng([seed, 0]), env_seed=seed * 3)
    assert np.array_equal(load_histories(cfg, "train")["noise"], old["noise"].reshape(65, 2, -1))


def test_the_noise_free_source_curve_counts_only_episodes_without_a_noise_step():
    returns = np.array([[1.0, 2.0]] * 10 + [[0.0, 0.0]] * 10)  # 20 streams, 2 episodes
    noise = np.zeros((20, 2 * 3), bool)  # horizon 3
    noise[10:, 0] = True  # the last 10 streams' first episodes have a noise step
    curve = noise_free_curve(returns, noise, np.full(20, 2.0))
    assert curve == [0.5, 0.5]  # episode 0: the 10 clean streams only; episode 1: all 20
    noise[5:10, 4] = True  # episode 1 now keeps 15 streams; episode 0 keeps 10
    assert noise_free_curve(returns, noise, np.full(20, 2.0)) == [0.5, round(10 / 30, 4)]
    assert noise_free_curve(returns, noise, np.full(20, 2.0), min_streams=11)[0] is None
