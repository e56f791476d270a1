"""Helpers shared by the test modules (fixtures are in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from env import (
    make_env_spec,
)
from model.tokens import random_tokens as tokens_in_range

ROOT = Path(__file__).resolve().parents[1]


TINY = [
    "experiment=quick",
    "algorithm.n_streams_per_task=2",
    "algorithm.n_episodes_per_stream=10",
    "eval.n_episodes=3",
    "eval.n_envs_per_task=2",
    "eval.held_out_streams_per_task=1",
]


TINY_TRAIN = {
    "ad_dr": ["model=ad_dr", "model.n_transit=20", "training.train_timesteps=6", "training.train_batch_size=4",
              "model.tf_n_layer=1", "log_interval=2", "eval_interval=0", "save_interval=3"],
    "ad_compressed_dr": ["model=ad_compressed_dr", "training.train_timesteps=6", "training.train_batch_size=4",
                         "training.segments_per_step=2", "model.tf_n_layer=1", "model.encoder_n_layer=1", "log_interval=2",
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


def labelled_histories(n_goals=3, n_streams=4, T=200, horizon=20):
    """Histories whose states encode (stream id, time): state = stream_id * 1000 + t."""
    G, S = n_goals, n_streams
    stream_id = np.arange(G * S).reshape(G, S, 1)
    t = np.arange(T).reshape(1, 1, T)
    states = (stream_id * 1000 + t).astype(np.int64)
    return {"states": states, "next_states": states + 1, "actions": (states % 5).astype(np.int8),
            "rewards": np.zeros(states.shape, np.float32), "tasks": np.zeros((G, 2), np.int64), "horizon": horizon}


def darkroom():
    return make_env_spec(compose_cfg("collect", []).env)


N_STATES, N_ACTIONS = 81, 5


def random_tokens(B, T, seed=0):
    return tokens_in_range((B, T), N_STATES, N_ACTIONS, seed)


def compressed_cfg(**over):
    """CompressedAD's architecture group at the quick sizes, smaller still, with `over` merged in."""
    cfg = compose_cfg("train", ["experiment=quick", "model=ad_compressed_dr"]).model
    cfg.merge_with(dict(tf_n_layer=2, encoder_n_layer=1, **over))
    return cfg


def stream_cfg(**over):
    return compressed_cfg(**{"tf_dropout": 0.0, "rollout_compress_length": 36, **over})


def rollout_trace(model, tokens, **memory):
    """Per-step logits of a rollout over `tokens`, and its latents right after every compression."""
    r = model.rollout(len(tokens), use_cache=True, **memory)
    logits, latents = [], []
    for t in range(tokens.shape[1]):
        n = r.n_compressions
        logits.append(r.step(tokens[:, t]))
        if r.n_compressions > n:
            latents.append(r.latents.clone())
    return torch.stack(logits, 1), latents


def run_rollout(model, n_steps, use_cache, n_envs=3):
    """Step a rollout over random tokens; returns it, its logits [n_envs, n_steps, A] and its context length per step
    (the rollout's in-context bytes per step are kept on it as `r.memory`)."""
    from model import rollout_memory_bytes

    r = model.rollout(n_envs, use_cache=use_cache)
    torch.manual_seed(0)
    tokens = random_tokens(n_envs, n_steps, seed=7)
    lengths, logits, r.memory = [], [], []
    for t in range(n_steps):
        logits.append(r.step(tokens[:, t]))
        lengths.append(r.context_length)
        r.memory.append(rollout_memory_bytes(r))
    return r, torch.stack(logits, 1), lengths
