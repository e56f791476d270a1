"""Faults, end to end: resume after SIGKILL (1 and 2 processes), atomic writes, refused resumes and configs."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dataset import HistoryLanes, histories_dir
from model.schedule import CompressionSchedule
from scripts.runs import scalars
from tests.helpers import ROOT, TINY_TRAIN, run_script
from utils.errors import UserConfigError
from utils.io import atomic_torch_save, load_checkpoint

pytestmark = pytest.mark.slow  # subprocess runs of the repo's scripts


PRETRAIN = ["model.pretrain_steps=40", "model.pretrain_save_interval=10", "log_interval=5", "eval_interval=0",
            "model.pretrain_batch_size=4", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1", "val_batches=1",
            "model.pretrain_val_streams=1"]


def kill_after(args, marker, timeout=240):
    """Start train.py, SIGKILL it as soon as `marker` exists; returns True if it was killed mid-run."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def train_args(tiny_data, runs, name, model="ad_dr"):
    return [*tiny_data, f"run_root={runs}", *TINY_TRAIN[model], *RESUMABLE, f"run_name={name}"]


RESUMABLE = ["training.train_timesteps=40", "save_interval=10", "log_interval=5", "model.tf_dropout=0.1"]


@pytest.mark.parametrize("model", ["ad_dr", "ad_compressed_dr"])
def test_sigkill_then_resume_equals_uninterrupted(tiny_data, tmp_path, model):
    runs = tmp_path / "runs"
    run_script("train.py", *train_args(tiny_data, runs, "straight", model))
    assert kill_after(train_args(tiny_data, runs, "killed", model), runs / "killed" / "checkpoint-step20.pt")
    assert not (runs / "killed" / "checkpoint-final.pt").exists()
    out = run_script("train.py", *train_args(tiny_data, runs, "killed", model), "resume=true")
    assert "Resuming from" in out.stdout
    a = torch.load(runs / "straight" / "checkpoint-final.pt", weights_only=True)["model_state_dict"]
    b = torch.load(runs / "killed" / "checkpoint-final.pt", weights_only=True)["model_state_dict"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    if model == "ad_compressed_dr":  # the lanes' carried memory resumes too
        lanes = [torch.load(runs / name / "checkpoint-final.pt", weights_only=True)["lanes"] for name in ("straight", "killed")]
        assert torch.allclose(lanes[0]["memory"], lanes[1]["memory"], atol=1e-6)
    s1, v1 = scalars(runs / "straight", "train/loss_action")
    s2, v2 = scalars(runs / "killed", "train/loss_action")
    assert s1.tolist() == s2.tolist() == list(range(5, 41, 5))  # no duplicated or missing points
    assert np.allclose(v1, v2, atol=1e-6)


def test_resume_needs_a_run_and_the_same_model_data_and_seed(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    out = run_script("train.py", *train_args(tiny_data, runs, "none"), "resume=true", check=False)
    assert out.returncode == 1 and "holds no run to resume" in out.stderr
    run_script("train.py", *train_args(tiny_data, runs, "r"))
    out = run_script("train.py", *train_args(tiny_data, runs, "r"), "resume=true", "model.tf_n_embd=32", check=False)
    assert out.returncode == 1 and "model.tf_n_embd" in out.stderr and "Traceback" not in out.stderr
    out = run_script("train.py", *train_args(tiny_data, runs, "r"), "resume=true", "seed=1", check=False)
    assert out.returncode == 1 and "'seed': (0, 1)" in out.stderr
    # another env: its own dataset exists, but the run was trained on Darkroom
    run_script("collect.py", *tiny_data, "env=dark_key_to_door", "env.n_train_tasks=4", "env.n_eval_tasks=2")
    out = run_script("train.py", *train_args(tiny_data, runs, "r"), "resume=true", "env=dark_key_to_door",
                     "env.n_train_tasks=4", "env.n_eval_tasks=2", check=False)
    assert out.returncode == 1 and "env.name" in out.stderr and "dataset" in out.stderr and "Traceback" not in out.stderr
    out = run_script("train.py", *train_args(tiny_data, runs, "r"), "resume=true", "mixed_precision=fp16", check=False)
    assert out.returncode == 1 and "fp16" in out.stderr and "not be exact" in out.stderr
    assert sorted(p.name for p in (runs / "r").glob("*.pt")) == ["checkpoint-final.pt", "checkpoint-step10.pt",
                                                                 "checkpoint-step20.pt", "checkpoint-step30.pt"]


def test_compressed_ad_resume_refuses_another_lane_layout(tiny_data, tmp_path):
    """Lane count, segments per step and recipe are part of the run: a resume that changes them is refused."""
    from tests.helpers import random_histories
    from utils.lanes import lane_layout, restore_lanes
    
    runs = tmp_path / "runs"
    run_script("train.py", *train_args(tiny_data, runs, "c", "ad_compressed_dr"))
    for override in ("training.train_batch_size=8", "training.segments_per_step=1", "training.memory_restart=0.5"):
        out = run_script("train.py", *train_args(tiny_data, runs, "c", "ad_compressed_dr"), "resume=true", override, check=False)
        assert out.returncode == 1 and override.split("=")[0] in out.stderr and "Traceback" not in out.stderr, override
    # the checkpoint's own lane layout is checked too (history length, streams), naming what differs
    lanes = HistoryLanes(random_histories(T=400), CompressionSchedule(40, 36), n_lanes=2, segments_per_step=1)
    state = {**lane_layout(lanes), "memory": torch.zeros(2, 16, 64), "memory_empty": torch.ones(2, dtype=torch.bool)}
    assert restore_lanes(state, lanes, np.arange(1, 2), "ckpt.pt", "cpu")[0].shape == (1, 16, 64)
    with pytest.raises(UserConfigError, match=r"history_length': \(300, 400\)"):
        restore_lanes({**state, "history_length": 300}, lanes, np.arange(2), "ckpt.pt", "cpu")
    with pytest.raises(UserConfigError, match="holds no lane memory"):
        restore_lanes(None, lanes, np.arange(2), "ckpt.pt", "cpu")


def test_kill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint-step1.pt"
    atomic_torch_save({"w": torch.zeros(3)}, path)
    code = ("import sys, torch; from utils.io import atomic_torch_save\n"
            "for i in range(10000): atomic_torch_save({'w': torch.full((2_000_000,), float(i))}, sys.argv[1])")
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w = load_checkpoint(path)["w"]
        assert (w == w[0]).all()  # one complete write, never a mix or a truncation
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["checkpoint-step1.pt"]


@pytest.mark.parametrize("overrides,message", [
    (["model=ad_compressed_dr", "model.n_latent=50", "model.decoder_max_seq_length=56"], "exceeds decoder_max_seq_length"),
    (["model=ad_compressed_dr", "training.segments_per_step=0"], "segments_per_step (0) must be >= 1"),
    (["model=ad_compressed_dr", "training.train_batch_size=0"], "train_batch_size=0 must be a positive multiple"),
    (["model=ad_compressed_dr", "model.rollout_compress_length=41"], "rollout_compress_length (41) must be <="),
    (["model=ad_dr", "env.val_env_ratio=0.0"], "validation tasks"),
    (["model=ad_dr", "training.train_batch_size=0"], "train_batch_size=0 must be a positive multiple"),
    (["model=ad_dr", "model.model=GPT"], "Unknown model 'GPT'"),
    (["model=ad_dr", "env.name=lightroom"], "Unknown env name"),
    (["model=ad_dr", "env.horizon=10"], "another env config"),
    (["model=ad_dr", "+model.pretrained_encoder_path=x.pt"], "apply to CompressedAD only"),
    (["model=ad_compressed_dr", "model.pretrained_encoder_path=nope.pt"],
     "pretrained encoder checkpoint"),
])
def test_bad_config_values_are_refused_before_anything_is_written(tiny_data, tmp_path, overrides, message):
    runs = tmp_path / "runs"
    from tests.helpers import compose_cfg

    path = histories_dir(compose_cfg("collect", tiny_data))
    args = [*tiny_data, f"run_root={runs}", *overrides]
    if "env.horizon=10" in overrides:
        args.append(f"dataset_path={path}")
    out = run_script("train.py", *args, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not runs.exists() or not any(runs.rglob("*.pt"))


def test_pretrain_sigkill_then_resume_equals_uninterrupted(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    args = lambda name: [*tiny_data, f"run_root={runs}", *PRETRAIN, f"run_name={name}"]
    run_script("pretrain_encoder.py", *args("straight"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_encoder.py"), *args("killed")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = runs / "killed" / "training-state-step20.pt"
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_script("pretrain_encoder.py", *args("killed"), "resume=true")
    assert "Resuming from" in out.stdout
    a = torch.load(runs / "straight" / "encoder-pretrained-final.pt", weights_only=True)
    b = torch.load(runs / "killed" / "encoder-pretrained-final.pt", weights_only=True)
    for part in ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict"):
        assert max((a[part][k] - b[part][k]).abs().max().item() for k in a[part]) <= 1e-6
    s1, v1 = scalars(runs / "straight", "pretrain/loss")
    s2, v2 = scalars(runs / "killed", "pretrain/loss")
    assert s1.tolist() == s2.tolist() == list(range(5, 41, 5)) and np.allclose(v1, v2, atol=1e-6)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    args = [*tiny_data, f"run_root={runs}", *TINY_TRAIN["ad_dr"], "training.train_timesteps=20", "save_interval=1",
            "training.lr=1e30", "training.num_warmup_steps=1", "run_name=diverged"]
    out = run_script("train.py", *args, check=False)
    assert out.returncode == 1 and "Loss is" in out.stderr and "at step" in out.stderr and "Traceback" not in out.stderr
    saved = sorted(runs.glob("diverged/checkpoint-step*.pt"))
    assert saved and all(torch.isfinite(v).all() for p in saved[:1] for v in load_checkpoint(p)["model_state_dict"].values())


@pytest.mark.parametrize("model,port", [("ad_dr", 29519), ("ad_compressed_dr", 29520)])
def test_two_process_run_resumes_exactly(tiny_data, tmp_path, model, port):
    """2 CPU processes through accelerate launch: resuming from an earlier checkpoint (later ones removed,
    as after a kill) ends with the weights of the uninterrupted 2-process run (CompressedAD: and the lanes'
    carried memory, gathered from both ranks)."""
    runs = tmp_path / "runs"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
                "--num_processes", "2", "--main_process_port", str(port)]
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for name in ("straight", "cut"):
        run_script("train.py", *train_args(tiny_data, runs, name, model), launcher=launcher, env=env)
    for later in ("checkpoint-final.pt", "checkpoint-step40.pt", "checkpoint-step30.pt"):
        (runs / "cut" / later).unlink(missing_ok=True)
    out = run_script("train.py", *train_args(tiny_data, runs, "cut", model), "resume=true", launcher=launcher, env=env)
    assert "Resuming from" in out.stdout and "step 20" in out.stdout and "2 process(es)" in out.stdout
    a = torch.load(runs / "straight" / "checkpoint-final.pt", weights_only=True)
    b = torch.load(runs / "cut" / "checkpoint-final.pt", weights_only=True)
    assert len(b["rng_states"]) == 2
    assert max((a["model_state_dict"][k] - b["model_state_dict"][k]).abs().max().item() for k in a["model_state_dict"]) <= 1e-6
    if model == "ad_compressed_dr":
        assert a["lanes"]["memory"].shape[0] == 4 and torch.allclose(a["lanes"]["memory"], b["lanes"]["memory"], atol=1e-6)
        assert torch.equal(a["lanes"]["memory_empty"], b["lanes"]["memory_empty"])
    s1, v1 = scalars(runs / "straight", "train/loss_action")
    s2, v2 = scalars(runs / "cut", "train/loss_action")
    assert s1.tolist() == s2.tolist() and np.allclose(v1, v2, atol=1e-6)
