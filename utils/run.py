"""Run directories and training helpers shared by train.py and pretrain_encoder.py."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from utils.errors import RunDirError, UserError
from utils.io import atomic_write_text


def _has_outputs(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def prepare_run_dir(cfg: DictConfig, accelerator) -> Path:
    """runs/<run_name>/, refusing to write into an existing run unless resume or overwrite is asked.

    Every rank decides from the file system before any rank writes, so all ranks agree.
    `overwrite=true` moves the old run aside (`<run_dir>.replaced-<time>`); nothing is deleted.
    """
    run_dir = Path(cfg.run_root) / str(cfg.run_name)  # run_name=1 arrives as an int
    exists = _has_outputs(run_dir)
    resume, overwrite = bool(cfg.get("resume", False)), bool(cfg.get("overwrite", False))
    accelerator.wait_for_everyone()
    if exists and not resume and not overwrite:
        raise RunDirError(
            f"Run dir '{run_dir}' already holds a run. Continue it with resume=true, start a new one with "
            f"run_name=<new name>, or move it aside with overwrite=true."
        )
    if resume and not exists:
        raise RunDirError(f"resume=true but run dir '{run_dir}' holds no run to resume. Drop resume=true or fix run_name.")
    if accelerator.is_main_process:
        if exists and overwrite and not resume:
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config as plain containers: loadable with torch.load(weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)


def cosine_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas, params=None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases or LayerNorm gains); fused on CUDA."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def prepare_for_training(accelerator, model, optimizer, loader):
    """accelerator.prepare, minus the DistributedDataParallel wrapper Accelerate puts even around a single
    CPU process (`accelerate launch --num_processes 1` with a multi-process config): with nothing to
    synchronise it only costs time. Mixed-precision autocast is applied to the inner model, so it stays."""
    if loader is None:  # CompressedAD's lanes feed each rank its own histories
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if accelerator.num_processes == 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model, optimizer, loader


def newest_checkpoint(run_dir: Path, prefix: str) -> Path | None:
    """<prefix>-final.pt, else the <prefix>-step<N>.pt with the largest N (temporary files are hidden, never listed)."""
    if (run_dir / f"{prefix}-final.pt").is_file():
        return run_dir / f"{prefix}-final.pt"
    steps = sorted((int(p.stem.removeprefix(f"{prefix}-step")), p) for p in run_dir.glob(f"{prefix}-step*.pt")
                   if p.stem.removeprefix(f"{prefix}-step").isdigit())
    return steps[-1][1] if steps else None


def rng_states(accelerator) -> list:
    """Every rank's torch RNG state (dropout draws), gathered to all ranks."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object

    return gather_object([state])


def restore_rng_states(accelerator, states: list) -> None:
    """Put every rank's RNG back; with another number of processes an exact resume is impossible: say so."""
    if len(states) != accelerator.num_processes:
        if accelerator.is_main_process:
            print(f"Resuming with {accelerator.num_processes} processes from a run with {len(states)}: "
                  "dropout draws will differ from an uninterrupted run.")
        return
    state = states[accelerator.process_index]
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def config_as_markdown(cfg: DictConfig) -> str:
    return "```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```"


def exit_on_user_error(fn, cfg) -> None:
    """Run a script's main function; a bad input (missing file, clashing config, ...) ends the
    process with its message and exit code 1 instead of a stack trace. Bugs still raise."""
    try:
        fn(cfg)
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)

