import json
import shutil

import numpy as np
import pytest

from algorithm.q_learning import greedy_random_tiebreak, run_q_learning
from collect import collect
from dataset import DatasetError, histories_dir, load_histories
from env import optimal_return, split_goals
from tests.conftest import TINY, compose_cfg

SOURCE = dict(n_episodes=40, gamma=0.9, alpha=1.0, q_init=6.0, epsilon_start=0.1, epsilon_end=0.0,
              epsilon_decay_episodes=40, n_replay_sweeps=3)


def test_source_learning_curve_rises():
    train, _ = split_goals(9, 0.9, 0)
    goals = np.repeat(train, 4, axis=0)
    out = run_q_learning(goals, 9, 20, SOURCE, np.random.default_rng(0))
    optimal = np.array([optimal_return(g, 9, 20) for g in goals]).mean()
    curve = out["episode_returns"].mean(0) / optimal
    assert curve[:3].mean() < 0.2  # starts near random
    assert curve[-5:].mean() > 0.85  # and learns
    assert out["states"].shape == (len(goals), 40 * 20)


def test_next_state_equals_following_state_within_episodes():
    goals = np.array([[0, 0], [8, 8], [4, 4]])
    out = run_q_learning(goals, 9, 20, SOURCE, np.random.default_rng(1))
    s = out["states"].reshape(3, 40, 20)
    s2 = out["next_states"].reshape(3, 40, 20)
    assert (s2[:, :, :-1] == s[:, :, 1:]).all()
    assert (s[:, :, 0] == 4 * 9 + 4).all()  # every episode starts at the centre


def test_tiebreak_is_uniform_among_maxima():
    q = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]] * 3000)
    picks = greedy_random_tiebreak(q, np.random.default_rng(0))
    counts = np.bincount(picks, minlength=5)
    assert counts[0] == counts[3] == 0 and counts[[1, 2, 4]].min() > 900


def test_collect_saves_skips_and_detects_bad_data(tmp_path, capsys):
    cfg = compose_cfg("collect", TINY + [f"data_root={tmp_path}"])
    path = histories_dir(cfg)
    collect(cfg)
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["config"]["env"]["grid_size"] == 9 and len(meta["learning_curve"]["train"]) == 10
    train = load_histories(cfg, "train")
    assert train["states"].shape == (73, 2, 200) and train["goals"].shape == (73, 2)
    assert load_histories(cfg, "test")["states"].shape == (8, 2, 200)

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
