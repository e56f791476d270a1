"""The real scripts end to end at tiny sizes: collect -> pretrain -> train -> evaluate, wrappers, 2 processes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dataset import (
    histories_dir,
)
from model import build_model
from tests.helpers import (
    ROOT,
    TINY,
    TINY_TRAIN,
    compose_cfg,
    run_script,
)

pytestmark = pytest.mark.slow  # subprocess runs of the repo's scripts


def events(run_dir):
    files = sorted(run_dir.glob("events.out.tfevents*"))
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    return files, acc


@pytest.mark.parametrize("model", ["ad_dr", "ad_compressed_dr"])
def test_collect_train_evaluate_end_to_end(tiny_data, tmp_path, model):
    runs = tmp_path / "runs"
    common = tiny_data + [f"run_root={runs}"]
    run_script("collect.py", *common)
    out = run_script("train.py", *common, *TINY_TRAIN[model], "run_name=e2e")
    run_dir = runs / "e2e"
    assert "parameters" in out.stdout
    ckpt = torch.load(run_dir / "checkpoint-final.pt", weights_only=True)
    assert ckpt["global_step"] == 6 and isinstance(ckpt["config"], dict) and ckpt["config"]["env"]["name"] == "darkroom"
    assert (run_dir / "checkpoint-step3.pt").is_file() and (run_dir / "config.yaml").is_file()
    files, acc = events(run_dir)
    assert len(files) == 1
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_action", "train/acc_action", "train/lr", "train/targets_per_step", "eval/mean_reward",
            "eval/fraction_of_optimal_last10", "val/loss_action", "val/loss_action_ep0", "test/fraction_of_optimal_last10",
            "test/loss_action"} <= tags
    if model.startswith("ad_compressed_dr"):
        assert {"eval/n_compressions", "val/memory_value/chunks1", "val/memory_value/all", "train/memory_staleness"} <= tags
        assert ckpt["lanes"]["memory"].shape == (4, 16, 64) and ckpt["lanes"]["n_lanes"] == 4
        assert ckpt["model_config"]["decoder_max_seq_length"] == 16 + 40  # derived, stored
    assert build_model(ckpt["config"]["model"], 81, 5).config == type(build_model(ckpt["config"]["model"], 81, 5).config)(
        **ckpt["model_config"])  # the stored typed config is the one the config group gives
    assert "config" in "".join(acc.Tags()["tensors"])  # hyperparameters as text
    # train.py's final evaluations: validation for choices, test reported
    for split in ("val", "test"):
        result = json.loads((run_dir / "eval" / f"{split}.json").read_text())
        assert result["split"] == split and len(result["tasks"]) == 8 and "held_out" in result

    out = run_script("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "eval.n_episodes=4", "eval.n_envs_per_task=2")
    result = json.loads((run_dir / "eval" / "test.json").read_text())
    assert len(result["tasks"]) == 8 and len(result["returns"]) == 8 and len(result["returns"][0]) == 4
    assert len(result["mean_return_per_episode"]) == 4 and 0 <= result["fraction_of_optimal_last10"] <= 1
    lo, hi = result["fraction_of_optimal_last10_ci95"]
    assert lo <= result["fraction_of_optimal_last10"] <= hi and result["memory"] == "normal"
    assert result["held_out"]["loss_action"] > 0
    assert (run_dir / "eval" / "test.png").stat().st_size > 1000
    assert "fraction of optimal" in out.stdout
    if model.startswith("ad_compressed_dr"):
        assert "n_compressions" in result and result["peak_decoder_length"] <= 56
        for memory in (["memory=clear"], ["memory=transplant"], ["memory=transplant", "donor=same_task"],
                       ["memory=transplant", "donor_permutation=1"], ["memory=truncate"]):
            run_script("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "eval.n_episodes=4", "eval.n_envs_per_task=1",
                       *memory, "split=val")
        names = sorted(p.name for p in (run_dir / "eval").glob("*.json"))
        assert names == ["test.json", "val-memory-clear.json", "val-memory-transplant-other_task0.json",
                         "val-memory-transplant-other_task1.json", "val-memory-transplant-same_task.json",
                         "val-memory-truncate1.json", "val.json"]
        same = json.loads((run_dir / "eval" / "val-memory-transplant-same_task.json").read_text())
        other = json.loads((run_dir / "eval" / "val-memory-transplant-other_task1.json").read_text())
        assert same["memory"] == "transplant" and same["donor"] == "same_task" and same["donor_tasks"] == list(range(8))
        assert other["donor"] == "other_task" and other["donor_permutation"] == 1
        assert sorted(other["donor_tasks"]) == list(range(8)) and all(d != i for i, d in enumerate(other["donor_tasks"]))
        assert json.loads((run_dir / "eval" / "val.json").read_text())["n_episodes"] == 3  # untouched by the memory tests
    else:
        out = run_script("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "memory=clear", check=False)
        assert out.returncode == 1 and "has none" in out.stderr


def test_key_to_door_collect_train_evaluate_end_to_end(tmp_path):
    """env=dark_key_to_door through the real scripts; its checkpoint and dataset are refused by a Darkroom run."""
    data = [f"data_root={tmp_path / 'datasets'}", f"run_root={tmp_path / 'runs'}"]
    tiny = [*TINY, "env=dark_key_to_door", "env.n_train_tasks=6", "env.n_eval_tasks=3"]
    out = run_script("collect.py", *data, *tiny)
    assert "dark_key_to_door" in out.stdout
    for model in ("ad_dr", "ad_compressed_dr"):
        args = [*data, *tiny, *TINY_TRAIN[model], f"run_name={model}"]
        run_script("train.py", *args)
        run_dir = tmp_path / "runs" / model
        ckpt = torch.load(run_dir / "checkpoint-final.pt", weights_only=True)
        assert ckpt["config"]["env"]["name"] == "dark_key_to_door"
        run_script("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "eval.n_episodes=3", "eval.n_envs_per_task=2")
        result = json.loads((run_dir / "eval" / "test.json").read_text())
        assert len(result["tasks"]) == 3 and len(result["tasks"][0]) == 4 and result["env"] == "dark_key_to_door"
        assert result["mean_optimal_return"] == 2.0 and 0 <= result["door_rate"] <= result["key_rate"] <= 1
        # without sizes given, evaluate uses the run's own (a memory test pairs with the run's final evaluation)
        run_script("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "split=val", "name=default-sizes")
        default = json.loads((run_dir / "eval" / "default-sizes.json").read_text())
        assert default["n_envs_per_task"] == ckpt["config"]["eval"]["n_envs_per_task"] == 2
        assert default["n_episodes"] == ckpt["config"]["eval"]["n_episodes"] == 3
        assert compose_cfg("evaluate", ["checkpoint=x"]).eval.n_envs_per_task is None  # null in evaluate.yaml: the run's own
    # a Darkroom run pointed at the Key-to-Door dataset is refused, naming the env
    dktd_data = histories_dir(compose_cfg("collect", [*data, *tiny]))
    out = run_script("train.py", *data, *TINY, *TINY_TRAIN["ad_dr"], f"dataset_path={dktd_data}", "run_name=x", check=False)
    assert out.returncode == 1 and "another env config" in out.stderr and "name" in out.stderr


def test_compiled_training_saves_plain_weights(tiny_data, tmp_path):
    """compile=true trains through torch.compile; checkpoints hold the plain module's keys and evaluate."""
    runs = tmp_path / "runs"
    run_script("train.py", *tiny_data, f"run_root={runs}", *TINY_TRAIN["ad_dr"], "run_name=compiled", "compile=true", timeout=600)
    ckpt = torch.load(runs / "compiled" / "checkpoint-final.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model_state_dict"])
    run_script("evaluate.py", f"checkpoint={runs / 'compiled' / 'checkpoint-final.pt'}", "eval.n_episodes=2", "eval.n_envs_per_task=1")


def test_missing_dataset_names_the_collect_command(tmp_path):
    out = run_script("train.py", f"data_root={tmp_path}", f"run_root={tmp_path / 'runs'}", "experiment=quick", check=False)
    assert out.returncode != 0
    hint = [line for line in out.stderr.splitlines() if "python collect.py" in line]
    assert hint and "experiment=quick" in hint[0] and f"data_root={tmp_path}" in hint[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_missing_checkpoint_names_the_path(tmp_path):
    out = run_script("evaluate.py", f"checkpoint={tmp_path / 'nope.pt'}", check=False)
    assert out.returncode != 0 and "checkpoint not found" in out.stderr and "nope.pt" in out.stderr


def test_existing_run_dir_is_not_overwritten(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    args = [*tiny_data, f"run_root={runs}", *TINY_TRAIN["ad_dr"], "run_name=twice"]
    run_script("train.py", *args)
    before = {p.name: p.stat().st_mtime_ns for p in (runs / "twice").iterdir()}
    out = run_script("train.py", *args, check=False)
    assert out.returncode != 0 and "resume=true" in out.stderr and "run_name" in out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (runs / "twice").iterdir()} == before


@pytest.mark.parametrize("model,port", [("ad_dr", 29517), ("ad_compressed_dr", 29518)])
def test_two_cpu_processes_through_accelerate_launch(tiny_data, tmp_path, model, port):
    """accelerate_config.yaml with 2 processes on CPU: world size 2, disjoint data (AD's windows; CompressedAD's
    lanes, each rank its own histories), one run dir and event file."""
    runs = tmp_path / "runs"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
                "--num_processes", "2", "--main_process_port", str(port)]
    out = run_script("train.py", *tiny_data, f"run_root={runs}", *TINY_TRAIN[model], "run_name=ddp",
                     "log_first_batch=true", launcher=launcher, env={"CUDA_VISIBLE_DEVICES": ""})
    assert "2 process(es)" in out.stdout
    # Two ranks share stdout, so their records can land on one line: find each record, not each line.
    seen = [json.loads(record) for record in re.findall(r"BATCH (\{[^{}]*\})", out.stdout)]
    assert len(seen) >= 2
    by_rank = {}
    for record in seen:
        by_rank.setdefault(record["rank"], set()).update(record["index"])
    assert set(by_rank) == {0, 1} and not by_rank[0] & by_rank[1]
    assert sorted(p.name for p in (runs.iterdir())) == ["ddp"]
    files, _ = events(runs / "ddp")
    assert len(files) == 1
    assert sorted(p.name for p in (runs / "ddp").glob("*.pt")) == ["checkpoint-final.pt", "checkpoint-step3.pt"]


def test_two_stage_wrapper_end_to_end(tiny_data, tmp_path):
    """bash train_two_stage.sh: collect -> stage 1 -> stage 2 with its checkpoint -> evaluation, all tiny."""
    runs = tmp_path / "runs"
    tiny = [*tiny_data, f"run_root={runs}", "training.train_timesteps=4", "model.pretrain_steps=4", "training.train_batch_size=4",
            "model.pretrain_batch_size=4", "model.tf_n_layer=1", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1",
            "model.pretrain_save_interval=2", "model.pretrain_val_streams=1", "log_interval=2", "eval_interval=0",
            "++save_interval=2"]
    proc = subprocess.run(["bash", str(ROOT / "train_two_stage.sh"), "--freeze-encoder", *tiny],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    stage1 = runs / "pretrain-encoder-darkroom-seed0"
    assert sorted(p.name for p in stage1.glob("encoder-*.pt")) == ["encoder-pretrained-final.pt", "encoder-pretrained-step2.pt"]
    assert "Loaded encoder, embed_context and embed_ln" in proc.stdout and "Frozen" in proc.stdout
    ckpt = torch.load(runs / "compressed-ad-darkroom-seed0" / "checkpoint-final.pt", weights_only=True)
    stage1_ckpt = torch.load(stage1 / "encoder-pretrained-final.pt", weights_only=True)
    for k, v in stage1_ckpt["encoder_state_dict"].items():  # frozen through stage 2
        assert torch.equal(ckpt["model_state_dict"][f"encoder.{k}"], v)
    assert (runs / "compressed-ad-darkroom-seed0" / "eval" / "test.json").is_file()
    assert "fraction of optimal" in proc.stdout


def test_failing_stage_stops_the_chain_with_its_exit_code(tmp_path):
    # no dataset and a dataset_path that cannot be written: collect fails, nothing after it runs
    bad = tmp_path / "file"
    bad.write_text("not a directory")
    proc = subprocess.run(["bash", str(ROOT / "train_two_stage.sh"), "experiment=quick", f"dataset_path={bad}/x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pretrain_encoder.py" not in proc.stdout and "Stage failed with exit code" in proc.stderr
