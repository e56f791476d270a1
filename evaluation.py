"""In-context evaluation as a library (train.py's periodic evaluations and evaluate.py use it): rollouts on held-out
tasks for many consecutive episodes, their summary against the optimal return, the held-out action loss with
CompressedAD's memory value curve, and the result files.

The model starts with an empty context and keeps its context across episodes, sampling actions. Every task is run
`n_envs_per_task` times in one batch, on the same starts and action-sampling draws for every model.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from env import GridTaskSpec
from model.tokens import NO_TARGET, TokenStream, episode_phase
from utils.errors import DatasetError, UserConfigError
from utils.io import atomic_write_json

N_BOOTSTRAP = 2000
MEMORY_VALUE_CHUNKS = (0, 1, 2, 4, 8)  # compressed chunks kept before each target; plus all of them


def sample_actions(logits: torch.Tensor, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling from softmax(logits) with given uniforms: reproducible across code paths."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1).cpu().numpy()
    return np.minimum((cdf < uniform[:, None]).sum(-1), logits.shape[-1] - 1)


DONORS = ("same_task", "other_task")


def donor_tasks(n_tasks: int, donor: str, permutation: int = 0) -> np.ndarray:
    """For memory=transplant: the index of the task whose rollout lends each task its latents. `same_task`: the task
    itself (another repeat: other starts and action draws; costs ~nothing if the latents hold task content and
    progress); `other_task`: a random derangement of the tasks, one per `permutation` (average several: the cost of
    one fixed donor order depends on how far its pairs are apart)."""
    if donor not in DONORS:
        raise UserConfigError(f"donor={donor} is not one of {DONORS}.")
    if donor == "same_task":
        return np.arange(n_tasks)
    if n_tasks < 2:
        raise UserConfigError("donor=other_task needs at least 2 tasks: the latents come from a rollout on another task.")
    rng = np.random.default_rng([permutation, 2])
    while True:
        order = rng.permutation(n_tasks)
        if (order != np.arange(n_tasks)).all():
            return order


@torch.no_grad()
def run_in_context(model, spec: GridTaskSpec, tasks: np.ndarray, n_episodes: int, n_envs_per_task: int, seed: int,
                   use_cache: bool = True, device="cpu", memory: str = "normal", memory_chunks: int = 1,
                   donor: str = "other_task", donor_permutation: int = 0) -> dict:
    """Roll `model` out for `n_episodes` episodes on every task; returns returns [tasks, repeats, episodes] + stats.

    Starts and action-sampling draws depend on `seed` and the env's index only. `memory=transplant` adds one donor
    env per env, run normally on the task `donor_tasks` names, with its own starts and draws, whose latents the env
    receives after every compression.
    """
    if memory != "normal" and not hasattr(model, "encoder"):
        raise UserConfigError(f"memory={memory} tests a compressed memory; {type(model).__name__} has none (use memory=normal).")
    was_training = model.training
    model.eval()
    env_tasks = np.repeat(tasks, n_envs_per_task, axis=0)
    n = len(env_tasks)
    options = {}
    if memory != "normal":
        options = {"memory": memory, "memory_chunks": memory_chunks}
    donors = None
    if memory == "transplant":  # donor envs n .. 2n - 1, run normally; env i receives donor n + i's latents
        donors = donor_tasks(len(tasks), donor, donor_permutation)
        env_tasks = np.concatenate([env_tasks, np.repeat(tasks[donors], n_envs_per_task, axis=0)])
        options["donor"] = np.concatenate([np.arange(n, 2 * n), np.arange(n, 2 * n)])  # donors keep their own
    env = spec.batched(env_tasks, seed=seed)
    context = model.rollout(len(env_tasks), use_cache=use_cache, **options)
    rng, donor_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    returns = np.zeros((len(env_tasks), n_episodes), dtype=np.float32)
    tokens = TokenStream(len(env_tasks))
    t0 = time.perf_counter()
    for episode in range(n_episodes):
        states, done, first = env.reset(), False, True
        while not done:
            logits = context.step(torch.from_numpy(tokens.query(states, first)).to(device))
            uniform = rng.random(n)
            if len(env_tasks) > n:
                uniform = np.concatenate([uniform, donor_rng.random(len(env_tasks) - n)])
            actions = sample_actions(logits, uniform)
            next_states, rewards, done = env.step(actions)
            returns[:, episode] += rewards
            tokens.record(states, actions, rewards, next_states)
            states, first = next_states, False
    seconds = time.perf_counter() - t0
    model.train(was_training)
    stats = context.stats() if hasattr(context, "stats") else {}
    return {
        "returns": returns[:n].reshape(len(tasks), n_envs_per_task, n_episodes),
        "seconds": seconds,
        "seconds_per_env_step": seconds / (n_episodes * spec.horizon),
        **({"donor": donor, "donor_permutation": donor_permutation if donor == "other_task" else None,
            "donor_tasks": donors.tolist()} if donors is not None else {}),
        **stats,
    }


def episodes_to_fraction(curve: np.ndarray, fraction: float, window: int = 5) -> int | None:
    """First episode at which the mean of the trailing `window` episodes (it and the ones before it)
    reaches `fraction`: no look-ahead. None if it never does."""
    if len(curve) < window:
        return None
    trailing = np.convolve(curve, np.ones(window) / window, mode="valid")  # trailing[i] ends at episode i + window - 1
    hits = np.nonzero(trailing >= fraction)[0]
    return int(hits[0]) + window - 1 if len(hits) else None


def miss_rate_after_first_success(returns: np.ndarray) -> float | None:
    """Share of the episodes after a rollout's first rewarded episode that earned nothing: how often a
    task once solved is lost again (memory failures show here, exploration failures do not)."""
    found = np.cumsum(returns > 0, axis=-1) > 0
    after = found & np.concatenate([np.zeros_like(found[..., :1]), found[..., :-1]], axis=-1)  # strictly after
    return float((returns[after] == 0).mean()) if after.any() else None


def bootstrap_ratio(numer: np.ndarray, denom: np.ndarray, n: int = N_BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% interval of sum(numer) / sum(denom) over tasks resampled with replacement. numer [..., tasks]
    (leading axes, e.g. training seeds, are averaged for each resample: the same tasks for every seed)."""
    numer, denom = np.atleast_2d(numer), np.asarray(denom)
    idx = np.random.default_rng(seed).integers(0, len(denom), size=(n, len(denom)))
    stats = numer[:, idx].mean(axis=(0, 2)) / denom[idx].mean(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(tasks: np.ndarray, spec: GridTaskSpec, rollout: dict) -> dict:
    """The eval JSON: per-task returns, per-episode curve, fraction of optimal and its uncertainty."""
    returns = rollout["returns"]  # [tasks, repeats, episodes]
    optimal = spec.optimal_returns(tasks)
    per_task = returns.mean(axis=1)  # [tasks, episodes]
    mean_per_episode = per_task.mean(axis=0)
    fraction_per_episode = mean_per_episode / optimal.mean()
    last = min(10, returns.shape[-1])
    task_last10 = per_task[:, -last:].mean(axis=1)  # [tasks]
    task_fraction = task_last10 / optimal
    per_repeat_last10 = returns[..., -last:].mean(axis=(0, 2)) / optimal.mean()  # each repeat index runs every task once
    lo, hi = bootstrap_ratio(task_last10, optimal)
    out = {
        "split": None,
        "tasks": tasks.tolist(),
        "optimal_return": optimal.tolist(),
        "mean_optimal_return": float(optimal.mean()),
        "n_episodes": int(returns.shape[-1]),
        "n_envs_per_task": int(returns.shape[1]),
        "returns": per_task.round(4).tolist(),
        "mean_return_per_episode": mean_per_episode.round(4).tolist(),
        "fraction_of_optimal_per_episode": fraction_per_episode.round(4).tolist(),
        "fraction_of_optimal_first10": float(fraction_per_episode[:last].mean()),
        # the headline: mean return over tasks / mean optimal return (ratio of means)
        "fraction_of_optimal_last10": float(fraction_per_episode[-last:].mean()),
        # 95% interval over the tasks (resampled with replacement): the uncertainty of a fixed model on other tasks
        "fraction_of_optimal_last10_ci95": [lo, hi],
        "fraction_of_optimal_last10_task_se": float(task_fraction.std(ddof=1) / np.sqrt(len(tasks))) if len(tasks) > 1 else None,
        # spread over repeated rollouts of the same tasks and weights: action-sampling noise only
        "fraction_of_optimal_last10_rollout_se": float(per_repeat_last10.std(ddof=1) / np.sqrt(len(per_repeat_last10)))
        if len(per_repeat_last10) > 1 else None,
        # mean of per-task fractions: far tasks (the ones that fail) weigh as much as near ones
        "mean_task_fraction_last10": float(task_fraction.mean()),
        "area_under_curve": float(fraction_per_episode.mean()),
        "episodes_to_80pct": episodes_to_fraction(fraction_per_episode, 0.8),
        "miss_rate_after_first_success": miss_rate_after_first_success(returns),
        **{k: float(v) for k, v in spec.outcome_rates(returns[..., -last:]).items()},
        "seconds": round(rollout["seconds"], 2),
        "seconds_per_env_step": rollout["seconds_per_env_step"],
    }
    out.update({k: v for k, v in rollout.items() if k not in ("returns", "seconds", "seconds_per_env_step")})
    return out


def evaluate_split(model, spec: GridTaskSpec, split: str, n_episodes: int, n_envs_per_task: int, seed: int,
                   use_cache: bool = True, device="cpu", histories: dict | None = None, held_out_streams_per_task: int = 0,
                   memory: str = "normal", memory_chunks: int = 1, donor: str = "other_task", donor_permutation: int = 0,
                   **record) -> dict:
    """The eval JSON of one split: the in-context rollout on its tasks (`run_in_context`, `summarize`) and, when
    `histories` are given and memory is normal, the held-out loss on their first `held_out_streams_per_task`
    streams. `record` (global_step, env, run_config_hash, ...) is stored as given. train.py and evaluate.py
    both call this, so a checkpoint's final evaluation and a later `evaluate.py` run compute the same thing."""
    tasks = spec.tasks(split)
    rollout = run_in_context(model, spec, tasks, n_episodes, n_envs_per_task, seed, use_cache, device,
                             memory, memory_chunks, donor, donor_permutation)
    result = summarize(tasks, spec, rollout)
    result.update(split=split, memory=memory, memory_chunks=memory_chunks if memory == "truncate" else None, **record)
    result["held_out"] = held_out_loss(model, histories, held_out_streams_per_task, device, phase_names=spec.phase_names) \
        if histories is not None and held_out_streams_per_task and memory == "normal" else {}
    return result


def position_bins(n_tokens: int, horizon: int) -> dict[str, tuple[int, int]]:
    """Stream-position bins (in episodes) for the held-out loss: the start, where in-context learning shows, and later."""
    n_ep = n_tokens // horizon
    edges = [e for e in (0, 1, 2, 5, 20) if e < n_ep] + [n_ep]
    names = {(0, 1): "ep0", (1, 2): "ep1"}
    return {names.get((a, b), f"ep{a}-{b - 1}"): (a * horizon, b * horizon) for a, b in zip(edges[:-1], edges[1:])}


@torch.no_grad()
def held_out_loss(model, histories: dict, n_streams_per_task: int, device="cpu", memory_value: bool = True,
                  phase_names: tuple[str, ...] = ()) -> dict:
    """Action loss at every step of held-out histories, each predicted from the rollout's context there.

    The target positions are fixed (every step of the first `n_streams_per_task` streams of every
    task): no model or layout option changes them. Returns `loss_action`, `acc_action`, the loss per
    stream-position bin (`loss_action_<bin>`), the loss and accuracy on the last two thirds of each stream by
    episode phase (`loss_action_late_<phase>`, `acc_action_late_<phase>`; `phase_names` from the env's spec: what
    the model does once the source has learned, e.g. after Key-to-Door's key), and for CompressedAD the memory
    value curve: the loss on the last two thirds of each stream with the latents rebuilt from only the last K compressed chunks
    (`memory_value/chunks<K>`, K = 0 is the empty memory) and with all of them (`memory_value/all`).
    """
    from dataset import select_streams, stream_tokens

    was_training = model.training
    model.eval()
    picked = select_streams(histories, slice(0, n_streams_per_task))
    tokens, actions = stream_tokens(picked)
    phase = torch.from_numpy(episode_phase(picked["rewards"].reshape(len(tokens), -1), histories["horizon"],
                                           len(phase_names))).to(device) if phase_names else None
    tokens, actions = torch.from_numpy(tokens).to(device), torch.from_numpy(actions).to(device)
    T = tokens.shape[1]

    valid = actions != NO_TARGET  # noise steps are context only

    def per_step(logits):
        return F.cross_entropy(logits.transpose(1, 2).float(), actions, ignore_index=NO_TARGET, reduction="none")  # [N, T]

    def mean(x, cols=slice(None), keep=None):
        keep = valid[:, cols] if keep is None else keep
        return float(x[:, cols][keep].float().mean())

    logits = model.teacher_forced_logits(tokens)
    loss = per_step(logits)
    out = {"loss_action": mean(loss), "acc_action": mean(logits.argmax(-1) == actions)}
    for name, (a, b) in position_bins(T, histories["horizon"]).items():
        out[f"loss_action_{name}"] = mean(loss, slice(a, b))
    late = slice(T // 3, T)
    for k, name in enumerate(phase_names):
        keep = valid[:, late] & (phase[:, late] == k)
        if keep.any():  # a phase no late step reaches has no loss
            out[f"loss_action_late_{name}"] = mean(loss, late, keep)
            out[f"acc_action_late_{name}"] = mean(logits.argmax(-1) == actions, late, keep)
    if memory_value and hasattr(model, "encoder"):
        out["memory_value/all"] = mean(loss, late)
        for K in MEMORY_VALUE_CHUNKS:
            mode = "clear" if K == 0 else "truncate"
            out[f"memory_value/chunks{K}"] = mean(per_step(model.teacher_forced_logits(tokens, mode, K)), late)
    model.train(was_training)
    return out


def plot_curve(result: dict, source_curves: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimal = float(np.mean(result["optimal_return"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["mean_return_per_episode"], label="model (in context)")
    for label, curve in (source_curves or {}).items():
        ax.plot(np.asarray(curve, dtype=float) * optimal, label=label, alpha=0.7)
    ax.axhline(optimal, color="k", linestyle="--", label="optimal")
    ax.set_xlabel("episode in context")
    ax.set_ylabel("mean return")
    memory = f", memory={result['memory']}" if result.get("memory", "normal") != "normal" else ""
    ax.set_title(f"{result['split']} tasks{memory}: last-10 fraction of optimal {result['fraction_of_optimal_last10']:.3f}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


SOURCE_LABELS = {"learning_curve": "source algorithm, its histories (noise steps included)",
                 "learning_curve_noise_free": "source algorithm, episodes without a noise step"}


def source_curves(metadata: dict, split: str) -> dict:
    """{plot label: the source's learning curve on the same tasks} from a dataset's metadata: as recorded (the noise
    steps the model reads as context included) and over the episodes that had no noise step."""
    return {label: metadata[key][split] for key, label in SOURCE_LABELS.items() if split in metadata.get(key, {})}


def source_curves_for(run_cfg: dict, split: str) -> dict:
    """`source_curves` of the run's dataset, if it is on disk."""
    from dataset import load_metadata

    try:
        return source_curves(load_metadata(OmegaConf.create(run_cfg)), split)
    except (DatasetError, OSError):
        return {}


def config_hash(run_cfg: dict) -> str:
    """A short hash of a run's resolved config: an eval file names the run it evaluated (scripts/ reuse only matches)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(run_cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def result_name(split: str, memory: str = "normal", memory_chunks: int = 1, donor: str = "other_task",
                donor_permutation: int = 0) -> str:
    """eval/<name>.json: one file per split and memory test, so no test overwrites a normal evaluation."""
    if memory == "normal":
        return split
    if memory == "truncate":
        return f"{split}-memory-truncate{memory_chunks}"
    if memory == "transplant":
        return f"{split}-memory-transplant-" + ("same_task" if donor == "same_task" else f"other_task{donor_permutation}")
    return f"{split}-memory-{memory}"


def write_results(result: dict, run_dir: Path, name: str, source_curves: dict | None) -> Path:
    out = Path(run_dir) / "eval" / f"{name}.json"
    atomic_write_json(result, out)
    plot_curve(result, source_curves, out.with_suffix(".png"))
    return out
