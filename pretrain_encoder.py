"""Stage 1: pre-train CompressedAD's compression encoder and token embedding by autoencoding.

    python pretrain_encoder.py experiment=quick
    accelerate launch --config_file accelerate_config.yaml pretrain_encoder.py

Samples chains of 1-3 compressions from the learning histories. At every stage the encoder maps
[previous latents | chunk] to new latents, and a small `ReconstructionDecoder` must recover from
those latents (a) the encoder's input in latent space, MSE against *detached* targets: the previous
latents and the embedded chunk tokens, and (b) each chunk token's raw state, previous action and
previous reward (cross-entropy). (b) cannot be satisfied by a collapsed encoder or collapsed
embeddings, which would make (a) trivial. Two optional terms aim at what stage 2's carried memory
needs: retention (`pretrain_retention_weight`: every older chunk of a chain decoded straight from
its final latents) and task content (`pretrain_contrastive_weight`: InfoNCE between the final
latents of two chains of the same task, other tasks as negatives). Writes
`encoder-pretrained-step<N>.pt` and `encoder-pretrained-final.pt` with exactly the keys train.py
loads (see utils/stage1.py).
"""
from __future__ import annotations

import time

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dataset import load_histories
from dataset_pretrain import ADCompressedPretrainDataset, collate_pretrain_batch
from env import make_env_spec
from model import model_config
from model.ad_compressed import CompressionEncoder
from model.tokens import (
    NO_TARGET,
    PREV_ACTION,
    PREV_REWARD,
    STATE,
    token_dim,
    token_features,
)
from model.transformer import Transformer, init_weights
from utils.errors import RunDirError, UserConfigError
from utils.io import atomic_torch_save, load_checkpoint
from utils.loop import (
    MeanLogs,
    cosine_scheduler,
    epoch_batches,
    load_train_state,
    make_accelerator,
    open_writer,
    optimizer_step,
    progress_bar,
)
from utils.run import (
    exit_on_user_error,
    make_optimizer,
    newest_checkpoint,
    plain_config,
    prepare_for_training,
    prepare_run_dir,
    restore_rng_states,
    rng_states,
)
from utils.stage1 import stage1_checkpoint


class ReconstructionDecoder(nn.Module):
    """Reads latents; reconstructs the previous latents and the chunk (embeddings and raw fields).

    One bidirectional transformer over [latents | previous-latent slots | chunk slots]; each slot is a
    learned query, read out by linear heads.
    """

    def __init__(self, n_latent: int, n_embd: int, n_layer: int, n_head: int, max_chunk_length: int,
                 n_states: int, n_actions: int, max_age: int = 0):
        super().__init__()
        self.n_latent = n_latent
        self.latent_slots = nn.Parameter(torch.randn(n_latent, n_embd) * 0.02)
        self.chunk_slots = nn.Embedding(max_chunk_length, n_embd)
        # retention: which chunk to decode, counted in compressions back from the latents' own (0 = the newest)
        self.age_embedding = nn.Embedding(max_age + 1, n_embd) if max_age else None
        self.transformer = Transformer(n_embd, n_layer, n_head, dropout=0.0)
        self.embedding_head = nn.Linear(n_embd, n_embd)
        self.state_head = nn.Linear(n_embd, n_states)
        self.action_head = nn.Linear(n_embd, n_actions)
        self.reward_head = nn.Linear(n_embd, 1)
        self.apply(init_weights)

    def forward(self, latents: torch.Tensor, chunk_length: int, age: torch.Tensor | None = None) -> dict:
        B = latents.shape[0]
        chunk_slots = self.chunk_slots.weight[:chunk_length].expand(B, -1, -1)
        if age is not None:
            chunk_slots = chunk_slots + self.age_embedding(age)[:, None]
        x = torch.cat([latents, self.latent_slots.expand(B, -1, -1), chunk_slots], dim=1)
        y, _ = self.transformer(x)
        prev, chunk = y[:, self.n_latent : 2 * self.n_latent], y[:, 2 * self.n_latent :]
        return {
            "prev_latents": self.embedding_head(prev),
            "chunk_embeddings": self.embedding_head(chunk),
            "state_logits": self.state_head(chunk),
            "action_logits": self.action_head(chunk),
            "reward_logits": self.reward_head(chunk).squeeze(-1),
        }


class EncoderPretrainModel(nn.Module):
    """The parts CompressedAD shares (`embed_context`, `embed_ln`, `encoder`, same classes, same
    config) plus what only stage 1 trains, discarded afterwards: the `ReconstructionDecoder` and,
    for the task-contrastive objective, a projection `task_head` of the final latents."""

    def __init__(self, n_states: int, n_actions: int, mcfg):
        super().__init__()
        self.n_states, self.n_actions = n_states, n_actions
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), mcfg.tf_n_embd)
        self.embed_ln = nn.LayerNorm(mcfg.tf_n_embd)
        self.encoder = CompressionEncoder.from_config(model_config(mcfg))
        max_age = mcfg.pretrain_max_depth - 1 if mcfg.pretrain_retention_weight > 0 else 0
        self.decoder = ReconstructionDecoder(mcfg.n_latent, mcfg.tf_n_embd, mcfg.pretrain_decoder_n_layer,
                                             mcfg.tf_n_head, mcfg.max_compress_length, n_states, n_actions, max_age)
        self.task_head = (nn.Sequential(nn.Linear(mcfg.tf_n_embd, mcfg.tf_n_embd), nn.GELU(), nn.Linear(mcfg.tf_n_embd, mcfg.tf_n_embd))
                          if mcfg.pretrain_contrastive_weight > 0 else None)
        self.embed_context.apply(init_weights)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_ln(self.embed_context(token_features(tokens, self.n_states, self.n_actions)))

    def forward(self, batch: dict) -> dict:
        """One pass over a batch (one forward a step, as DistributedDataParallel expects): per stage the
        predictions, targets and masks; each chain's final `latents`; with retention, every older chunk decoded
        from them; with the contrastive head, the task embeddings of the chains and of their positives."""
        chunks, lengths = batch["chunks"], batch["chunk_lengths"]
        B = chunks.shape[0]
        if self.task_head is not None:  # the positive chains ride along, compressed but not decoded
            chunks, lengths = torch.cat([chunks, batch["positive_chunks"]]), torch.cat([lengths, lengths])
        stages, latents = self.compress(chunks, lengths, n_decode=B)
        out = {"stages": stages, "latents": latents[:B]}
        if self.decoder.age_embedding is not None:
            out["older"] = self.decode_older(batch, latents[:B])
        if self.task_head is not None:
            z = F.normalize(self.task_head(latents.mean(1)), dim=-1)
            out["task_embeddings"], out["positive_task_embeddings"] = z[:B], z[B:]
        return out

    def compress(self, chunks: torch.Tensor, lengths: torch.Tensor, n_decode: int) -> tuple[list[dict], torch.Tensor]:
        """Run every stage of every chain, decoding the first `n_decode` chains at each stage."""
        latents = self.encoder.empty_memory(chunks.shape[0])
        positions = torch.arange(chunks.shape[2], device=chunks.device)
        stages = []
        for j in range(chunks.shape[1]):
            idx = torch.nonzero(lengths[:, j] > 0).squeeze(1)
            if idx.numel() == 0:
                break
            L = int(lengths[idx, j].max())
            embedded = self.embed(chunks[idx, j, :L])
            valid = positions[:L] < lengths[idx, j, None]
            prev = latents[idx]
            new = self.encoder(prev, embedded, valid)
            d = int((idx < n_decode).sum())  # idx is sorted: its first d rows are decoded
            stages.append({
                "depth": j + 1, "latents": new[:d], "pred": self.decoder(new[:d], L), "tokens": chunks[idx[:d], j, :L], "valid": valid[:d],
                "target_chunk": embedded[:d].detach(), "target_prev": prev[:d].detach() if j > 0 else None,
            })
            latents = latents.index_put((idx,), new) if idx.numel() < chunks.shape[0] else new
        return stages, latents

    def decode_older(self, batch: dict, latents: torch.Tensor) -> list[tuple]:
        """Every older chunk of a chain decoded straight from the chain's final latents, told its age in compressions:
        (predictions, tokens, valid, age) per chunk position."""
        chunks, lengths, depth = batch["chunks"], batch["chunk_lengths"], batch["depth"]
        out = []
        for j in range(chunks.shape[1] - 1):
            idx = torch.nonzero(depth > j + 1).squeeze(1)
            if idx.numel() == 0:
                continue
            L = int(lengths[idx, j].max())
            valid = torch.arange(L, device=chunks.device) < lengths[idx, j, None]
            age = depth[idx] - 1 - j
            out.append((self.decoder(latents[idx], L, age=age), chunks[idx, j, :L], valid, age))
        return out


def field_losses(pred: dict, tokens: torch.Tensor, valid: torch.Tensor) -> dict:
    """Cross-entropy of a decoded chunk's raw fields: state, previous action, previous reward. No constant predicts
    them, so a collapsed encoder cannot satisfy this."""
    v = valid.float()
    state_t = tokens[..., STATE].long().masked_fill(~valid, NO_TARGET)
    action_t = tokens[..., PREV_ACTION].long().masked_fill(~valid | (tokens[..., PREV_ACTION] < 0), NO_TARGET)
    return {
        "ce_state": F.cross_entropy(pred["state_logits"].transpose(1, 2), state_t, ignore_index=NO_TARGET),
        "ce_action": F.cross_entropy(pred["action_logits"].transpose(1, 2), action_t, ignore_index=NO_TARGET),
        "bce_reward": (F.binary_cross_entropy_with_logits(pred["reward_logits"], tokens[..., PREV_REWARD].clamp(0, 1),
                                                          reduction="none") * v).sum() / v.sum(),
    }


def stage_losses(stage: dict) -> dict:
    """MSE in latent space against detached targets, and cross-entropy on the chunk's raw fields."""
    pred, valid = stage["pred"], stage["valid"]
    v = valid.float()
    out = {"mse_chunk": (((pred["chunk_embeddings"] - stage["target_chunk"]) ** 2).mean(-1) * v).sum() / v.sum()}
    if stage["target_prev"] is not None:
        out["mse_latents"] = ((pred["prev_latents"] - stage["target_prev"]) ** 2).mean()
    return {**out, **field_losses(pred, stage["tokens"], valid)}


def retention_loss(older: list) -> torch.Tensor:
    """Retention: the raw fields of every older chunk, decoded from the chain's final latents, so what the newest
    compressions overwrite is penalised directly (mean over chunk positions)."""
    return torch.stack([sum(field_losses(pred, tokens, valid).values()) for pred, tokens, valid, _ in older]).mean()


def contrastive_logits(out: dict, task: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, B] similarities of each chain's task embedding to every positive's (row b's positive is column b); other
    chains of the same task are masked out of the negatives."""
    logits = out["task_embeddings"] @ out["positive_task_embeddings"].T / temperature
    same_task = (task[:, None] == task[None, :]) & ~torch.eye(len(task), dtype=torch.bool, device=task.device)
    return logits.masked_fill(same_task, float("-inf"))


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways. Constant latents give log(number of candidates): a collapsed encoder cannot satisfy it."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain_loss(out: dict, batch: dict, mcfg) -> tuple[torch.Tensor, dict]:
    """The stage-1 objective: the seed's autoencoding of every stage (always on: it keeps the latents about their
    input), plus the retention and task-contrastive terms where their weights are > 0."""
    stages, logs = out["stages"], {}
    for stage in stages:
        for k, value in stage_losses(stage).items():
            logs[k] = logs.get(k, 0.0) + value / len(stages)
    mse = logs["mse_chunk"] + logs.get("mse_latents", 0.0)
    ce = logs["ce_state"] + logs["ce_action"] + logs["bce_reward"]
    total = mcfg.pretrain_mse_weight * mse + mcfg.pretrain_ce_weight * ce
    if out.get("older"):
        logs["retention_ce"] = retention_loss(out["older"])
        total = total + mcfg.pretrain_retention_weight * logs["retention_ce"]
    if "task_embeddings" in out:
        logs["contrastive"] = contrastive_loss(contrastive_logits(out, batch["task"], mcfg.pretrain_contrastive_temperature))
        total = total + mcfg.pretrain_contrastive_weight * logs["contrastive"]
    return total, {k: float(v.detach()) for k, v in logs.items()}


def centred_correlation(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[float, float, float]:
    """Pearson correlation with each (slot, dim) centred over samples; returns the sums that make it
    (cross, pred^2, target^2) so batches can be pooled. Constant predictions give 0."""
    v = valid[..., None].float()
    n = v.sum(0).clamp(min=1)
    pc = (pred - (pred * v).sum(0) / n) * v
    tc = (target - (target * v).sum(0) / n) * v
    return float((pc * tc).sum()), float((pc**2).sum()), float((tc**2).sum())


@torch.no_grad()
def validate(model: EncoderPretrainModel, batches: list[dict]) -> dict:
    """Held-out metrics: reconstruction correlation, how much raw history is recoverable per depth, and, with
    those objectives, retention accuracy by age and task retrieval.

    Recoverability at depth d: from a chain's final latents, reconstruct the previous latents d-1
    times with the decoder, then decode the chunk compressed d stages ago; report its state and
    action accuracy (chance: ~1/81 and ~0.2-0.5 for a constant guess).
    """
    was_training = model.training
    model.eval()
    sums = {"latents": np.zeros(3), "chunks": np.zeros(3)}
    hits = {}

    def count(name: str, correct: torch.Tensor) -> None:
        h = hits.setdefault(name, [0, 0])
        h[0] += int(correct.sum())
        h[1] += int(correct.numel())

    for batch in batches:
        out = model(batch)
        for pred, tokens, valid, age in out.get("older", ()):  # retention: older chunks decoded directly
            target = tokens[..., PREV_ACTION].long()
            correct = pred["action_logits"].argmax(-1) == target
            for a in age.unique().tolist():
                count(f"retention_action_acc_age{a}", correct[(age == a)[:, None] & valid & (target >= 0)])
        if "task_embeddings" in out:  # which of the batch's positives is this chain's task (chance ~1/batch)
            logits = contrastive_logits(out, batch["task"], 1.0)
            count("task_retrieval_acc", logits.argmax(1) == torch.arange(len(logits), device=logits.device))
        for stage in out["stages"]:
            # the baseline: each chain decoded from another chain's latents (what the metric gives without information)
            other = model.decoder(stage["latents"].roll(1, dims=0), stage["valid"].shape[1])
            for pred, key in ((stage["pred"], ""), (other, "shuffled_")):
                parts = [(f"{key}chunks", pred["chunk_embeddings"], stage["target_chunk"], stage["valid"])]
                if stage["target_prev"] is not None:
                    prev_valid = torch.ones(stage["target_prev"].shape[:2], dtype=torch.bool, device=stage["valid"].device)
                    parts.append((f"{key}latents", pred["prev_latents"], stage["target_prev"], prev_valid))
                for name, p, t, v in parts:
                    sums[name] = sums.get(name, np.zeros(3)) + centred_correlation(p, t, v)
        # recoverability: deepest chains only, walked back from their final latents
        deep = torch.nonzero(batch["depth"] == batch["chunk_lengths"].shape[1]).squeeze(1)
        D = batch["chunk_lengths"].shape[1]
        if deep.numel() == 0:
            continue
        chunks, lengths = batch["chunks"][deep], batch["chunk_lengths"][deep]
        latents = model.encoder.empty_memory(len(deep))
        for j in range(D):
            L = int(lengths[:, j].max())
            valid = torch.arange(L, device=chunks.device) < lengths[:, j, None]
            latents = model.encoder(latents, model.embed(chunks[:, j, :L]), valid)
        for age in range(1, D + 1):
            j = D - age
            L = int(lengths[:, j].max())
            valid = torch.arange(L, device=chunks.device) < lengths[:, j, None]
            pred = model.decoder(latents, L)
            tokens = chunks[:, j, :L]
            for field, logits_key, col in (("state", "state_logits", STATE), ("action", "action_logits", PREV_ACTION)):
                target = tokens[..., col].long()
                count(f"{field}_acc_depth{age}", (pred[logits_key].argmax(-1) == target)[valid & (target >= 0)])
            latents = pred["prev_latents"]
    model.train(was_training)
    corr = lambda c: c[0] / max(np.sqrt(c[1] * c[2]), 1e-12)
    out = {f"correlation_{name}": corr(c) for name, c in sums.items() if not name.startswith("shuffled_")}
    out["correlation"] = corr(sums["latents"] + sums["chunks"])
    out["correlation_shuffled"] = corr(sums.get("shuffled_latents", 0) + sums["shuffled_chunks"])
    out.update({k: h[0] / max(1, h[1]) for k, h in hits.items()})
    return out


def save_stage1(run_dir, name: str, accelerator, model, optimizer, scheduler, step: int, cfg: DictConfig) -> None:
    """The stage-1 checkpoint (exactly the keys train.py loads) and, beside it, the full training
    state that `resume=true` needs (reconstruction decoder, optimizer, scheduler, RNG)."""
    states = rng_states(accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        atomic_torch_save({
            "model_state_dict": raw.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(), "rng_states": states, "global_step": step,
            "config": plain_config(cfg),
        }, run_dir / f"training-state-{name}.pt")
        atomic_torch_save(stage1_checkpoint(raw, step, plain_config(cfg)), run_dir / f"encoder-pretrained-{name}.pt")
    accelerator.wait_for_everyone()


def pretrain_encoder(cfg: DictConfig) -> dict:
    accelerator = make_accelerator(cfg.mixed_precision)
    mcfg, world = cfg.model, accelerator.num_processes
    try:
        spec = make_env_spec(cfg.env)
        model_config(mcfg)  # the architecture stage 2 will build, validated
    except ValueError as e:
        raise UserConfigError(str(e)) from None
    if mcfg.get("pretrained_encoder_path") or mcfg.get("freeze_encoder"):  # inherited from stage 2's model file
        raise UserConfigError("model.pretrained_encoder_path / model.freeze_encoder set stage 2's start (train.py); "
                              "stage 1 trains the encoder from scratch: drop them here and pass them to train.py.")
    if mcfg.pretrain_retention_weight > 0 and mcfg.pretrain_max_depth < 2:
        raise UserConfigError("model.pretrain_retention_weight > 0 decodes older chunks of a chain: it needs "
                              f"model.pretrain_max_depth >= 2 (got {mcfg.pretrain_max_depth}).")
    if mcfg.pretrain_batch_size < world or mcfg.pretrain_batch_size % world:
        raise UserConfigError(f"model.pretrain_batch_size={mcfg.pretrain_batch_size} must be a positive multiple of the "
                              f"number of processes ({world}).")
    histories = load_histories(cfg, "train")
    make = lambda split, seed: ADCompressedPretrainDataset(histories, mcfg, split, mcfg.pretrain_val_streams,
                                                           mcfg.pretrain_depth_weights, seed=seed,
                                                           n_val_tasks=mcfg.pretrain_val_tasks,
                                                           positives=mcfg.pretrain_contrastive_weight > 0)
    train_set, val_set = make("train", cfg.seed), make("val", cfg.seed + 1)
    run_dir = prepare_run_dir(cfg, accelerator)

    set_seed(cfg.seed)
    model = EncoderPretrainModel(spec.n_states, spec.n_actions, mcfg)
    optimizer = make_optimizer(model, mcfg.pretrain_lr, mcfg.pretrain_weight_decay, mcfg.pretrain_betas)
    scheduler = cosine_scheduler(optimizer, mcfg.pretrain_warmup_steps, mcfg.pretrain_steps, mcfg.pretrain_min_lr_ratio)
    generator = torch.Generator()  # reseeded every epoch: the data order is a function of (seed, epoch)
    loader = DataLoader(train_set, batch_size=mcfg.pretrain_batch_size // world, shuffle=True, drop_last=True,
                        collate_fn=collate_pretrain_batch, generator=generator)
    step, resumed = 0, None
    if cfg.resume:
        path = newest_checkpoint(run_dir, "training-state")
        if path is None:
            raise RunDirError(f"resume=true but '{run_dir}' holds no training state yet. Start afresh with overwrite=true.")
        resumed = load_checkpoint(path, "pre-training state to resume", required_keys=("model_state_dict", "global_step"))
        step = load_train_state(resumed, model, optimizer, scheduler)
    model, optimizer, loader = prepare_for_training(accelerator, model, optimizer, loader)
    set_seed(cfg.seed, device_specific=True)
    if resumed:
        restore_rng_states(accelerator, resumed.get("rng_states", []))
    rng = np.random.default_rng(0)
    val_batches = [
        {k: (v.to(accelerator.device) if torch.is_tensor(v) else v)
         for k, v in collate_pretrain_batch(val_set.__getitems__(rng.integers(0, len(val_set), mcfg.pretrain_batch_size))).items()}
        for _ in range(cfg.val_batches)
    ]

    writer = open_writer(run_dir, accelerator, cfg, step, resumed is not None)
    if writer is not None:
        if resumed:
            print(f"Resuming from {path} at step {step}.")
        n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        print(f"EncoderPretrainModel: {n_params:,} parameters, {len(train_set):,} training chains, "
              f"{world} process(es) -> {run_dir}")

    metrics, t_start = {}, time.perf_counter()
    logs = MeanLogs()
    bar = progress_bar(mcfg.pretrain_steps, step, accelerator, "pretrain")
    for batch in epoch_batches(loader, generator, cfg.seed, step, accelerator) if step < mcfg.pretrain_steps else ():
        loss, step_logs = pretrain_loss(model(batch), batch, mcfg)
        optimizer_step(accelerator, model, optimizer, scheduler, loss, mcfg.pretrain_max_grad_norm, step, "lower model.pretrain_lr")
        step += 1
        bar.update(1)
        logs.add({**step_logs, "loss": float(loss.detach())})
        final = step == mcfg.pretrain_steps
        if step % cfg.log_interval == 0 or final:
            means = logs.reduce(accelerator)
            if writer is not None:
                writer.add_scalar("pretrain/loss", means.pop("loss"), step)
                for k, v in means.items():
                    writer.add_scalar(f"pretrain/{k}", v, step)
                writer.add_scalar("pretrain/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("pretrain/seconds", time.perf_counter() - t_start, step)
        if cfg.eval_interval and step % cfg.eval_interval == 0 or final:
            if accelerator.is_main_process:
                metrics = validate(accelerator.unwrap_model(model), val_batches)
                for k, v in metrics.items():
                    writer.add_scalar(f"pretrain/{k}", v, step)
                tqdm.write(f"step {step}: held-out correlation {metrics['correlation']:.3f} (latents "
                           f"{metrics['correlation_latents']:.3f}, chunks {metrics['correlation_chunks']:.3f}; "
                           f"from shuffled latents {metrics['correlation_shuffled']:.3f}); action "
                           f"accuracy by depth " + " / ".join(f"{metrics.get(f'action_acc_depth{d}', float('nan')):.2f}"
                                                              for d in range(1, mcfg.pretrain_max_depth + 1))
                           + (f"; task retrieval {metrics['task_retrieval_acc']:.2f}" if "task_retrieval_acc" in metrics else ""))
            accelerator.wait_for_everyone()
        if step % mcfg.pretrain_save_interval == 0 or final:
            save_stage1(run_dir, "final" if final else f"step{step}", accelerator, model, optimizer, scheduler, step, cfg)
        if final:
            break
    bar.close()
    if writer is not None:
        writer.close()
        print(f"Done in {time.perf_counter() - t_start:.0f} s. Encoder checkpoint: {run_dir / 'encoder-pretrained-final.pt'}")
    accelerator.end_training()
    return metrics


@hydra.main(version_base=None, config_path="config", config_name="pretrain_encoder")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(pretrain_encoder, cfg)


if __name__ == "__main__":
    main()
