"""Does stage 1 help stage 2? CompressedAD from scratch against a pre-trained encoder, fine-tuned and frozen, for
each stage-1 objective.

    python scripts/compare_pretraining.py --seeds 0 1 2                                  # Darkroom, every objective
    python scripts/compare_pretraining.py --env dark_key_to_door --seeds 0 1
    python scripts/compare_pretraining.py --seeds 0 --variants scratch autoencode-finetuned autoencode-frozen

Quick preset, the same data and seeds for every variant. Per seed: one stage-1 run per objective, then stage 2
from scratch and from each stage-1 encoder. Choices are read on the validation tasks (the in-training curve and
the final evaluation); the test tasks are reported once. Writes runs/compare-pretraining-<env>/:
table.md (final validation and test returns with intervals over tasks and the spread over seeds, stage-2 steps
and wall time to reach the scratch model's final validation return, stage-1 and stage-2 wall time), paired.md
(each variant minus scratch on the same tasks and draws), memory-test.md and curves.png (validation return
over stage-2 steps). Finished runs are reused when their config matches.
"""
from __future__ import annotations

import argparse

import numpy as np

from scripts.runs import (
    MEMORY_TESTS,
    ROOT,
    collect_overrides,
    eval_result,
    full_evals,
    last10_over_seeds,
    mean_pm,
    memory_eval,
    memory_row,
    paired_difference,
    reuse_run,
    run,
    scalars,
    write_table,
)

# stage-1 objectives: slug -> (label, pretrain_encoder.py overrides); the seed's autoencoding is always part of it
OBJECTIVES = {
    "autoencode": ("autoencoding, depths 1-3 (the seed's)", []),
    "retention": ("+ retention, depths 1-4", ["model.pretrain_retention_weight=1.0", "model.pretrain_max_depth=4",
                                              "model.pretrain_depth_weights=[1,1,1,1]"]),
    "contrastive": ("+ task-contrastive", ["model.pretrain_contrastive_weight=1.0"]),
}
MODES = {"finetuned": ("fine-tuned", []), "frozen": ("frozen", ["model.freeze_encoder=true"])}
TEST_KEYS = {"clear": 0, "truncate": 1, "same-task": 2, "other-task": 3}  # --memory-tests -> MEMORY_TESTS entries
# slug -> (label, stage-1 objective or None, stage-2 overrides beside the encoder path)
VARIANTS = {"scratch": ("from scratch", None, []),
            **{f"{o}-{m}": (f"{OBJECTIVES[o][0]}, {MODES[m][0]}", o, MODES[m][1]) for o in OBJECTIVES for m in MODES}}


def steps_to_reach(steps: np.ndarray, values: np.ndarray, target: float) -> int | None:
    """The first evaluated step whose validation return is at least `target` (None: never). TensorBoard keeps float32,
    the eval file float64: a curve's last point (the final evaluation) must reach its own return."""
    hits = np.nonzero(values >= np.float32(target) - 1e-6)[0]
    return int(steps[hits[0]]) if len(hits) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="darkroom", choices=["darkroom", "dark_key_to_door"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="scratch and <objective>-<finetuned|frozen> (default: all); scratch is always run, as the reference")
    p.add_argument("--memory-tests", nargs="*", default=list(TEST_KEYS), choices=list(TEST_KEYS),
                   help="memory tests run on the test tasks for every variant (none: skip)")
    p.add_argument("--eval-interval", type=int, default=325, help="stage-2 steps between validation evaluations (the curve)")
    p.add_argument("--out", default=None, help="default: runs/compare-pretraining-<env>")
    args, extra = p.parse_known_args()
    if any("=" not in o for o in extra):
        p.error(f"unknown arguments {[o for o in extra if '=' not in o]}: Hydra overrides are key=value")
    out = ROOT / (args.out or f"runs/compare-pretraining-{args.env}")
    out.mkdir(parents=True, exist_ok=True)
    env = [f"env={args.env}"]
    run("collect.py", "experiment=quick", *env, *collect_overrides(extra))
    tests = [MEMORY_TESTS[TEST_KEYS[k]] for k in args.memory_tests]

    variants = {v: VARIANTS[v] for v in ["scratch", *(v for v in VARIANTS if v in args.variants and v != "scratch")]}
    objectives = list(dict.fromkeys(o for _, o, _ in variants.values() if o))
    stage1 = {o: [] for o in objectives}  # per objective, per seed: wall time and held-out metrics
    results = {v: [] for v in variants}
    for seed in args.seeds:
        encoders = {}
        for o in objectives:
            run_dir = ROOT / "runs" / f"compare-pretraining-{args.env}-stage1-{o}-seed{seed}"
            overrides = ["experiment=quick", *env, *OBJECTIVES[o][1], f"seed={seed}", f"run_name={run_dir.name}", *extra]
            if not reuse_run(run_dir / "training-state-final.pt", "pretrain_encoder", overrides):
                run("pretrain_encoder.py", *overrides)
            encoders[o] = run_dir / "encoder-pretrained-final.pt"
            _, sec = scalars(run_dir, "pretrain/seconds")
            _, corr = scalars(run_dir, "pretrain/correlation")
            stage1[o].append({"seconds": float(sec[-1]), "correlation": float(corr[-1])})
        for slug, (_, objective, mode_overrides) in variants.items():
            run_dir = ROOT / "runs" / f"compare-pretraining-{args.env}-{slug}-seed{seed}"
            ckpt = run_dir / "checkpoint-final.pt"
            start = [f"model.pretrained_encoder_path={encoders[objective]}", *mode_overrides] if objective else []
            overrides = ["experiment=quick", *env, "model=ad_compressed_dr", *start, f"seed={seed}", f"run_name={run_dir.name}",
                         f"eval_interval={args.eval_interval}", "final_eval_splits=[val,test]", *extra]
            if not reuse_run(ckpt, "train", overrides):
                run("train.py", *overrides)
            evals = full_evals(run_dir, ckpt, ("val", "test"), overrides)
            steps, sec = scalars(run_dir, "train/seconds_per_step")
            curve_steps, curve = scalars(run_dir, "eval/fraction_of_optimal_last10")  # validation; the last point is the full eval
            results[slug].append({
                "val": evals["val"], "test": evals["test"],
                "curve": (curve_steps, curve), "seconds_per_step": (steps, sec), "steps": int(steps[-1]),
                "seconds": float(sec[-1] * steps[-1]),
                "memory": {test: [memory_eval(run_dir, ckpt, "test", s) for s in settings] for test, settings in tests},
            })

    # the target: the scratch model's final validation return, per seed and over seeds
    scratch = results["scratch"]
    target = float(np.mean([r["val"]["fraction_of_optimal_last10"] for r in scratch]))
    header = ["variant", "val last10 [95% CI] ± seed std", "test last10 [95% CI] ± seed std",
              f"stage-2 steps to the scratch final val ({target:.3f}), seed-mean curve", "... per seed (own scratch)",
              "x scratch's steps", "stage-1 + stage-2 wall s to it", "stage-1 wall s", "stage-1 held-out correlation",
              "stage-2 wall s"]
    rows, paired = [], []
    for slug, (label, objective, _) in variants.items():
        rs = results[slug]
        mean_steps = rs[0]["curve"][0]
        mean_curve = np.mean([r["curve"][1] for r in rs], axis=0)
        reach = steps_to_reach(mean_steps, mean_curve, target)
        per_seed = [steps_to_reach(*r["curve"], s["val"]["fraction_of_optimal_last10"]) for r, s in zip(rs, scratch)]
        s1 = stage1[objective] if objective else [{"seconds": 0.0, "correlation": None}] * len(rs)
        if reach is None:
            wall = "never"
        else:  # stage-2 seconds at that step (seconds_per_step is cumulative time over steps) plus stage 1
            walls = [float(np.interp(reach, st, sec * st)) + s["seconds"] for (st, sec), s in
                     zip([r["seconds_per_step"] for r in rs], s1)]
            wall = mean_pm(walls)
        rows.append([label, last10_over_seeds([r["val"] for r in rs]), last10_over_seeds([r["test"] for r in rs]),
                     "never" if reach is None else str(reach),
                     " / ".join("never" if x is None else str(x) for x in per_seed),
                     "-" if reach is None else f"{reach / rs[0]['steps']:.2f}", wall, mean_pm([s["seconds"] for s in s1]),
                     mean_pm([s["correlation"] for s in s1]), mean_pm([r["seconds"] for r in rs])])
        if slug != "scratch":
            paired.append([f"{label} - from scratch", paired_difference([r["val"] for r in rs], [r["val"] for r in scratch]),
                           paired_difference([r["test"] for r in rs], [r["test"] for r in scratch])])
    env_note = eval_result(ROOT / "runs" / f"compare-pretraining-{args.env}-scratch-seed{args.seeds[0]}", "test")
    note = (f"\n\n{args.env}, quick preset, seeds {args.seeds}: {len(env_note['tasks'])} val / test tasks x "
            f"{env_note['n_envs_per_task']} envs, {env_note['n_episodes']} episodes; mean over seeds, [95% interval over "
            f"tasks], ± std over seeds. The curve: validation every {args.eval_interval} stage-2 steps "
            f"(8 envs a task, the last point the full evaluation).\n")
    write_table(out / "table.md", header, rows, note)
    write_table(out / "paired.md", ["difference", "val last10 [95% CI over tasks] (per seed)",
                                    "test last10 [95% CI over tasks] (per seed)"], paired,
                f"\n\n{args.env}, seeds {args.seeds}: per-task last10 difference on the same tasks and draws, mean over "
                f"seeds, as a fraction of the mean optimal return.\n")
    if tests:
        rows = []
        for slug, (label, _, _) in variants.items():
            rs = results[slug]
            memory = {test: [r["memory"][test] for r in rs] for test, _ in MEMORY_TESTS if test in rs[0]["memory"]}
            rows.append(memory_row(label, [r["test"] for r in rs], memory))
        write_table(out / "memory-test.md", ["variant", "normal last10", *[t for t, _ in tests]], rows,
                    f"\n\n{args.env}, test tasks, seeds {args.seeds}: last10 with the memory altered after every compression; "
                    f"cost = normal minus test per task [95% interval over tasks] (per seed).\n")
    plot(variants, results, target, out / "curves.png", f"{args.env}, seeds {args.seeds}")


def plot(variants: dict, results: dict, target: float, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (slug, (label, _, _)) in enumerate(variants.items()):
        rs = results[slug]
        steps = rs[0]["curve"][0]
        curves = np.stack([r["curve"][1] for r in rs])
        ax.plot(steps, curves.mean(0), "o-", color=f"C{i}", label=label)
        if len(rs) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.12)
    ax.axhline(target, color="k", linestyle=":", label="scratch, final validation")
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("validation fraction of optimal (last 10 of 100 episodes)")
    ax.set_title(title + " (mean over seeds, band: min-max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
