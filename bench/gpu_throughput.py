"""GPU training throughput at paper scale: tokens/s and the share of the GPU's peak bf16 FLOP/s.

    python bench/gpu_throughput.py [--steps 50] [--peak-tflops 989] [--compile]

For AD (config/model/ad_dr.yaml + training/ad.yaml) and CompressedAD (model/ad_compressed_dr.yaml +
training/compressed_ad.yaml) at their paper-scale defaults, on synthetic token batches of the real
shapes (no dataset needed): one training step = forward + backward + clipping + fused AdamW under bf16 autocast. Prints which
SDPA kernels are enabled, ms per step, tokens/s (decoder tokens whose actions are trained,
plus compressed tokens for CompressedAD) and model FLOP/s as a share of `--peak-tflops` (dense
bf16 peak of the GPU: H100/H200 SXM 989). FLOPs are counted as 6 x (matmul parameters) per token
plus the attention score/value products; they are an estimate, as in nanoGPT's MFU.

A few minutes at most on one GPU. Without a GPU it says so and runs its smoke size on the CPU
(`--steps 2 --batch-scale 0.02`); `--device cpu` times the CPU at the sizes given.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
from hydra import compose, initialize_config_dir

from model import build_model
from model.tokens import random_tokens as tokens_in_range
from utils.run import make_optimizer

N_STATES, N_ACTIONS = 81, 5


def composed_cfg(model: str):
    """train.py's composed config for `model` at its paper-scale defaults: .model is the architecture, .training the recipe."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("train", [f"model={model}"])


def random_tokens(shape, device) -> torch.Tensor:
    return tokens_in_range(shape, N_STATES, N_ACTIONS).to(device)


def make_batch(cfg, training, batch_size: int, device) -> tuple[dict, int]:
    """A batch of the model's training shape; returns (batch, tokens processed per step)."""
    if cfg.model == "AD":
        T = cfg.n_transit
        batch = {"tokens": random_tokens((batch_size, T), device)}
        return batch, batch_size * T
    # CompressedAD: lanes, each compressing one chunk and decoding one window per segment
    S, c, W = training.segments_per_step or 1, cfg.rollout_compress_length, cfg.max_uncompressed_length
    batch = {"chunks": random_tokens((batch_size, S, c), device), "windows": random_tokens((batch_size, S, W), device),
             "memory": torch.zeros(batch_size, cfg.n_latent, cfg.tf_n_embd, device=device),
             "memory_empty": torch.zeros(batch_size, dtype=torch.bool, device=device),
             "memory_reset": torch.zeros(batch_size, S, dtype=torch.bool, device=device)}
    return batch, batch_size * S * (c + W)


def target_shape(cfg, batch: dict) -> tuple:
    if cfg.model == "AD":
        return batch["tokens"].shape[:2]
    return (batch["windows"].shape[0] * batch["windows"].shape[1], batch["windows"].shape[2])


def flops_per_step(cfg, training, batch_size: int) -> float:
    """6 x matmul parameters per token through each transformer, plus attention (QK^T and AV), fwd+bwd."""
    def stack(n_layer, d, tokens, seq):
        return 6 * (12 * n_layer * d * d) * tokens + 6 * 2 * n_layer * d * seq * tokens
    d = cfg.tf_n_embd
    if cfg.model == "AD":
        T = cfg.n_transit
        return stack(cfg.tf_n_layer, d, batch_size * T, T)
    S, n_lat, c, W = training.segments_per_step or 1, cfg.n_latent, cfg.rollout_compress_length, cfg.max_uncompressed_length
    enc_seq, dec_seq = 2 * n_lat + c, n_lat + W  # upper bounds: the last layer computes only the rows read
    return stack(cfg.encoder_n_layer, d, batch_size * S * enc_seq, enc_seq) + stack(cfg.tf_n_layer, d, batch_size * S * dec_seq, dec_seq)


def bench(name: str, composed, device, batch_scale: float, steps: int, compile_model: bool, peak_tflops: float) -> None:
    cfg, training = composed.model, composed.training
    batch_size = max(1, int(training.train_batch_size * batch_scale))
    model = build_model(cfg, N_STATES, N_ACTIONS).to(device)
    optimizer = make_optimizer(model, training.lr, training.weight_decay, training.betas)
    forward = torch.compile(model) if compile_model else model
    batch, n_tokens = make_batch(cfg, training, batch_size, device)
    targets = torch.randint(0, N_ACTIONS, target_shape(cfg, batch), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        with amp:
            logits = forward(batch)
            logits = logits[0] if isinstance(logits, tuple) else logits
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    flops = flops_per_step(cfg, training, batch_size) / dt
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"{name:>13}: batch {batch_size}, {dt * 1e3:7.2f} ms/step, {n_tokens / dt:12,.0f} tokens/s, "
          f"{flops / 1e12:6.2f} TFLOP/s = {100 * flops / (peak_tflops * 1e12):6.3f}% of {peak_tflops:g} TFLOP/s bf16 peak{mem}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", dest="device_given", default=None, help="default: cuda if available, else a CPU smoke run")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-scale", type=float, default=1.0, help="fraction of the paper batch size")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    args = p.parse_args()
    device = torch.device(args.device_given or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), "| flash SDPA enabled:", torch.backends.cuda.flash_sdp_enabled(),
              "| mem-efficient SDPA enabled:", torch.backends.cuda.mem_efficient_sdp_enabled())
    if device.type == "cpu" and args.device_given is None:
        print("No GPU here: running the small smoke size on the CPU (--steps 2 --batch-scale 0.02); pass --device cpu "
              "to time the CPU at other sizes.")
        args.steps, args.batch_scale = 2, 0.02
    for name, model in (("AD", "ad_dr"), ("CompressedAD", "ad_compressed_dr")):
        cfg = composed_cfg(model)
        for compiled in ((False, True) if args.compile else (False,)):
            bench(name + (" compiled" if compiled else ""), cfg, device, args.batch_scale, args.steps, compiled, args.peak_tflops)


if __name__ == "__main__":
    main()
