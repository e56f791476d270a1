"""collect.py as a library: saves, skips an existing dataset, detects bad data, names its command."""
from __future__ import annotations

import json
import shutil

import pytest

from collect import collect
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
