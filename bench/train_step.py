"""Training-step cost, in one run: training targets per second of CompressedAD against AD with its
raw window (40) and with a long window (240), and the project's AD step against a bare PyTorch
transformer of identical shape.

    python bench/train_step.py [--steps 20] [extra hydra overrides for CompressedAD ...]

"Project step" = batch gathering from the real dataset + forward + backward + clipping + AdamW, as
in train.py, at each model's quick-preset batch size. "Targets" = the action predictions the loss
is taken on (a batch's targets not equal to -100). "Bare" = nn.TransformerEncoder (same width, depth,
heads, MLP, pre-LN, dropout) on random inputs with the same loss and optimizer.
Needs the quick dataset (python collect.py experiment=quick).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hydra import compose, initialize_config_dir  # noqa: E402

from dataset import build_dataset, collate_fn_for, load_histories  # noqa: E402
from model import build_model  # noqa: E402
from model.tokens import token_dim  # noqa: E402
from train import action_loss  # noqa: E402


def cfg_for(model: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("train", ["experiment=quick", f"model={model}", *extra])


def time_steps(step_fn, n: int) -> tuple[float, float]:
    """(seconds per step, targets per step), after 3 warm-up steps."""
    for _ in range(3):
        step_fn()
    t0, targets = time.perf_counter(), 0
    for _ in range(n):
        targets += step_fn()
    return (time.perf_counter() - t0) / n, targets / n


def project_step(cfg):
    histories = load_histories(cfg, "train")
    dataset, collate = build_dataset(cfg.model, histories), collate_fn_for(cfg.model)
    model = build_model(cfg.model, 81, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    batch_size = cfg.model.train_batch_size

    def step() -> int:
        batch = collate(dataset.__getitems__(rng.integers(0, len(dataset), batch_size)))
        loss, logs = action_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(logs["n_targets"])

    return step


def bare_step(T: int, n_embd: int, n_layer: int, n_head: int, dropout: float, batch_size: int, in_dim: int):
    layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, activation="gelu", batch_first=True, norm_first=True)
    embed, body, head = nn.Linear(in_dim, n_embd), nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False), nn.Linear(n_embd, 5)
    params = [*embed.parameters(), *body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    x, y = torch.randn(batch_size, T, in_dim), torch.randint(0, 5, (batch_size, T))

    def step() -> int:
        logits = head(body(embed(x), mask=mask, is_causal=True))
        loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return y.numel()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    args, extra = p.parse_known_args()
    torch.manual_seed(0)
    runs = {
        "AD, window 40": cfg_for("ad_dr", "model.n_transit=40"),
        "AD, window 240": cfg_for("ad_dr", "model.n_transit=240", "model.train_batch_size=16"),
        "CompressedAD": cfg_for("ad_compressed_dr", *extra),
    }
    results = {}
    for name, cfg in runs.items():  # printed as each finishes
        results[name] = time_steps(project_step(cfg), args.steps)
        sec, targets = results[name]
        print(f"{name:16s} batch {cfg.model.train_batch_size:3d}: {1000 * sec:7.1f} ms/step, {targets:7.0f} targets/step, "
              f"{targets / sec:8.0f} targets/s", flush=True)
    ad = runs["AD, window 240"].model
    t_bare, _ = time_steps(bare_step(ad.n_transit, ad.tf_n_embd, ad.tf_n_layer, ad.tf_n_head, ad.tf_dropout,
                                     ad.train_batch_size, token_dim(81, 5)), args.steps)
    rate = {name: targets / sec for name, (sec, targets) in results.items()}
    print(f"\n{torch.get_num_threads()} threads, mean of {args.steps} steps")
    print(f"CompressedAD targets/s / AD-240's = {rate['CompressedAD'] / rate['AD, window 240']:.2f}, "
          f"/ AD-40's = {rate['CompressedAD'] / rate['AD, window 40']:.2f}")
    print(f"AD-240 project step / bare nn.TransformerEncoder of the same shape = {results['AD, window 240'][0] / t_bare:.2f}")


if __name__ == "__main__":
    main()
