"""Shared fixtures: tiny configs composed with Hydra's compose API, a tiny dataset, a script runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sizes small enough for a unit test; every script accepts these overrides
TINY = [
    "experiment=quick",
    "algorithm.n_streams_per_task=2",
    "algorithm.n_episodes=10",
    "eval.n_episodes=3",
    "eval.n_envs_per_task=2",
    "eval.held_out_streams_per_task=1",
]
TINY_TRAIN = {
    "ad_dr": ["model=ad_dr", "model.n_transit=20", "model.train_timesteps=6", "model.train_batch_size=4",
              "model.tf_n_layer=1", "log_interval=2", "eval_interval=0", "save_interval=3"],
    "ad_compressed_dr": ["model=ad_compressed_dr", "model.train_timesteps=6", "model.train_batch_size=4",
                         "model.segments_per_step=2", "model.tf_n_layer=1", "model.encoder_n_layer=1", "log_interval=2",
                         "eval_interval=0", "save_interval=3"],
}


def random_histories(n_goals=2, n_streams=2, T=400, seed=0, n_states=81, n_actions=5):
    """Learning-history arrays of the dataset's layout with random Darkroom-range content (model and data tests)."""
    rng = np.random.default_rng(seed)
    states = rng.integers(0, n_states, (n_goals, n_streams, T))
    return {"states": states, "next_states": rng.integers(0, n_states, states.shape),
            "actions": rng.integers(0, n_actions, states.shape), "rewards": (rng.random(states.shape) < 0.2).astype(np.float32),
            "tasks": np.zeros((n_goals, 2), np.int64), "horizon": 20}


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def run_script(script: str, *overrides: str, cwd: Path = ROOT, env=None, check=True, timeout=300, launcher=None):
    """Run a repo script as a subprocess, as a user would; returns the CompletedProcess."""
    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *overrides]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A collected tiny dataset; returns the overrides that point every script at it."""
    from collect import collect

    root = tmp_path_factory.mktemp("data")
    overrides = TINY + [f"data_root={root / 'datasets'}"]
    collect(compose_cfg("collect", overrides))
    return overrides
