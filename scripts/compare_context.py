"""CompressedAD against AD with a short and a long window: same data, same seeds, held-out goals.

    python scripts/compare_context.py --seeds 0 1 2 [extra hydra overrides]

Trains (quick preset) AD with a window equal to CompressedAD's uncompressed part (n_transit=40), AD
with a long window (n_transit=240), and CompressedAD, evaluates each on the held-out goals for 100
episodes, and writes runs/compare-context/table.md and curves.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a file: python scripts/<name>.py
from scripts.runs import ROOT, eval_result, mean_pm, run, scalars, write_table

# run-name slug -> (label, overrides)
VARIANTS = {
    "ad-w40": ("AD, window 40", ["model=ad_dr", "model.n_transit=40"]),
    "ad-w240": ("AD, window 240", ["model=ad_dr", "model.n_transit=240", "model.train_batch_size=16"]),
    "compressed-ad": ("CompressedAD", ["model=ad_compressed_dr"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--out", default="runs/compare-context")
    args, extra = p.parse_known_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    run("collect.py", "experiment=quick", *extra)
    rows, curves = [], {}
    for slug in args.variants:
        name, overrides = VARIANTS[slug]
        results = []
        for seed in args.seeds:
            run_name = f"compare-{slug}-seed{seed}"
            run_dir = ROOT / "runs" / run_name
            if not (run_dir / "checkpoint-final.pt").is_file():  # finished runs are reused
                run("train.py", "experiment=quick", *overrides, f"seed={seed}", f"run_name={run_name}", "eval_interval=0", *extra)
            # train.py's final evaluation wrote eval/test.json; evaluations by older code lack newer metrics
            done = (run_dir / "eval" / "test.json").is_file() and "miss_rate_after_first_success" in eval_result(run_dir)
            if not done:
                run("evaluate.py", f"checkpoint={run_dir / 'checkpoint-final.pt'}", "n_episodes=100")
            r = eval_result(run_dir)
            _, sec = scalars(run_dir, "train/seconds_per_step")
            results.append({**r, "train_seconds_per_step": float(sec[-1]) if len(sec) else None})
        curves[name] = np.mean([r["fraction_of_optimal_per_episode"] for r in results], axis=0)
        rows.append([
            name, mean_pm([r["fraction_of_optimal_last10"] for r in results]),
            mean_pm([r["episodes_to_80pct"] for r in results]) if all(r["episodes_to_80pct"] is not None for r in results)
            else f"{mean_pm([r['episodes_to_80pct'] for r in results])} ({sum(r['episodes_to_80pct'] is None for r in results)} never)",
            mean_pm([r["area_under_curve"] for r in results]),
            mean_pm([1000 * r["train_seconds_per_step"] for r in results]),
            mean_pm([1000 * r["seconds_per_env_step"] / (r["n_envs_per_goal"] * len(r["goals"])) for r in results]),
            mean_pm([r.get("n_compressions") for r in results]) if "n_compressions" in results[0] else "-",
            mean_pm([r["miss_rate_after_first_success"] for r in results]),
        ])
    header = ["model", "fraction_of_optimal_last10", "episodes to 80%", "area under curve", "train ms/step",
              "eval ms per env step", "compressions", "miss rate after first success"]
    note = f"\n\nQuick preset, held-out goals (8 x 32 envs, 100 episodes), seeds {args.seeds}; mean ± std over seeds.\n"
    write_table(out / "table.md", header, rows, note)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(c, label=name)
    ax.axhline(1.0, color="k", linestyle="--", label="optimal")
    ax.set_xlabel("episode in context")
    ax.set_ylabel("fraction of optimal return (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


if __name__ == "__main__":
    main()
