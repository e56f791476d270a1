"""Helpers for the comparison scripts: run a stage as a subprocess, read back its curves and results,
and summarise results over training seeds with intervals over tasks."""
from __future__ import annotations

import filecmp
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from evaluation import bootstrap_ratio, result_name


def run(script: str, *overrides: str) -> float:
    """Run `python <script> overrides...` from the repo root; returns its wall time. Stops on failure."""
    cmd = [sys.executable, str(ROOT / script), *overrides]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    if code != 0:
        sys.exit(f"{script} failed with exit code {code}")
    return time.perf_counter() - t0


def collect_overrides(overrides) -> list[str]:
    """The overrides collect.py takes (what shapes the histories): env, algorithm, experiment and its own top-level
    keys. A comparison's extra overrides go to collect.py through this and to train.py whole (evaluate.py reads the
    run's config from its checkpoint)."""
    from two_stage import config_keys

    top = config_keys(ROOT / "config/common.yaml") | config_keys(ROOT / "config/collect.yaml")
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] in {"env", "algorithm", "experiment", *top}]


# keys of a run's config that may differ between the run and a request to reuse it: run control, the name (a run moved
# to another name is the same run), and what happens beside the weights (checkpoint cadence; the full evaluations after
# the last step: the comparison runs evaluate.py for a split the run did not evaluate). eval_interval stays: it sets
# the validation curve a comparison reads.
NOT_PART_OF_THE_RUN = ("resume", "overwrite", "dataset", "log_first_batch", "run_name", "save_interval", "final_eval_splits")


# keys naming a file the run started from: the same bytes at another path (a stage-1 run copied in under a comparison's
# name) make the same run
INPUT_FILES = ("model.pretrained_encoder_path",)


def same_file_content(a, b) -> bool:
    """True when both paths (relative ones from the repo root, as train.py reads them) are files with the same bytes."""
    paths = [Path(p) if Path(p).is_absolute() else ROOT / p for p in (a, b) if p]
    return len(paths) == 2 and all(p.is_file() for p in paths) and filecmp.cmp(*paths, shallow=False)


def composed_config(script: str, overrides) -> dict:
    """The resolved config `python <script>.py overrides...` would run with, as plain containers (as checkpoints hold it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return OmegaConf.to_container(compose(config_name=script, overrides=list(overrides)), resolve=True)


def config_differences(then: dict, now: dict, prefix: str = "") -> dict:
    """{dotted key: (then, now)} for every leaf that differs."""
    out = {}
    for k in sorted(then.keys() | now.keys()):
        a, b = then.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_differences(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def reuse_run(checkpoint: Path, script: str, overrides) -> bool:
    """True when `checkpoint` exists and was made with exactly the config these overrides compose now; False when it
    does not exist (train it). A run made under another config (an older default, other overrides) is refused, naming
    the keys: a comparison never mixes recipes silently."""
    if not checkpoint.is_file():
        return False
    from utils.io import load_checkpoint

    then = load_checkpoint(checkpoint, "run to reuse", required_keys=("config",))["config"]
    now = composed_config(script, overrides)
    differ = {k: v for k, v in config_differences(then, now).items()
              if k.split(".")[0] not in NOT_PART_OF_THE_RUN and not (k in INPUT_FILES and same_file_content(*v))}
    if differ:
        sys.exit(f"Error: {checkpoint} was made under another config than this comparison asks for; (then, now) = {differ}. "
                 f"Move {checkpoint.parent} aside to retrain it, or pass the overrides it was made with.")
    return True


def reusable_eval(run_dir: Path, name: str, checkpoint: Path, **expected) -> bool:
    """An eval file is reused only if it evaluated this very checkpoint (its config hash) with the asked settings."""
    path = Path(run_dir) / "eval" / f"{name}.json"
    if not path.is_file():
        return False
    result = json.loads(path.read_text())
    return result.get("run_config_hash") == checkpoint_config_hash(checkpoint, checkpoint.stat().st_mtime_ns) and \
        all(result.get(k) == v for k, v in expected.items())


@functools.lru_cache(maxsize=64)
def checkpoint_config_hash(checkpoint: Path, mtime_ns: int) -> str:
    """The config hash of a checkpoint, read once per file version (a comparison asks for it per eval file)."""
    from evaluation import config_hash
    from utils.io import load_checkpoint

    return config_hash(load_checkpoint(checkpoint, "checkpoint", required_keys=("config",))["config"])


def scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one TensorBoard scalar tag in a run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the whole directory in order, so that points purged by a resume (purge_step) are dropped
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return np.zeros(0, np.int64), np.zeros(0)
    events = acc.Scalars(tag)
    return np.asarray([e.step for e in events]), np.asarray([e.value for e in events])


def first_step_below(run_dir: Path, tag: str, threshold: float) -> int | None:
    steps, values = scalars(run_dir, tag)
    hits = np.nonzero(values <= threshold)[0]
    return int(steps[hits[0]]) if len(hits) else None


def eval_result(run_dir: Path, name: str = "test") -> dict:
    return json.loads((Path(run_dir) / "eval" / f"{name}.json").read_text())


def full_evals(run_dir: Path, checkpoint: Path, splits, train_overrides) -> dict:
    """{split: the run's full evaluation}, from evaluate.py where the run did not make a matching one itself (a
    reused run may have been evaluated on other splits, or with other sizes than these overrides ask)."""
    run_eval = composed_config("train", train_overrides)["eval"]
    sizes = {"n_envs_per_task": run_eval["n_envs_per_task"], "n_episodes": run_eval["n_episodes"]}
    for split in splits:
        if not reusable_eval(run_dir, split, checkpoint, memory="normal", **sizes):
            run("evaluate.py", f"checkpoint={checkpoint}", f"split={split}")
    return {split: eval_result(run_dir, split) for split in splits}


def mean_pm(values, digits: int = 3) -> str:
    """mean ± std over training seeds (std with ddof 1); '-' when there is nothing."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{np.mean(values):.{digits}g} ± {np.std(values, ddof=1):.2g}"


def median_never(values: list) -> str:
    """Median over seeds where a seed that never gets there counts as infinitely late, plus how many never did."""
    never = sum(v is None for v in values)
    finite = sorted(v for v in values if v is not None)
    ranked = finite + [np.inf] * never
    median = np.median(ranked) if ranked else np.inf
    text = "never" if not np.isfinite(median) else f"{median:.0f}"
    return text + (f" ({never} of {len(values)} never)" if never else "")


def last10_over_seeds(results: list[dict]) -> str:
    """The seed-mean of fraction_of_optimal_last10 with a 95% interval over tasks (the same resampled tasks
    for every seed), and the spread over seeds: 'mean [lo, hi] ± seed std'."""
    per_task = np.stack([np.asarray(r["returns"])[:, -10:].mean(axis=1) for r in results])  # [seeds, tasks]
    optimal = np.asarray(results[0]["optimal_return"])
    lo, hi = bootstrap_ratio(per_task, optimal)
    values = [r["fraction_of_optimal_last10"] for r in results]
    spread = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f} [{lo:.2f}, {hi:.2f}]{spread}"


def paired_difference(results_a: list[dict], results_b: list[dict]) -> str:
    """Model a minus model b on the same tasks and draws: the per-task last10 difference averaged over seeds, as a
    fraction of optimal, with a 95% bootstrap interval over tasks, and each seed's difference."""
    for a, b in zip(results_a, results_b):
        if a["tasks"] != b["tasks"] or a["n_envs_per_task"] != b["n_envs_per_task"]:
            raise SystemExit("paired difference of results on other tasks or other repeats: not paired")
    last10 = lambda r: np.asarray(r["returns"])[:, -10:].mean(axis=1)  # [tasks]
    diff = np.stack([last10(a) - last10(b) for a, b in zip(results_a, results_b)])  # [seeds, tasks]
    optimal = np.asarray(results_a[0]["optimal_return"])
    lo, hi = bootstrap_ratio(diff, optimal)
    per_seed = " / ".join(f"{d.sum() / optimal.sum():+.3f}" for d in diff)
    return f"{diff.mean(0).sum() / optimal.sum():+.3f} [{lo:+.3f}, {hi:+.3f}] (per seed {per_seed})"


def write_table(path: Path, header: list[str], rows: list[list[str]], note: str = "") -> None:
    """A markdown table (plus a note) written to `path` and printed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + note
    Path(path).write_text(text)
    print(text)


# CompressedAD's memory tests: (column, evaluate.py settings; a test with several is averaged over them)
MEMORY_TESTS = (
    ("clear costs", [{"memory": "clear"}]),
    ("truncate-1 costs", [{"memory": "truncate", "memory_chunks": 1}]),
    ("transplant, same task, costs", [{"memory": "transplant", "donor": "same_task"}]),
    ("transplant, other task (3 derangements), costs", [{"memory": "transplant", "donor": "other_task", "donor_permutation": p}
                                                       for p in range(3)]),
)


def memory_eval(run_dir: Path, ckpt: Path, split: str, settings: dict) -> dict:
    """One memory test's result, reused only if it evaluated this checkpoint with these settings."""
    name = result_name(split, settings["memory"], settings.get("memory_chunks", 1), settings.get("donor", "other_task"),
                       settings.get("donor_permutation", 0))
    if not reusable_eval(run_dir, name, ckpt, memory=settings["memory"], **{k: v for k, v in settings.items() if k != "memory"}):
        run("evaluate.py", f"checkpoint={ckpt}", f"split={split}", *[f"{k}={v}" for k, v in settings.items()])
    return eval_result(run_dir, name)


def averaged(results: list[dict]) -> dict:
    """One result whose per-task returns are the mean of `results` (the same tasks and draws, e.g. several donor
    derangements of one test), for paired differences against the normal rollout."""
    return {**results[0], "returns": np.mean([np.asarray(r["returns"]) for r in results], axis=0).tolist(),
            "fraction_of_optimal_last10": float(np.mean([r["fraction_of_optimal_last10"] for r in results]))}


def memory_row(name: str, results: list[dict], memory: dict) -> list[str]:
    """A model's memory tests on one split: normal last10, then each test's last10 and its cost (normal minus test:
    per-task, mean over seeds, 95% interval over tasks, per seed) on the same tasks and draws."""
    row = [name, mean_pm([r["fraction_of_optimal_last10"] for r in results])]
    for per_seed in memory.values():  # the tests that were run, in MEMORY_TESTS order
        tested = [averaged(ms) for ms in per_seed]  # per seed: the mean over the test's settings
        row.append(f"{mean_pm([t['fraction_of_optimal_last10'] for t in tested])}; cost {paired_difference(results, tested)}")
    return row
