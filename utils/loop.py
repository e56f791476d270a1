"""The training loop's parts both stages share (train.py, pretrain_encoder.py), and stage 2's objective (action_loss).
Each script's loop body stays in the script, top-down: batch -> loss -> `optimizer_step` -> logging -> evaluation ->
checkpoint."""
from __future__ import annotations

import sys
from itertools import count

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from model.tokens import NO_TARGET
from utils.errors import TrainingError
from utils.run import config_as_markdown, cosine_schedule


def make_accelerator(mixed_precision: str, find_unused_parameters: bool = False) -> Accelerator:
    """CPU when CUDA is absent (the same launch config serves both); DDP told when some parameters go unused."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, kwargs_handlers=[ddp])


def cosine_scheduler(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up, then cosine decay to lr * min_lr_ratio; stepped by hand once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, warmup_steps, total_steps, min_lr_ratio))


def epoch_batches(loader, generator: torch.Generator, seed: int, step: int, accelerator):
    """A shuffled loader's batches from optimizer step `step` on. The data order is a function of (seed, epoch), so a
    resume skips the batches its run had already seen in the epoch and then reads what it would have read."""
    batches_per_epoch = len(loader)
    for epoch in count(step // batches_per_epoch):
        generator.manual_seed(seed * 1_000_003 + epoch)
        loader.set_epoch(epoch)
        done_in_epoch = max(0, step - epoch * batches_per_epoch)
        yield from accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader


def load_train_state(ckpt: dict, model, optimizer, scheduler) -> int:
    """Weights, optimizer and scheduler from a checkpoint; returns its step."""
    model.load_state_dict(ckpt["model_state_dict"])
    optimizer.load_state_dict(ckpt["optimizer_state_dict"])
    scheduler.load_state_dict(ckpt["scheduler_state_dict"])
    return int(ckpt["global_step"])


def action_loss(model, batch: dict) -> tuple[torch.Tensor, dict, tuple | None]:
    """Cross-entropy of the predicted actions (NO_TARGET targets are ignored), a flat log dict, and what
    the model carries into the next step (CompressedAD's lane memory; None for AD)."""
    out = model(batch)
    logits, carried = out if isinstance(out, tuple) else (out, None)
    targets = batch["target_actions"]
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=NO_TARGET, reduction="none")
    valid = targets != NO_TARGET
    loss = per_token.sum() / valid.sum()
    acc = (logits.argmax(-1) == targets)[valid].float().mean()
    return loss, {"loss_action": loss.detach(), "acc_action": acc.detach(), "n_targets": valid.sum().float()}, carried


def optimizer_step(accelerator, model, optimizer, scheduler, loss: torch.Tensor, max_grad_norm: float, step: int,
                   fix: str) -> torch.Tensor:
    """Backward, clip, AdamW and scheduler step; returns the gradient norm before clipping. A loss that is not
    finite stops training before it reaches the weights, naming the step and `fix`."""
    if not torch.isfinite(loss):
        raise TrainingError(f"Loss is {loss.item()} at step {step}: stopped. The checkpoints written before are intact; {fix}.")
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class MeanLogs:
    """Scalars summed over the steps between two log points, then averaged over steps and ranks."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def reduce(self, accelerator, keys=None, summed=()) -> dict:
        """Mean over steps and ranks of `keys` (default: all but `summed`); `summed` keys: the total over steps and
        ranks. Starts the next window."""
        keys = [k for k in (keys or sorted(self.sums)) if k not in summed]
        as_tensor = lambda v: torch.as_tensor(v, device=accelerator.device, dtype=torch.float32)
        out = {k: accelerator.reduce(as_tensor(self.sums[k] / self.n), reduction="mean").item() for k in keys}
        out.update({k: accelerator.reduce(as_tensor(self.sums[k]), reduction="sum").item() for k in summed})
        self.sums, self.n = {}, 0
        return out


def progress_bar(total: int, initial: int, accelerator, desc: str):
    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc=desc,
                mininterval=0.5 if sys.stderr.isatty() else 30)


def open_writer(run_dir, accelerator, cfg, step: int, resumed: bool) -> SummaryWriter | None:
    """The main process's TensorBoard writer, the config as text; a resume drops points logged after its checkpoint."""
    if not accelerator.is_main_process:
        return None
    writer = SummaryWriter(str(run_dir), purge_step=step + 1 if resumed else None)
    writer.add_text("config", config_as_markdown(cfg))
    return writer
