"""Training-step cost: the project's AD step against a bare PyTorch transformer of identical shape,
and CompressedAD's step against AD's at the same decoder length, in one run.

    python bench/train_step.py [--steps 30] [--batch 32]

"Project step" = batch gathering from the real dataset + forward + backward + clipping + AdamW, as
in train.py. "Bare" = nn.TransformerEncoder (same width, depth, heads, MLP, pre-LN, dropout) on
random inputs with the same loss and optimizer. Needs the quick dataset (python collect.py experiment=quick).
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
from train import action_loss  # noqa: E402


def cfg_for(model: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("train", ["experiment=quick", f"model={model}", *extra])


def time_steps(step_fn, n: int) -> float:
    for _ in range(3):
        step_fn()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    return (time.perf_counter() - t0) / n


def project_step(cfg, batch_size: int):
    histories = load_histories(cfg, "train")
    dataset, collate = build_dataset(cfg.model, histories), collate_fn_for(cfg.model)
    model = build_model(cfg.model, 81, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def step():
        batch = collate(dataset.__getitems__(rng.integers(0, len(dataset), batch_size)))
        loss, _ = action_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bare_step(T: int, n_embd: int, n_layer: int, n_head: int, dropout: float, batch_size: int, in_dim: int = 13):
    layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, activation="gelu", batch_first=True, norm_first=True)
    model = nn.Sequential()
    embed, body, head = nn.Linear(in_dim, n_embd), nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False), nn.Linear(n_embd, 5)
    params = [*embed.parameters(), *body.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    x, y = torch.randn(batch_size, T, in_dim), torch.randint(0, 5, (batch_size, T))

    def step():
        logits = head(body(embed(x), mask=mask, is_causal=True))
        loss = F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    ad = cfg_for("ad_dr").model
    t_ad = time_steps(project_step(cfg_for("ad_dr"), args.batch), args.steps)
    t_bare = time_steps(bare_step(ad.n_transit, ad.tf_n_embd, ad.tf_n_layer, ad.tf_n_head, ad.tf_dropout, args.batch), args.steps)
    cad_cfg = cfg_for("ad_compressed_dr")
    L = cad_cfg.model.decoder_max_seq_length
    t_cad = time_steps(project_step(cad_cfg, args.batch), args.steps)
    t_ad_same = time_steps(project_step(cfg_for("ad_dr", f"model.n_transit={L}"), args.batch), args.steps)
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, mean of {args.steps} steps")
    print(f"AD step (n_transit={ad.n_transit}), project:        {1000 * t_ad:7.1f} ms")
    print(f"bare PyTorch transformer, same shape:        {1000 * t_bare:7.1f} ms   project / bare = {t_ad / t_bare:.2f}")
    print(f"AD step (n_transit={L}):                      {1000 * t_ad_same:7.1f} ms")
    print(f"CompressedAD step (decoder length {L}, depth 0-{cad_cfg.model.max_compression_depth}): {1000 * t_cad:7.1f} ms   "
          f"CompressedAD / AD at the same decoder length = {t_cad / t_ad_same:.2f}")


if __name__ == "__main__":
    main()
