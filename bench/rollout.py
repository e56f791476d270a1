"""In-context rollout cost per env step against history length, in one run.

    python bench/rollout.py [--envs 64] [--lengths 100 1000 10000]

Compares AD with the full history in context (KV-cached; its context grows with the history; its cache is
filled in one pass up to each length, then a block of steps is timed), AD
with a window (KV-cached, n_transit=100), and CompressedAD (quick sizes; compressions included).
Time is the mean over a block of steps ending at each history length; memory is the bytes of the
context the rollout keeps (tokens, latents and KV cache), which is what grows with history.
Untrained weights: the cost does not depend on them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from hydra import compose, initialize_config_dir

from model import build_model, rollout_memory_bytes
from model.tokens import random_tokens


def model_cfg(model: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("train", ["experiment=quick", f"model={model}", *extra]).model


@torch.no_grad()
def profile(model, n_envs: int, lengths: list[int], block: int) -> dict:
    """Step one rollout up to max(lengths); time the `block` steps ending at each length."""
    model.eval()
    rollout = model.rollout(n_envs, use_cache=True)
    tokens = random_tokens((n_envs, max(lengths)), 81, 5)
    out, t_block = {}, 0.0
    for t in range(1, max(lengths) + 1):
        timed = any(L - block < t <= L for L in lengths)
        t0 = time.perf_counter() if timed else 0.0
        rollout.step(tokens[:, t - 1])
        if timed:
            t_block += time.perf_counter() - t0
        if t in lengths:
            out[t] = (1000 * t_block / block, rollout_memory_bytes(rollout) / 2**20)
            t_block = 0.0
    return out


@torch.no_grad()
def profile_full_history(model, n_envs: int, lengths: list[int], block: int) -> dict:
    """AD that keeps its whole history: per length, fill the KV cache with `L - block` steps in one
    causal pass (stepping 10 000 times would take most of an hour), then time `block` cached steps."""
    model.eval()
    out = {}
    for L in lengths:
        tokens = random_tokens((n_envs, L), 81, 5)
        rollout = model.rollout(n_envs, use_cache=True)
        rollout.tokens = tokens[:, : L - block]
        _, rollout.cache = model.transformer(model.embed(rollout.tokens), is_causal=True, use_cache=True)
        t0 = time.perf_counter()
        for t in range(L - block, L):
            rollout.step(tokens[:, t])
        out[L] = (1000 * (time.perf_counter() - t0) / block, rollout_memory_bytes(rollout) / 2**20)
        print(f"  AD, full history, {L} steps: {out[L][0]:.2f} ms", flush=True)
        del rollout
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--envs", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--block", type=int, default=100)
    args = p.parse_args()
    torch.manual_seed(0)
    L = max(args.lengths)
    models = {
        "AD, full history": build_model(model_cfg("ad_dr", f"model.n_transit={L + 1}"), 81, 5),
        "AD, window 100": build_model(model_cfg("ad_dr"), 81, 5),
        "CompressedAD": build_model(model_cfg("ad_compressed_dr"), 81, 5),
    }
    results = {}
    for name, m in models.items():  # printed as each finishes
        run = profile_full_history if name.endswith("full history") else profile
        results[name] = run(m, args.envs, args.lengths, args.block)
        print(name, {n: f"{ms:.2f} ms, {mib:.2f} MiB" for n, (ms, mib) in results[name].items()}, flush=True)
    print(f"{args.envs} envs, {torch.get_num_threads()} threads; ms per env step (all envs) / context MiB")
    print(f"{'history':>10} | " + " | ".join(f"{name:>22}" for name in results))
    for n in args.lengths:
        print(f"{n:>10} | " + " | ".join(f"{r[n][0]:9.2f} ms {r[n][1]:7.2f} MiB" for r in results.values()))
    for name, r in results.items():
        print(f"{name}: cost at {args.lengths[-1]} / cost at {args.lengths[0]} = {r[args.lengths[-1]][0] / r[args.lengths[0]][0]:.2f}x, "
              f"memory {r[args.lengths[-1]][1] / r[args.lengths[0]][1]:.2f}x")


if __name__ == "__main__":
    main()
