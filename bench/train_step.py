"""Training-step cost, in one run: training targets per second of CompressedAD against AD with its raw
window (40) and with a long window (240), on Darkroom and on Dark Key-to-Door; CompressedAD's cost per
target at shallow and deep history positions; and the project's AD step against a bare PyTorch transformer
of identical shape.

    python bench/train_step.py [--steps 20] [--envs darkroom dark_key_to_door] [extra hydra overrides for CompressedAD ...]

"Project step" = batch gathering from the real dataset + forward + backward + clipping + AdamW, as in
train.py. "Targets" = the action predictions the loss is taken on (targets not equal to -100). CompressedAD
runs at its quick preset (96 lanes, one segment each a step) and at the AD-240 batch of histories (16 lanes,
6 segments each: about AD-240's targets a step); "shallow" / "deep" put every lane at segment 10 / the
second-to-last segment of its histories. "Bare" = nn.TransformerEncoder (same width, depth, heads, MLP,
pre-LN, dropout on the residual branches only, as the project's blocks: no attention-weight dropout) on
random inputs with the same loss and optimizer. The machines are shared and noisy, so the models' steps are
timed interleaved, round after round, and each figure is a median over rounds: ratios compare like with like.
Needs the quick datasets (python collect.py experiment=quick [env=dark_key_to_door]).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
from hydra import compose, initialize_config_dir

from dataset import HistoryLanes, build_dataset, load_histories
from env import make_env_spec
from model import build_model
from model.tokens import token_dim
from utils.lanes import exact_memory
from utils.loop import action_loss


def cfg_for(env: str, model: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose("train", ["experiment=quick", f"env={env}", f"model={model}", *extra])


def project_step(cfg, at_segment: int | None = None):
    """A train.py step of this config on its real dataset; returns a function that runs one and gives its targets.
    at_segment: every CompressedAD lane reads its segments from there on (None: the lanes' own staggered starts)."""
    spec = make_env_spec(cfg.env)
    data = build_dataset(cfg.model, cfg.training, load_histories(cfg, "train"))
    model = build_model(cfg.model, spec.n_states, spec.n_actions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    state = {"step": 0}
    if isinstance(data, HistoryLanes):
        lanes = np.arange(data.n_lanes)
        state["carried"] = exact_memory(model, data, 0, lanes, "cpu")

    def step() -> int:
        if isinstance(data, HistoryLanes):
            if at_segment is None:
                batch = data.batch(state["step"], lanes)
            else:  # histories 0 .. L - 1, each at segments at_segment, at_segment + 1, ...
                S = data.segments_per_step
                batch = data.segments(np.repeat(lanes[:, None], S, 1), np.full((len(lanes), S), at_segment) + np.arange(S))
                state["carried"] = (state["carried"][0], torch.zeros(len(lanes), dtype=torch.bool))  # a memory to compress
            batch["memory"], batch["memory_empty"] = state["carried"]
        else:
            batch = data.__getitems__(rng.integers(0, len(data), cfg.training.train_batch_size))
        loss, logs, carried = action_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if carried is not None:
            state["carried"] = carried
        state["step"] += 1
        return int(logs["n_targets"])

    return step


def bare_step(T: int, n_embd: int, n_layer: int, n_head: int, dropout: float, batch_size: int, in_dim: int):
    layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, activation="gelu", batch_first=True, norm_first=True)
    layer.self_attn.dropout = 0.0  # like the project's blocks: dropout on the residual branches, not on attention weights
    layer.dropout = nn.Identity()  # (nor inside the MLP)
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


def interleaved(steps: dict, rounds: int) -> dict:
    """Median seconds per step and mean targets per step of each step function, timed round-robin after 3 warm-ups."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    seconds, targets = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            targets[name].append(fn())
            seconds[name].append(time.perf_counter() - t0)
    return {k: (float(np.median(seconds[k])), float(np.mean(targets[k]))) for k in steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="rounds: timed steps of every model")
    p.add_argument("--envs", nargs="+", default=["darkroom", "dark_key_to_door"])
    args, extra = p.parse_known_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, median of {args.steps} interleaved rounds per env")
    per_target = {}
    for env in args.envs:
        ad, cad = "ad_dr", "ad_compressed_dr"  # the model files serve every env
        cfgs = {
            "AD, window 40": cfg_for(env, ad, "model.n_transit=40"),
            "AD, window 240": cfg_for(env, ad, "model.n_transit=240", "training.train_batch_size=16"),
            "CompressedAD (preset)": cfg_for(env, cad, *extra),
            "CompressedAD, 16 lanes x 6": cfg_for(env, cad, "training.train_batch_size=16", "training.segments_per_step=6", *extra),
        }
        steps = {name: project_step(cfg) for name, cfg in cfgs.items()}
        n_segments = build_dataset(cfgs["CompressedAD (preset)"].model, cfgs["CompressedAD (preset)"].training, load_histories(cfgs["AD, window 40"], "train")).n_segments
        S = cfgs["CompressedAD (preset)"].training.segments_per_step
        # both past episode 10, where source noise (context, never a target) begins; the last segment is short
        steps["CompressedAD, shallow"] = project_step(cfgs["CompressedAD (preset)"], at_segment=10)
        steps["CompressedAD, deep"] = project_step(cfgs["CompressedAD (preset)"], at_segment=n_segments - 1 - S)
        a = cfgs["AD, window 240"].model
        steps["bare nn.TransformerEncoder, AD-240 shape"] = bare_step(a.n_transit, a.tf_n_embd, a.tf_n_layer, a.tf_n_head, a.tf_dropout,
                                                                      a.train_batch_size, token_dim(81, 5))
        res = interleaved(steps, args.steps)
        print(f"\n{env} ({n_segments} segments a history):")
        for name, (sec, targets) in res.items():
            print(f"  {name:42s} {1000 * sec:7.1f} ms/step, {targets:6.0f} targets/step, {targets / sec:7.0f} targets/s, "
                  f"{1e6 * sec / targets:6.1f} us/target", flush=True)
        rate = {k: t / s for k, (s, t) in res.items()}
        us = {k: 1e6 * s / t for k, (s, t) in res.items()}
        per_target[env] = us["CompressedAD (preset)"]
        print(f"  CompressedAD targets/s / AD-240's: preset {rate['CompressedAD (preset)'] / rate['AD, window 240']:.2f}, "
              f"16 lanes x 6 {rate['CompressedAD, 16 lanes x 6'] / rate['AD, window 240']:.2f}; "
              f"/ AD-40's: preset {rate['CompressedAD (preset)'] / rate['AD, window 40']:.2f}")
        print(f"  CompressedAD deep / shallow: step time {res['CompressedAD, deep'][0] / res['CompressedAD, shallow'][0]:.2f}, "
              f"cost per target {us['CompressedAD, deep'] / us['CompressedAD, shallow']:.2f}")
        print(f"  AD-240 project step / bare nn.TransformerEncoder of the same shape = "
              f"{res['AD, window 240'][0] / res['bare nn.TransformerEncoder, AD-240 shape'][0]:.2f}")
    if len(per_target) == 2:
        print(f"\nCompressedAD (preset) seconds per training target, Key-to-Door / Darkroom = "
              f"{per_target['dark_key_to_door'] / per_target['darkroom']:.2f} (histories of 6000 / 2000 steps)")


if __name__ == "__main__":
    main()
