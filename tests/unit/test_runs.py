"""The comparison scripts' helpers (scripts/runs.py): a run or an eval file is reused only when it matches."""
from __future__ import annotations

import json

import pytest
import torch

from evaluation import config_hash
from scripts.runs import composed_config, config_differences, reusable_eval, reuse_run

OVERRIDES = ["experiment=quick", "model=ad_compressed_dr", "seed=1", "run_name=compare-x"]


def fake_run(tmp_path, overrides):
    run_dir = tmp_path / "compare-x"
    (run_dir / "eval").mkdir(parents=True)
    config = {**composed_config("train", overrides), "dataset": "datasets/somewhere"}
    torch.save({"config": config, "model_state_dict": {}}, run_dir / "checkpoint-final.pt")
    return run_dir, config


def test_a_run_is_reused_only_under_the_config_that_made_it(tmp_path):
    assert reuse_run(tmp_path / "none" / "checkpoint-final.pt", "train", OVERRIDES) is False  # not there: train it
    run_dir, _ = fake_run(tmp_path, OVERRIDES)
    ckpt = run_dir / "checkpoint-final.pt"
    assert reuse_run(ckpt, "train", OVERRIDES) is True
    assert reuse_run(ckpt, "train", [*OVERRIDES, "resume=true"]) is True  # run control, not part of the run
    with pytest.raises(SystemExit, match=r"model.train_timesteps': \(2600, 100\)"):
        reuse_run(ckpt, "train", [*OVERRIDES, "model.train_timesteps=100"])
    with pytest.raises(SystemExit, match="seed"):
        reuse_run(ckpt, "train", [o.replace("seed=1", "seed=2") for o in OVERRIDES])
    assert config_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == {"a.c": (2, 3), "d": (None, 4)}


def test_an_eval_file_is_reused_only_for_this_checkpoint_and_these_settings(tmp_path):
    run_dir, config = fake_run(tmp_path, OVERRIDES)
    ckpt = run_dir / "checkpoint-final.pt"
    result = {"run_config_hash": config_hash(config), "memory": "transplant", "donor": "same_task", "n_envs_per_task": 32}
    (run_dir / "eval" / "val-memory-transplant-same_task.json").write_text(json.dumps(result))
    assert reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="same_task")
    assert not reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="other_task")
    assert not reusable_eval(run_dir, "val-memory-clear", ckpt, memory="clear")  # no such file
    stale = {**result, "run_config_hash": config_hash({**config, "seed": 7})}  # made by another run under this name
    (run_dir / "eval" / "val-memory-transplant-same_task.json").write_text(json.dumps(stale))
    assert not reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="same_task")
