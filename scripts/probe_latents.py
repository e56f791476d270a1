"""Latent probe: can a linear classifier read the task from CompressedAD's memory alone?

    python scripts/probe_latents.py --checkpoint runs/compare-darkroom-compressed-ad-seed0/checkpoint-final.pt

The memory L_k after every compression of the source's learning histories (teacher-forced, exactly as the
rollout builds it) is the probe's input; its targets are the task's coordinates (Darkroom: the goal's row
and column; Key-to-Door: the key's and the door's), one grid-size-way softmax per coordinate, so a probe
fitted on the training tasks can name a held-out task's cell it never saw as a label. It is fitted on the
training-task histories and scored on the held-out (val, test) histories, by how many compressions ago the
event that reveals the task (Darkroom: a rewarded step; Key-to-Door: the key's reward, then the door's)
last left the raw window for the memory: 1 = the chunk just compressed held it, "none" = no such chunk yet.

Beside the trained model it probes the same architecture with untrained weights (random features of the
same chunks: what the history itself gives away) and gives chance (the training tasks' most frequent
coordinates), and scores the probe also on other histories of the training tasks (streams it was not fitted on),
which separates "the memory does not hold the task" from "it holds it in a form that does not carry over to new
tasks". Writes `<run dir>/probe-<linear|mlpH>/probe.json` and `probe.png`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.tokens import episode_phase

# distance bins, in compressions since the last task-revealing chunk left the raw window; "none" = no such chunk yet
BINS = (("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-8", 5, 8), ("9-16", 9, 16), ("17+", 17, 10**9))


def revealing_tokens(rewards: np.ndarray, horizon: int, n_pairs: int) -> np.ndarray:
    """rewards [N, T] -> [N, T, n_pairs]: token t reveals coordinate pair p (its previous-transition fields hold the
    rewarded step t - 1). Pair p's event is an episode's p-th reward (0-based), the last pair also every later one:
    Darkroom (one pair, the goal) every rewarded step; Key-to-Door the key's reward (pair 0) and the door's (pair 1)."""
    N, T = rewards.shape
    rewarded = rewards > 0
    index = episode_phase(rewards, horizon)  # how many rewards came earlier in the step's episode
    pairs = np.arange(n_pairs)
    step_reveals = rewarded[..., None] & ((index[..., None] == pairs) | ((pairs == n_pairs - 1) & (index[..., None] >= pairs)))
    out = np.zeros((N, T, n_pairs), dtype=bool)
    out[:, 1:] = step_reveals[:, :-1]
    return out


def compressions_since(reveals: np.ndarray, chunk_start: np.ndarray, chunk: int) -> np.ndarray:
    """reveals [N, T] bool, the schedule's chunks -> [N, K + 1]: for the memory L_k of every segment k, the number of
    compressions since the last one whose chunk held a revealing token (1 = compression k itself), -1 if none has."""
    N = len(reveals)
    K = len(chunk_start)
    t = chunk_start[:, None] + np.arange(chunk)[None]  # [K, chunk]
    held = reveals[:, t].any(-1)  # [N, K]: compression j + 1 took a revealing token into the memory
    j = np.where(held, np.arange(1, K + 1)[None], 0)
    last = np.concatenate([np.zeros((N, 1), dtype=np.int64), np.maximum.accumulate(j, axis=1)], axis=1)  # [N, K + 1]
    k = np.arange(K + 1)[None]
    return np.where(last > 0, k - last + 1, -1)


@torch.no_grad()
def memory_features(model, tokens: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Histories tokens [N, T, 6] -> the flattened memory L_k of every segment: [N, K + 1, n_latent * C]."""
    out = [model.segment_latents(torch.from_numpy(tokens[i : i + batch_size])).flatten(2).numpy()
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, hidden: int = 0, steps: int = 300, weight_decay: float = 1e-3,
              seed: int = 0) -> dict:
    """Softmax probe, one head per column of y [N, H] over n_classes, on standardised features x [N, D]: linear
    (hidden = 0) or with one ReLU layer of `hidden` units. Full-batch Adam."""
    torch.manual_seed(seed)
    x = torch.from_numpy(x).float()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    y = torch.from_numpy(y).long()
    H = y.shape[1]
    net = (torch.nn.Linear(x.shape[1], H * n_classes) if not hidden else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, H * n_classes)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2 if not hidden else 3e-3, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(net(x).view(-1, H, n_classes).transpose(1, 2), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"net": net.eval(), "mean": mean, "std": std, "n_heads": H, "n_classes": n_classes}


@torch.no_grad()
def probe_predict(probe: dict, x: np.ndarray) -> np.ndarray:
    x = (torch.from_numpy(x).float() - probe["mean"]) / probe["std"]
    return probe["net"](x).view(len(x), probe["n_heads"], probe["n_classes"]).argmax(-1).numpy()


def accuracy_by_distance(correct: np.ndarray, distance: np.ndarray) -> dict:
    """correct [N] bool, distance [N] (-1 = none) -> {bin: (accuracy, count)}; bins without samples are left out."""
    out = {}
    for name, lo, hi in (("none", -1, -1), *BINS):
        m = (distance >= lo) & (distance <= hi)
        if m.any():
            out[name] = (float(correct[m].mean()), int(m.sum()))
    return out


def split_samples(model, histories: dict, n_pairs: int, max_histories: int | None = None, seed: int = 0):
    """Features [M, D], task coordinates [M, 2 * n_pairs] and, per pair, distances [M, n_pairs] of every memory L_k, k >= 1."""
    from dataset import stream_tokens

    tokens, _ = stream_tokens(histories)
    G, S, T = histories["states"].shape
    tasks = np.repeat(histories["tasks"], S, axis=0)  # one row per stream
    rewards = histories["rewards"].reshape(G * S, T)
    if max_histories and len(tokens) > max_histories:
        pick = np.random.default_rng(seed).choice(len(tokens), max_histories, replace=False)
        tokens, tasks, rewards = tokens[pick], tasks[pick], rewards[pick]
    seg = model.schedule.segments(T)
    feats = memory_features(model, tokens)[:, 1:]  # L_0 is the empty memory, the same for every history
    reveals = revealing_tokens(rewards, histories["horizon"], n_pairs)
    dist = np.stack([compressions_since(reveals[..., p], seg.chunk_start, model.schedule.chunk)[:, 1:]
                     for p in range(n_pairs)], -1)
    K = feats.shape[1]
    return (feats.reshape(-1, feats.shape[-1]), np.repeat(tasks, K, axis=0).astype(np.int64), dist.reshape(-1, n_pairs))


def probe_model(model, train: dict, held_out: dict, grid_size: int, max_train_histories: int, hidden: int = 0,
                held_in_streams: int = 2) -> dict:
    """Fit on training-task memories (all but the last `held_in_streams` streams of every task), score on each held-out
    split and on those last streams ("train_other_streams": the same tasks, other histories): per coordinate pair,
    accuracy by distance."""
    n_pairs = train["tasks"].shape[1] // 2
    S = train["states"].shape[1]
    from dataset import select_streams

    fit_on = select_streams(train, slice(0, S - held_in_streams)) if held_in_streams else train
    x, y, _ = split_samples(model, fit_on, n_pairs, max_train_histories)
    probe = fit_probe(x, y, grid_size, hidden)
    majority = np.array([np.bincount(col, minlength=grid_size).argmax() for col in y.T])
    scored = dict(held_out)
    if held_in_streams:
        scored["train_other_streams"] = select_streams(train, slice(S - held_in_streams, S))
    out = {}
    for split, histories in scored.items():
        xs, ys, ds = split_samples(model, histories, n_pairs)
        pred = probe_predict(probe, xs)
        out[split] = {}
        for p in range(n_pairs):
            cols = slice(2 * p, 2 * p + 2)
            cell = (pred[:, cols] == ys[:, cols]).all(1)
            chance = (majority[cols] == ys[:, cols]).all(1)
            out[split][f"pair{p}"] = {"cell_accuracy": float(cell.mean()), "chance": float(chance.mean()),
                                     "by_distance": accuracy_by_distance(cell, ds[:, p]),
                                     "coordinate_accuracy": [float(a) for a in (pred[:, cols] == ys[:, cols]).mean(0)]}
    return out


PAIR_NAMES = {"darkroom": ["goal"], "dark_key_to_door": ["key", "door"]}


def plot(results: dict, pair_names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(results["trained"])
    fig, axes = plt.subplots(len(pair_names), len(splits), figsize=(5 * len(splits), 3.6 * len(pair_names)), squeeze=False)
    names = ["none"] + [b[0] for b in BINS]
    for i, pair in enumerate(pair_names):
        for j, split in enumerate(splits):
            ax = axes[i, j]
            for label, style in (("untrained", "--s"), ("trained", "-o")):  # the trained model's bins label the axis
                d = results[label][split][f"pair{i}"]["by_distance"]
                xs = [n for n in names if n in d]
                ax.plot(xs, [d[n][0] for n in xs], style, label=f"{label} model")
            ax.axhline(results["trained"][split][f"pair{i}"]["chance"], color="k", linestyle=":", label="chance (most frequent)")
            ax.set_xticks(range(len(xs)), [f"{n}\nn={d[n][1]}" for n in xs], fontsize=7)  # memories scored per bin
            ax.set_ylim(0, 1)
            ax.set_xlabel("compressions since the revealing chunk left the raw window")
            ax.set_ylabel(f"{pair} cell accuracy")
            ax.set_title(f"{split} tasks")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.add_argument("--max-train-histories", type=int, default=1040, help="training-task histories the probe is fitted on")
    p.add_argument("--hidden", type=int, default=0, help="probe hidden units; 0 = a linear probe")
    p.add_argument("--out", default=None, help="default: <run dir>/probe-linear or probe-mlp<hidden>")
    args = p.parse_args()

    from dataset import load_histories
    from env import make_env_spec
    from model import build_model
    from utils.io import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, "checkpoint", required_keys=("model_state_dict", "config"))
    run_cfg = ckpt["config"]
    if run_cfg["model"]["model"] != "CompressedAD":
        raise SystemExit(f"{args.checkpoint} is a {run_cfg['model']['model']} checkpoint; the probe reads CompressedAD's memory.")
    spec = make_env_spec(run_cfg["env"])
    cfg = OmegaConf.create(run_cfg)
    train = load_histories(cfg, "train")
    held_out = {s: load_histories(cfg, s) for s in args.splits}
    trained = build_model(run_cfg["model"], spec.n_states, spec.n_actions)
    trained.load_state_dict(ckpt["model_state_dict"])
    torch.manual_seed(0)
    untrained = build_model(run_cfg["model"], spec.n_states, spec.n_actions)
    grid = int(run_cfg["env"]["grid_size"])
    results = {label: probe_model(m.eval(), train, held_out, grid, args.max_train_histories, args.hidden)
               for label, m in (("trained", trained), ("untrained", untrained))}
    kind = f"mlp{args.hidden}" if args.hidden else "linear"
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"probe-{kind}"
    out.mkdir(parents=True, exist_ok=True)
    pair_names = PAIR_NAMES.get(run_cfg["env"]["name"], [f"pair{i}" for i in range(train["tasks"].shape[1] // 2)])
    (out / "probe.json").write_text(json.dumps({"checkpoint": args.checkpoint, "probe": kind, "pairs": pair_names, **results}, indent=2) + "\n")
    plot(results, pair_names, out / "probe.png", f"{kind} probe of the memory, {args.checkpoint}")
    for split in results["trained"]:
        for i, pair in enumerate(pair_names):
            r, u = results["trained"][split][f"pair{i}"], results["untrained"][split][f"pair{i}"]
            curve = ", ".join(f"{k}: {v[0]:.2f}" for k, v in r["by_distance"].items())
            print(f"{split} {pair}: cell accuracy {r['cell_accuracy']:.3f} (untrained {u['cell_accuracy']:.3f}, "
                  f"chance {r['chance']:.3f}); by compressions since revealed: {curve}")
    print(f"-> {out / 'probe.json'}, {out / 'probe.png'}")


if __name__ == "__main__":
    main()
