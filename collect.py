"""Collect learning histories of the source algorithm on every train, validation and test task.

    python collect.py                       # paper-scale defaults
    python collect.py experiment=quick      # CPU preset
    python collect.py env=dark_key_to_door experiment=quick
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
from env import SPLITS, make_env_spec
from utils.run import exit_on_user_error


def learning_curve(episode_returns: np.ndarray, optimal: np.ndarray) -> np.ndarray:
    """Mean return per episode over all streams / mean optimal return: [n_episodes]."""
    return episode_returns.mean(axis=0) / optimal.mean()


def noise_free_curve(episode_returns: np.ndarray, noise: np.ndarray, optimal: np.ndarray, min_streams: int = 10) -> list:
    """Per episode, the fraction of optimal over the streams whose episode had no noise step: what the source itself
    reaches, apart from the noise injected into its histories. None where fewer than `min_streams` such episodes."""
    n_streams, n_episodes = episode_returns.shape
    clean = ~noise.reshape(n_streams, n_episodes, -1).any(-1)
    out = []
    for e in range(n_episodes):
        rows = clean[:, e]
        out.append(round(float(episode_returns[rows, e].sum() / optimal[rows].sum()), 4) if rows.sum() >= min_streams else None)
    return out


def collect(cfg: DictConfig) -> str:
    path = histories_dir(cfg)
    if (path / "metadata.json").is_file() and not cfg.force:
        print(f"Dataset exists, skipping collection: {path} (force=true regenerates)")
        return str(path)
    if cfg.algorithm.name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm '{cfg.algorithm.name}'. Known: {sorted(ALGORITHMS)}.")
    spec = make_env_spec(cfg.env)
    run_algorithm = ALGORITHMS[cfg.algorithm.name]
    n_streams = int(cfg.algorithm.n_streams_per_task)

    splits, curves, clean, t0 = {}, {}, {}, time.perf_counter()
    for i, split in enumerate(SPLITS):
        tasks = spec.tasks(split)
        stream_tasks = np.repeat(tasks, n_streams, axis=0)
        # each split has its own generator: one split's size never changes another's histories
        seed = int(cfg.algorithm.collect_seed)
        rng = np.random.default_rng([seed, i])
        # noise draws of their own per split (val and test, of equal shape, once had identical noise); the train split
        # keeps the draws it always had, so the training histories are unchanged
        noise_seed = [seed, 7] if split == "train" else [seed, 7, i]
        out = run_algorithm(spec, stream_tasks, cfg.algorithm, rng, env_seed=seed * 3 + i, noise_seed=noise_seed)
        T = out["states"].shape[1]
        splits[split] = {k: out[k].reshape(len(tasks), n_streams, T) for k in ("states", "actions", "rewards", "next_states", "noise")}
        splits[split]["tasks"] = tasks
        optimal = spec.optimal_returns(stream_tasks)
        curves[split] = learning_curve(out["episode_returns"], optimal).round(4).tolist()
        clean[split] = noise_free_curve(out["episode_returns"], out["noise"], optimal)
    seconds = time.perf_counter() - t0
    n_steps = sum(s["states"].size for s in splits.values())

    metadata = {
        "config": histories_key(cfg),
        "tasks": {split: splits[split]["tasks"].tolist() for split in splits},
        "learning_curve": curves,  # mean fraction of optimal return per episode, noise steps included
        "learning_curve_noise_free": clean,  # the same over the episodes without a noise step (null: fewer than 10)
        "n_env_steps": int(n_steps),
        "collect_seconds": round(seconds, 2),
    }
    save_histories(path, splits, metadata)
    print(f"Collected {n_steps:,} env steps in {seconds:.1f} s ({n_steps / seconds / 1e6:.2f}M steps/s) -> {path}")
    for split, curve in curves.items():
        marks = sorted({e for e in (0, 10, 20, 30, 40, 60, 80, 100) if e < len(curve)} | {len(curve) - 1})
        print(f"Source learning curve ({split} tasks, fraction of optimal): " + ", ".join(f"ep{e}={curve[e]:.2f}" for e in marks))
    return str(path)


@hydra.main(version_base=None, config_path="config", config_name="collect")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(collect, cfg)


if __name__ == "__main__":
    main()
