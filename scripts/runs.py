"""Helpers for the comparison scripts: run a stage as a subprocess, read back its curves and results,
and summarise results over training seeds with intervals over tasks."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from evaluation import bootstrap_ratio


def run(script: str, *overrides: str) -> float:
    """Run `python <script> overrides...` from the repo root; returns its wall time. Stops on failure."""
    cmd = [sys.executable, str(ROOT / script), *overrides]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    if code != 0:
        sys.exit(f"{script} failed with exit code {code}")
    return time.perf_counter() - t0


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


def write_table(path: Path, header: list[str], rows: list[list[str]], note: str = "") -> None:
    """A markdown table (plus a note) written to `path` and printed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + note
    Path(path).write_text(text)
    print(text)
