"""Collect learning histories of the source RL algorithm on every train and held-out goal.

    python collect.py                       # paper-scale defaults
    python collect.py experiment=quick      # CPU preset
    python collect.py force=true            # regenerate

Skips the work when a complete dataset with the same env + algorithm config exists.
"""
from __future__ import annotations

import time

import hydra
import numpy as np
from omegaconf import DictConfig

from algorithm import ALGORITHMS
from dataset import histories_dir, histories_key, save_histories
from env import make_env_spec
from utils.run import exit_on_user_error


def learning_curve(episode_returns: np.ndarray, optimal: np.ndarray) -> np.ndarray:
    """Mean return per episode over all streams / mean optimal return: [n_episodes]."""
    return episode_returns.mean(axis=0) / optimal.mean()


def collect(cfg: DictConfig) -> str:
    path = histories_dir(cfg)
    if (path / "metadata.json").is_file() and not cfg.force:
        print(f"Dataset exists, skipping collection: {path} (force=true regenerates)")
        return str(path)
    if cfg.algorithm.name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm '{cfg.algorithm.name}'. Known: {sorted(ALGORITHMS)}.")
    spec = make_env_spec(cfg.env)
    run_algorithm = ALGORITHMS[cfg.algorithm.name]
    rng = np.random.default_rng(cfg.algorithm.collect_seed)
    n_streams = int(cfg.algorithm.n_streams_per_goal)

    splits, curves, t0 = {}, {}, time.perf_counter()
    for split in ("train", "test"):
        goals = spec.goals(split)
        stream_goals = np.repeat(goals, n_streams, axis=0)
        out = run_algorithm(stream_goals, spec.grid_size, spec.horizon, cfg.algorithm, rng)
        T = out["states"].shape[1]
        splits[split] = {k: out[k].reshape(len(goals), n_streams, T) for k in ("states", "actions", "rewards", "next_states")}
        splits[split]["goals"] = goals
        curves[split] = learning_curve(out["episode_returns"], spec.optimal_returns(stream_goals)).round(4).tolist()
    seconds = time.perf_counter() - t0
    n_steps = sum(s["states"].size for s in splits.values())

    metadata = {
        "config": histories_key(cfg),
        "goals": {split: splits[split]["goals"].tolist() for split in splits},
        "learning_curve": curves,  # mean fraction of optimal return per episode
        "n_env_steps": int(n_steps),
        "collect_seconds": round(seconds, 2),
    }
    save_histories(path, splits, metadata)
    curve = curves["train"]
    marks = [e for e in (0, 10, 20, 30, 40, 50) if e < len(curve)] + [len(curve) - 1]
    print(f"Collected {n_steps:,} env steps in {seconds:.1f} s ({n_steps / seconds / 1e6:.2f}M steps/s) -> {path}")
    print("Source learning curve (train goals, fraction of optimal): " + ", ".join(f"ep{e}={curve[e]:.2f}" for e in marks))
    print("Source learning curve (test goals):                        " + ", ".join(f"ep{e}={curves['test'][e]:.2f}" for e in marks))
    return str(path)


@hydra.main(version_base=None, config_path="config", config_name="collect")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(collect, cfg)


if __name__ == "__main__":
    main()
