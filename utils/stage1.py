"""The hand-off between stage 1 (pretrain_encoder.py) and stage 2 (train.py).

A stage-1 checkpoint is a dict with exactly the keys in `STAGE1_KEYS`: the state dicts of the three
parts CompressedAD shares with the pre-training model (`encoder`, `embed_context`, `embed_ln`), the
step, and the resolved config as plain containers.
"""
from __future__ import annotations

import torch

from utils.errors import CheckpointError
from utils.io import load_checkpoint

STAGE1_PARTS = ("encoder", "embed_context", "embed_ln")
STAGE1_KEYS = ("encoder_state_dict", "embed_context_state_dict", "embed_ln_state_dict", "global_step", "config")


def stage1_checkpoint(model: torch.nn.Module, global_step: int, config: dict) -> dict:
    ckpt = {f"{part}_state_dict": getattr(model, part).state_dict() for part in STAGE1_PARTS}
    ckpt.update(global_step=global_step, config=config)
    return ckpt


def load_stage1(model: torch.nn.Module, path, env_cfg: dict | None = None) -> dict:
    """Copy a stage-1 checkpoint into `model`'s encoder and embeddings; refuse, naming every
    missing, unexpected or mis-shaped key, when it does not fit, or when it was pre-trained on
    another env than `env_cfg` (the shapes of two grid tasks can match). Returns what was loaded."""
    what = "pretrained encoder checkpoint (model.pretrained_encoder_path)"
    ckpt = load_checkpoint(path, what, required_keys=STAGE1_KEYS)
    trained_on = ckpt["config"].get("env", {})
    if env_cfg is not None and trained_on != env_cfg:
        differ = {k: (trained_on.get(k), env_cfg.get(k)) for k in sorted(trained_on.keys() | env_cfg.keys())
                  if trained_on.get(k) != env_cfg.get(k)}
        raise CheckpointError(f"{what} '{path}' was pre-trained on another env config; (checkpoint, this run) differ in {differ}. "
                              f"Pre-train on this env (the same env=... overrides) or point to a matching checkpoint.")
    problems = []
    for part in STAGE1_PARTS:
        expected, given = getattr(model, part).state_dict(), ckpt[f"{part}_state_dict"]
        problems += [f"{part}.{k}: missing in the checkpoint" for k in expected.keys() - given.keys()]
        problems += [f"{part}.{k}: not in this model" for k in given.keys() - expected.keys()]
        problems += [f"{part}.{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if problems:
        arch = {k: ckpt["config"].get("model", {}).get(k) for k in ("tf_n_embd", "n_latent", "encoder_n_layer",
                                                                      "encoder_n_head", "max_compress_length")}
        raise CheckpointError(
            f"{what} '{path}' does not fit this CompressedAD:\n  - " + "\n  - ".join(sorted(problems)[:20])
            + f"\nIt was pre-trained with {arch}; pre-train with the same model sizes (the same experiment=...) "
            "or point to a matching checkpoint."
        )
    for part in STAGE1_PARTS:
        getattr(model, part).load_state_dict(ckpt[f"{part}_state_dict"])
    n_params = sum(p.numel() for part in STAGE1_PARTS for p in getattr(model, part).parameters())
    return {"path": str(path), "global_step": int(ckpt["global_step"]), "n_params": n_params}


def freeze_stage1(model: torch.nn.Module) -> int:
    """Freeze encoder, embed_context and embed_ln (the token embedding is shared with the decoder, so
    the decoder's input embedding stays fixed too). Returns the number of frozen parameters."""
    frozen = 0
    for part in STAGE1_PARTS:
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
