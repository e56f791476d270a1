"""In-context evaluation: run a trained model on held-out goals for many consecutive episodes.

    python evaluate.py checkpoint=runs/ad-darkroom-seed0/checkpoint-final.pt n_episodes=100

The model starts with an empty context and keeps its context across episodes, sampling actions.
Every held-out goal is run `n_envs_per_goal` times in one batch. Writes `eval/<split>.json` and
`eval/<split>.png` (mean return per episode against the optimal return and the source algorithm)
into the checkpoint's run directory.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from env import BatchedDarkroom, DarkroomSpec, make_env_spec
from model import build_model
from utils.io import atomic_write_json, load_checkpoint
from utils.run import exit_on_user_error


def sample_actions(logits: torch.Tensor, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling from softmax(logits) with given uniforms: reproducible across code paths."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1).cpu().numpy()
    return np.minimum((cdf < uniform[:, None]).sum(-1), logits.shape[-1] - 1)


@torch.no_grad()
def run_in_context(model, spec: DarkroomSpec, goals: np.ndarray, n_episodes: int, n_envs_per_goal: int,
                   seed: int, use_cache: bool = True, device="cpu") -> dict:
    """Roll `model` out for `n_episodes` episodes on every goal; returns returns [goals, repeats, episodes] + stats."""
    was_training = model.training
    model.eval()
    env = BatchedDarkroom(np.repeat(goals, n_envs_per_goal, axis=0), spec.grid_size, spec.horizon)
    context = model.rollout(env.n_envs, use_cache=use_cache)
    rng = np.random.default_rng(seed)
    returns = np.zeros((env.n_envs, n_episodes), dtype=np.float32)
    # the token's previous-transition fields are -1 before the first step (see model/tokens.py)
    token = np.full((env.n_envs, 5), -1.0, dtype=np.float32)
    token[:, 2] = 0.0
    t0 = time.perf_counter()
    for episode in range(n_episodes):
        states = env.reset()
        done = False
        while not done:
            token[:, 4] = states
            logits = context.step(torch.from_numpy(token.copy()).to(device))  # the context keeps it: no aliasing
            actions = sample_actions(logits, rng.random(env.n_envs))
            next_states, rewards, done = env.step(actions)
            returns[:, episode] += rewards
            token[:, 0], token[:, 1], token[:, 2], token[:, 3] = states, actions, rewards, next_states
            states = next_states
    seconds = time.perf_counter() - t0
    model.train(was_training)
    stats = context.stats() if hasattr(context, "stats") else {}
    return {
        "returns": returns.reshape(len(goals), n_envs_per_goal, n_episodes),
        "seconds": seconds,
        "seconds_per_env_step": seconds / (n_episodes * spec.horizon),
        **stats,
    }


def episodes_to_fraction(curve: np.ndarray, fraction: float) -> int | None:
    """First episode whose fraction of optimal (smoothed over 5 episodes) reaches `fraction`."""
    smoothed = np.convolve(curve, np.ones(5) / 5, mode="valid") if len(curve) >= 5 else curve
    hits = np.nonzero(smoothed >= fraction)[0]
    return int(hits[0]) if len(hits) else None


def miss_rate_after_first_success(returns: np.ndarray) -> float | None:
    """Share of the episodes after a rollout's first rewarded episode that earned nothing: how often a
    goal once found is lost again (memory failures show here, exploration failures do not)."""
    found = np.cumsum(returns > 0, axis=-1) > 0
    after = found & np.concatenate([np.zeros_like(found[..., :1]), found[..., :-1]], axis=-1)  # strictly after
    return float((returns[after] == 0).mean()) if after.any() else None


def summarize(goals: np.ndarray, spec: DarkroomSpec, rollout: dict) -> dict:
    """The eval JSON: per-goal returns, per-episode curve, fraction of optimal and its spread."""
    returns = rollout["returns"]  # [goals, repeats, episodes]
    optimal = spec.optimal_returns(goals)
    mean_per_episode = returns.mean(axis=(0, 1))
    fraction_per_episode = mean_per_episode / optimal.mean()
    last = min(10, returns.shape[-1])
    # spread over repeats: each repeat index runs every goal once
    per_repeat_last10 = returns[..., -last:].mean(axis=(0, 2)) / optimal.mean()
    out = {
        "split": None,
        "goals": goals.tolist(),
        "optimal_return": optimal.tolist(),
        "n_episodes": int(returns.shape[-1]),
        "n_envs_per_goal": int(returns.shape[1]),
        "returns": returns.mean(axis=1).round(4).tolist(),
        "mean_return_per_episode": mean_per_episode.round(4).tolist(),
        "fraction_of_optimal_per_episode": fraction_per_episode.round(4).tolist(),
        "fraction_of_optimal_first10": float(fraction_per_episode[:last].mean()),
        "fraction_of_optimal_last10": float(fraction_per_episode[-last:].mean()),
        "fraction_of_optimal_last10_stderr": float(per_repeat_last10.std(ddof=1) / np.sqrt(len(per_repeat_last10)))
        if len(per_repeat_last10) > 1 else None,
        "area_under_curve": float(fraction_per_episode.mean()),
        "episodes_to_80pct": episodes_to_fraction(fraction_per_episode, 0.8),
        "miss_rate_after_first_success": miss_rate_after_first_success(returns),
        "seconds": round(rollout["seconds"], 2),
        "seconds_per_env_step": rollout["seconds_per_env_step"],
    }
    out.update({k: v for k, v in rollout.items() if k not in ("returns", "seconds", "seconds_per_env_step")})
    return out


def plot_curve(result: dict, source_curve: list | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimal = float(np.mean(result["optimal_return"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["mean_return_per_episode"], label="model (in context)")
    if source_curve:
        ax.plot(np.asarray(source_curve) * optimal, label="source algorithm (same goals)", alpha=0.7)
    ax.axhline(optimal, color="k", linestyle="--", label="optimal")
    ax.set_xlabel("episode in context")
    ax.set_ylabel("mean return")
    ax.set_title(f"{result['split']} goals: last-10 fraction of optimal {result['fraction_of_optimal_last10']:.3f}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def source_curve_for(run_cfg: dict, split: str) -> list | None:
    """The source algorithm's learning curve on the same goals, if the dataset is on disk."""
    from dataset import DatasetError, load_metadata

    try:
        return load_metadata(OmegaConf.create(run_cfg))["learning_curve"][split]
    except (DatasetError, KeyError, OSError):
        return None


def write_results(result: dict, run_dir: Path, split: str, source_curve) -> Path:
    result["split"] = split
    out = Path(run_dir) / "eval" / f"{split}.json"
    atomic_write_json(result, out)
    plot_curve(result, source_curve, out.with_suffix(".png"))
    return out


def evaluate(cfg: DictConfig) -> dict:
    ckpt = load_checkpoint(cfg.checkpoint, "checkpoint", required_keys=("model_state_dict", "config"))
    run_cfg = ckpt["config"]
    spec = make_env_spec(run_cfg["env"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(run_cfg["model"], spec.n_states, spec.n_actions)
    model.load_state_dict(ckpt["model_state_dict"])
    model.to(device)
    goals = spec.goals(cfg.split)
    rollout = run_in_context(model, spec, goals, cfg.n_episodes, cfg.n_envs_per_goal, cfg.eval.seed, cfg.use_cache, device)
    result = summarize(goals, spec, rollout)
    result["checkpoint"], result["global_step"] = str(cfg.checkpoint), int(ckpt.get("global_step", -1))
    run_dir = Path(cfg.output_dir) if cfg.get("output_dir") else Path(cfg.checkpoint).parent
    out = write_results(result, run_dir, cfg.split, source_curve_for(run_cfg, cfg.split))
    print(
        f"{cfg.split} goals ({len(goals)} x {cfg.n_envs_per_goal} envs, {cfg.n_episodes} episodes): "
        f"fraction of optimal first10 {result['fraction_of_optimal_first10']:.3f} -> last10 "
        f"{result['fraction_of_optimal_last10']:.3f} (+-{result['fraction_of_optimal_last10_stderr'] or 0:.3f} s.e.), "
        f"80% at episode {result['episodes_to_80pct']}, {result['seconds']:.1f} s -> {out}"
    )
    return result


@hydra.main(version_base=None, config_path="config", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate, cfg)


if __name__ == "__main__":
    main()
