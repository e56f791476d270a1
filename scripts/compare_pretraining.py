"""Does encoder pre-training help? CompressedAD from scratch vs pre-trained encoder (fine-tuned, frozen).

    python scripts/compare_pretraining.py --seeds 0 1 [extra hydra overrides]

Quick preset, same data and seeds. Per seed: one stage-1 run, then three stage-2 runs. Writes
runs/compare-pretraining/table.md (steps to reach an action-loss threshold, fraction_of_optimal_last10
on the validation and the test tasks with 95% intervals over tasks and the spread over seeds, wall
time of each stage) and curves.png (action loss and validation return against training step).
"""
from __future__ import annotations

import argparse

from scripts.runs import (
    ROOT,
    collect_overrides,
    eval_result,
    first_step_below,
    last10_over_seeds,
    mean_pm,
    reuse_run,
    run,
    scalars,
    write_table,
)

VARIANTS = {
    "scratch": ("from scratch", []),
    "finetuned": ("pre-trained, fine-tuned", ["model.pretrained_encoder_path={ckpt}"]),
    "frozen": ("pre-trained, frozen", ["model.pretrained_encoder_path={ckpt}", "model.freeze_encoder=true"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--loss-threshold", type=float, default=0.6)
    p.add_argument("--out", default="runs/compare-pretraining")
    args, extra = p.parse_known_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    run("collect.py", "experiment=quick", *collect_overrides(extra))
    stage1_seconds, results = [], {k: [] for k in VARIANTS}
    for seed in args.seeds:
        stage1 = ROOT / "runs" / f"compare-pretrain-encoder-seed{seed}"
        ckpt = stage1 / "encoder-pretrained-final.pt"
        stage1_overrides = ["experiment=quick", f"seed={seed}", f"run_name={stage1.name}", *extra]
        if not reuse_run(stage1 / "training-state-final.pt", "pretrain_encoder", stage1_overrides):
            run("pretrain_encoder.py", *stage1_overrides)
        _, sec = scalars(stage1, "pretrain/seconds")
        stage1_seconds.append(float(sec[-1]) if len(sec) else None)
        for slug, (_, overrides) in VARIANTS.items():
            run_dir = ROOT / "runs" / f"compare-{slug}-seed{seed}"
            train_overrides = ["experiment=quick", "model=ad_compressed_dr", f"seed={seed}", f"run_name={run_dir.name}",
                               *[o.format(ckpt=ckpt) for o in overrides], *extra]
            if not reuse_run(run_dir / "checkpoint-final.pt", "train", train_overrides):
                run("train.py", *train_overrides)
            _, sec = scalars(run_dir, "train/seconds_per_step")
            steps, _ = scalars(run_dir, "train/seconds_per_step")
            results[slug].append({
                "run_dir": run_dir,
                "steps_to_threshold": first_step_below(run_dir, "train/loss_action", args.loss_threshold),
                "val": eval_result(run_dir, "val"), "test": eval_result(run_dir, "test"),
                "seconds": float(sec[-1] * steps[-1]) if len(sec) else None,
            })
    header = ["variant", f"steps to train/loss_action <= {args.loss_threshold}", "val last10 [95% CI] ± seed std",
              "test last10 [95% CI] ± seed std", "stage-1 wall time (s)", "stage-2 wall time (s)"]
    rows = []
    for slug, (label, _) in VARIANTS.items():
        rs = results[slug]
        never = sum(r["steps_to_threshold"] is None for r in rs)
        rows.append([label, mean_pm([r["steps_to_threshold"] for r in rs]) + (f" ({never} never)" if never else ""),
                     last10_over_seeds([r["val"] for r in rs]), last10_over_seeds([r["test"] for r in rs]),
                     "0" if slug == "scratch" else mean_pm(stage1_seconds), mean_pm([r["seconds"] for r in rs])])
    note = (f"\n\nQuick preset, seeds {args.seeds}, 8 val / 8 test goals x 32 envs, 100 episodes; mean over seeds, "
            f"[95% interval over goals], ± std over seeds.\n")
    write_table(out / "table.md", header, rows, note)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for slug, (label, _) in VARIANTS.items():
        for i, r in enumerate(results[slug]):
            s, v = scalars(r["run_dir"], "train/loss_action")
            ax1.plot(s, v, color=f"C{list(VARIANTS).index(slug)}", alpha=0.8, label=label if i == 0 else None)
            s, v = scalars(r["run_dir"], "eval/fraction_of_optimal_last10")  # validation goals
            ax2.plot(s, v, "o-", color=f"C{list(VARIANTS).index(slug)}", alpha=0.8, label=label if i == 0 else None)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("train/loss_action")
    ax1.axhline(args.loss_threshold, color="k", linestyle=":")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("validation fraction of optimal (last 10 of 100 episodes)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


if __name__ == "__main__":
    main()
