"""How CompressedAD carries its memory in training: stream lanes against whole histories, on validation tasks.

    python scripts/compare_carry.py --seeds 0 1 2                 # Darkroom
    python scripts/compare_carry.py --env dark_key_to_door --seeds 0 1

Both recipes run the same code (dataset.HistoryLanes + CompressedAD.forward) at the same number of training
targets: `lanes` is the default (96 lanes, one segment each a step, the memory carried from step to step, so a
few steps stale), `whole` reads 4 whole histories a step from their first step (nothing carried, never stale;
fewer, larger steps). Each run evaluates on the validation tasks during training; writes
runs/compare-carry-<env>/table.md (final validation return with a 95% interval over tasks and the spread over
seeds, wall time, targets seen, final staleness) and curves.png (validation return against targets seen and
against wall-clock seconds, so the recipes compare at equal targets and at equal time).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from scripts.runs import (
    ROOT,
    eval_result,
    last10_over_seeds,
    mean_pm,
    reuse_run,
    run,
    scalars,
    write_table,
)

# slug -> (label, overrides); `whole` takes as many targets as `lanes`: 4 histories x ~1720 targets a step on Darkroom
VARIANTS = {
    "lanes": ("stream lanes (96 x 1 segment a step, memory carried)", []),
    "whole": ("whole histories (4 a step, nothing carried)", ["training.segments_per_step=null", "training.train_batch_size=4"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="darkroom", choices=["darkroom", "dark_key_to_door"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--whole-steps", type=int, default=840, help="whole: optimizer steps (840 x 4 histories ~ lanes' targets)")
    p.add_argument("--eval-points", type=int, default=4, help="validation evaluations during training")
    args, extra = p.parse_known_args()
    out = ROOT / f"runs/compare-carry-{args.env}"
    out.mkdir(parents=True, exist_ok=True)
    env = [f"env={args.env}", "experiment=quick"]
    run("collect.py", *env)
    rows, curves = [], {}
    for slug, (label, overrides) in VARIANTS.items():
        if slug == "whole":
            overrides = [*overrides, f"training.train_timesteps={args.whole_steps}", "training.num_warmup_steps=40"]
        results, train = [], []
        for seed in args.seeds:
            run_dir = ROOT / "runs" / f"compare-carry-{args.env}-{slug}-seed{seed}"
            steps = args.whole_steps if slug == "whole" else None
            interval = [f"eval_interval={steps // args.eval_points}", f"save_interval={steps // args.eval_points}"] if steps else []
            train_overrides = [*env, "model=ad_compressed_dr", *overrides, *interval, f"seed={seed}",
                               f"run_name={run_dir.name}", "final_eval_splits=[val]", *extra]
            if not reuse_run(run_dir / "checkpoint-final.pt", "train", train_overrides):
                run("train.py", *train_overrides)
            results.append(eval_result(run_dir, "val"))
            step, sec = scalars(run_dir, "train/seconds_per_step")
            _, targets = scalars(run_dir, "train/targets_per_step")
            _, stale = scalars(run_dir, "train/memory_staleness")
            eval_steps, val = scalars(run_dir, "eval/fraction_of_optimal_last10")
            targets_at = lambda s: float(np.interp(s, step, np.cumsum(np.diff(np.concatenate([[0], step])) * targets)))
            train.append({"seconds": float(sec[-1] * step[-1]), "targets": targets_at(step[-1]),
                          "staleness": float(stale[-1]) if len(stale) else None})
            curves.setdefault(label, []).append((np.array([targets_at(s) for s in eval_steps]),
                                                 np.interp(eval_steps, step, sec * step), val))
        rows.append([label, last10_over_seeds(results), mean_pm([r["fraction_of_optimal_first10"] for r in results]),
                     mean_pm([t["seconds"] for t in train]), mean_pm([t["targets"] / 1e6 for t in train]),
                     mean_pm([t["staleness"] for t in train], 2)])
    note = (f"\n\n{args.env}, quick preset, validation tasks, training seeds {args.seeds}: mean over seeds, '[lo, hi]' "
            f"resamples tasks (95%), '±' is the std over seeds. Staleness: |carried - recomputed| / |recomputed| of the "
            f"lanes' memory at the end of training (whole histories carry nothing).\n")
    write_table(out / "table.md", ["recipe", "val last10 [95% CI over tasks] ± seed std", "val first10", "train wall s",
                                   "targets seen (M)", "final staleness"], rows, note)
    plot(curves, out / "curves.png", f"{args.env}, validation tasks, seeds {args.seeds}")


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (label, runs) in enumerate(curves.items()):
        for j, (targets, seconds, val) in enumerate(runs):
            kw = {"color": f"C{i}", "alpha": 0.8, "label": label if j == 0 else None, "marker": "o"}
            axes[0].plot(targets / 1e6, val, **kw)
            axes[1].plot(seconds, val, **kw)
    axes[0].set_xlabel("training targets seen (millions)")
    axes[1].set_xlabel("training wall-clock (s, evaluations included)")
    axes[0].set_ylabel("validation fraction of optimal, last 10 episodes")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
