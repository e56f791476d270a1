"""Main training (stage 2): AD or CompressedAD on learning histories, under Accelerate.

    python train.py experiment=quick model=ad_dr
    accelerate launch --config_file accelerate_config.yaml train.py model=ad_dr

Logs to TensorBoard in runs/<run_name>/ (train/*, test/loss_action, eval/*), evaluates in context on
held-out goals every `eval_interval` steps, and writes checkpoints atomically from the main process.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from itertools import count
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dataset import (
    HistoryLanes,
    build_dataset,
    collate_batched,
    histories_dir,
    load_histories,
    load_metadata,
)
from env import make_env_spec
from evaluation import config_hash, evaluate_split, result_name, source_curves, write_results
from model import build_model, model_config
from utils.errors import RunDirError, UserConfigError
from utils.io import atomic_torch_save, load_checkpoint
from utils.lanes import exact_memory, lane_state, memory_staleness, restore_lanes
from utils.loop import (
    MeanLogs,
    action_loss,
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
from utils.stage1 import freeze_stage1, load_stage1


def lane_batches(lanes: HistoryLanes, my_lanes: np.ndarray, step: int, device):
    """CompressedAD's batches from optimizer step `step` on: this rank's lanes, a function of the step alone."""
    for s in count(step):
        yield {k: v.to(device) for k, v in lanes.batch(s, my_lanes).items()}


def run_config(cfg: DictConfig) -> dict:
    """What a checkpoint stores as `config`: the resolved config as plain containers and the dataset it trained on."""
    return {**plain_config(cfg), "dataset": str(histories_dir(cfg))}


def save_checkpoint(path: Path, accelerator, model, optimizer, scheduler, step: int, cfg: DictConfig, lanes: dict | None) -> None:
    """Everything a resume needs: weights, optimizer, scheduler, step, config (plain), every rank's RNG and
    CompressedAD's carried lane memory. Data order needs no state: it is a function of the seed and the step."""
    states = rng_states(accelerator)
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_torch_save(
            {
                "model_state_dict": raw.state_dict(),
                "model_config": asdict(raw.config),  # the typed architecture (model/ad*.py), derived fields filled in
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "rng_states": states,
                "global_step": step,
                "config": run_config(cfg),
                **({"lanes": lanes} if lanes is not None else {}),
            },
            path,
        )
    accelerator.wait_for_everyone()


# config keys a resumed run must share with the run it continues (anything else, e.g. eval settings, may change)
RESUME_KEYS = ("seed", "env", "algorithm", "model", "training", "mixed_precision")


def resume_state(run_dir: Path, cfg: DictConfig) -> dict:
    """The newest checkpoint of this run, checked against the current config: a resume that would
    continue on other data, another seed or another model is refused, naming the keys."""
    path = newest_checkpoint(run_dir, "checkpoint")
    if path is None:
        raise RunDirError(f"resume=true but '{run_dir}' holds no checkpoint yet. Start afresh with overwrite=true.")
    ckpt = load_checkpoint(path, "checkpoint to resume", required_keys=("model_state_dict", "optimizer_state_dict",
                                                                          "scheduler_state_dict", "global_step", "config"))
    now, then = plain_config(cfg), ckpt["config"]
    differ = {}
    for key in RESUME_KEYS:
        a, b = then.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ.update({f"{key}.{k}": (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)})
        elif a != b:
            differ[key] = (a, b)
    if then.get("dataset") != str(histories_dir(cfg)):
        differ["dataset"] = (then.get("dataset"), str(histories_dir(cfg)))
    if differ:
        raise UserConfigError(f"resume=true with a config that differs from the run's ({path}): (then, now) = {differ}. "
                              f"Resume with the run's own overrides (see {run_dir / 'config.yaml'}).")
    ckpt["path"] = path
    return ckpt


def validate_config(cfg: DictConfig, world: int):
    """Refuse values that cannot work together before anything is written; returns the env spec."""
    mcfg, tcfg = cfg.model, cfg.training
    try:
        spec = make_env_spec(cfg.env)
        model_config(mcfg)  # the architecture, validated
    except ValueError as e:
        raise UserConfigError(str(e)) from None
    if mcfg.model == "CompressedAD":  # the lane recipe
        steps = tcfg.segments_per_step
        if steps is not None and steps < 1:
            raise UserConfigError(f"training.segments_per_step ({steps}) must be >= 1, or null (whole histories).")
        if not 0 <= tcfg.memory_restart <= 1:
            raise UserConfigError(f"training.memory_restart ({tcfg.memory_restart}) must be a probability in [0, 1].")
    if tcfg.train_batch_size < world or tcfg.train_batch_size % world:
        raise UserConfigError(
            f"training.train_batch_size={tcfg.train_batch_size} must be a positive multiple of the number of processes ({world})."
        )
    if tcfg.num_warmup_steps < 1 or tcfg.train_timesteps < 1:
        raise UserConfigError("training.num_warmup_steps and training.train_timesteps must be >= 1.")
    if cfg.resume and cfg.mixed_precision == "fp16":
        raise UserConfigError("resume=true is refused under mixed_precision=fp16: the loss scaler's state is not checkpointed "
                              "and skipped steps would shift the schedule, so the resume would not be exact. Use bf16 or no.")
    return spec


def attach_pretrained_encoder(model, mcfg, env_cfg, verbose: bool) -> str:
    """Load the stage-1 checkpoint into CompressedAD and/or freeze its encoder; returns what was done."""
    path, freeze = mcfg.get("pretrained_encoder_path"), bool(mcfg.get("freeze_encoder", False))
    if not path and not freeze:
        return ""
    if mcfg.model != "CompressedAD":
        raise UserConfigError(f"pretrained_encoder_path / freeze_encoder apply to CompressedAD only, not to {mcfg.model} "
                              f"(use model=ad_compressed_dr).")
    if freeze and not path:
        raise UserConfigError("freeze_encoder=true needs model.pretrained_encoder_path: freezing a random encoder is not pre-training.")
    info = load_stage1(model, path, plain_config(env_cfg))
    note = (f"Loaded encoder, embed_context and embed_ln ({info['n_params']:,} parameters) from {info['path']} "
            f"(stage-1 step {info['global_step']}).")
    if freeze:
        frozen = freeze_stage1(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        note += (f" Frozen: encoder, embed_context, embed_ln ({frozen:,} parameters; the token embedding is shared, so the "
                 f"decoder's input embedding is fixed too). Trainable parameters: {trainable:,}.")
    if verbose:
        print(note)
    return note


def log_evaluation(writer, result: dict, step: int) -> None:
    """An evaluation's scalars (the validation rollouts as eval/*, other splits under their name) and one line."""
    split, loss = result["split"], result["held_out"]
    rollout_tag = "eval" if split == "val" else split
    writer.add_scalar(f"{rollout_tag}/mean_reward", np.mean(result["mean_return_per_episode"][-10:]), step)
    for k in ("fraction_of_optimal_last10", "fraction_of_optimal_first10", "miss_rate_after_first_success",
              "n_compressions", "peak_decoder_length", "key_rate", "door_rate"):
        if result.get(k) is not None:
            writer.add_scalar(f"{rollout_tag}/{k}", result[k], step)
    for k, v in loss.items():
        writer.add_scalar(f"{split}/{k}", v, step)
    tqdm.write(f"step {step}: {split} fraction of optimal first10 {result['fraction_of_optimal_first10']:.3f} -> last10 "
               f"{result['fraction_of_optimal_last10']:.3f} ({result['n_envs_per_task']} envs/task)"
               + (f", {split} loss {loss['loss_action']:.3f}" if loss else ""))


def train(cfg: DictConfig) -> dict:
    # CompressedAD leaves parameters unused in some batches (L_0 where no lane starts a history)
    accelerator = make_accelerator(cfg.mixed_precision, find_unused_parameters=cfg.model.model == "CompressedAD")
    mcfg, tcfg = cfg.model, cfg.training
    world = accelerator.num_processes
    spec = validate_config(cfg, world)
    train_set = build_dataset(mcfg, tcfg, load_histories(cfg, "train"), seed=cfg.seed)
    lanes = train_set if isinstance(train_set, HistoryLanes) else None
    held_out = {split: load_histories(cfg, split) for split in dict.fromkeys(("val", *cfg.final_eval_splits))}  # each split read once
    metadata = load_metadata(cfg)

    set_seed(cfg.seed)  # same initial weights on every rank
    model = build_model(mcfg, spec.n_states, spec.n_actions)
    stage1_note = attach_pretrained_encoder(model, mcfg, cfg.env, accelerator.is_main_process)
    run_dir = prepare_run_dir(cfg, accelerator)  # only now that every input has been checked
    optimizer = make_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.betas)
    scheduler = cosine_scheduler(optimizer, tcfg.num_warmup_steps, tcfg.train_timesteps, tcfg.min_lr_ratio)
    loader = generator = None
    if lanes is None:
        generator = torch.Generator()  # reseeded every epoch: the data order is a function of (seed, epoch)
        loader = DataLoader(train_set, batch_size=tcfg.train_batch_size // world, shuffle=True, drop_last=True,
                            collate_fn=collate_batched, generator=generator)
    step = 0
    resumed = resume_state(run_dir, cfg) if cfg.resume else None
    if resumed:
        step = load_train_state(resumed, model, optimizer, scheduler)
    if cfg.compile:  # the training forward only: rollouts and checkpoints use the plain module
        model = torch.compile(model)
    # the scheduler is stepped by hand, once per optimizer step, whatever the number of processes
    model, optimizer, loader = prepare_for_training(accelerator, model, optimizer, loader)
    set_seed(cfg.seed, device_specific=True)  # different dropout draws per rank
    if resumed:
        restore_rng_states(accelerator, resumed.get("rng_states", []))
    raw = accelerator.unwrap_model(model, keep_torch_compile=False)
    carried = None  # CompressedAD: (memory [lanes, n_latent, C], empty [lanes]) of this rank's lanes, carried into the next step
    if lanes is not None:
        n_local = lanes.n_lanes // world  # rank r owns lanes r * n_local ... (r + 1) * n_local - 1: disjoint histories
        my_lanes = np.arange(accelerator.process_index * n_local, (accelerator.process_index + 1) * n_local)
        if resumed:
            carried = restore_lanes(resumed.get("lanes"), lanes, my_lanes, resumed["path"], accelerator.device)
        else:
            carried = exact_memory(raw, lanes, step, my_lanes, accelerator.device)
        batches = lane_batches(lanes, my_lanes, step, accelerator.device)
    else:
        batches = epoch_batches(loader, generator, cfg.seed, step, accelerator)

    n_params = sum(p.numel() for p in model.parameters())
    writer = open_writer(run_dir, accelerator, cfg, step, resumed is not None)
    if writer is not None:
        if resumed:
            print(f"Resuming from {resumed['path']} at step {step}.")
        if stage1_note:
            writer.add_text("pretrained_encoder", stage1_note)
        data = (f"{lanes.n_lanes} lanes x {lanes.segments_per_step} of {lanes.n_segments} segments a step, "
                f"{lanes.n_streams:,} histories" if lanes else f"{len(train_set):,} training samples")
        print(f"{mcfg.model}: {n_params:,} parameters, {data}, {world} process(es), global batch {tcfg.train_batch_size} -> {run_dir}")

    run_hash = config_hash(run_config(cfg))  # names this run in its eval files (scripts/ reuse only a match)

    model.train()
    result, t_start, start_step = {}, time.perf_counter(), step
    logs = MeanLogs()
    bar = progress_bar(tcfg.train_timesteps, step, accelerator, "train")
    for batch in batches if step < tcfg.train_timesteps else ():
        if cfg.log_first_batch and step == 0:
            print(f"BATCH {json.dumps({'rank': accelerator.process_index, 'index': batch['index'].flatten().tolist()})}", flush=True)
        if carried is not None:
            batch["memory"], batch["memory_empty"] = carried
        loss, step_logs, carried_out = action_loss(model, batch)
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, loss, tcfg.max_grad_norm, step,
                                   f"lower training.lr or use mixed_precision=no ({run_dir})")
        if carried is not None:
            carried = (carried_out[0].float().contiguous(), carried_out[1])
        step += 1
        bar.update(1)

        logs.add(step_logs)
        if step % cfg.log_interval == 0 or step == tcfg.train_timesteps:
            n_logged = logs.n
            means = logs.reduce(accelerator, ("loss_action", "acc_action"), summed=("n_targets",))
            n_targets = means.pop("n_targets")
            if carried is not None and not lanes.whole_histories:  # how far the carried memory is from the current weights'
                means["memory_staleness"] = accelerator.reduce(memory_staleness(raw, lanes, step, my_lanes, carried),
                                                               reduction="mean").item()
            if writer is not None:
                for k, v in means.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                seconds = time.perf_counter() - t_start
                writer.add_scalar("train/seconds_per_step", seconds / (step - start_step), step)
                writer.add_scalar("train/targets_per_step", n_targets / n_logged, step)
            bar.set_postfix(loss=f"{means['loss_action']:.3f}", acc=f"{means['acc_action']:.3f}", refresh=False)

        final = step == tcfg.train_timesteps
        if cfg.eval_interval and step % cfg.eval_interval == 0 or final:
            if accelerator.is_main_process:
                n_envs = cfg.eval.n_envs_per_task if final else cfg.eval_envs_per_task_during_training
                for split in cfg.final_eval_splits if final else ("val",):
                    # validation (`eval/*`, `val/*`) decides every choice; test is evaluated once, at the end
                    result[split] = evaluate_split(raw, spec, split, cfg.eval.n_episodes, n_envs, cfg.eval.seed,
                                                   cfg.eval.use_cache, accelerator.device, held_out[split],
                                                   cfg.eval.held_out_streams_per_task, global_step=step, env=spec.name,
                                                   run_config_hash=run_hash)
                    log_evaluation(writer, result[split], step)
                    if final:
                        write_results(result[split], run_dir, result_name(split), source_curves(metadata, split))
            accelerator.wait_for_everyone()
        if step % cfg.save_interval == 0 or final:
            state = lane_state(lanes, accelerator, carried) if carried is not None else None
            save_checkpoint(run_dir / ("checkpoint-final.pt" if final else f"checkpoint-step{step}.pt"),
                            accelerator, model, optimizer, scheduler, step, cfg, state)
        if final:
            break
    bar.close()
    if writer is not None:
        writer.close()
        print(f"Done in {time.perf_counter() - t_start:.0f} s. Checkpoint: {run_dir / 'checkpoint-final.pt'}")
    accelerator.end_training()
    return result


@hydra.main(version_base=None, config_path="config", config_name="train")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(train, cfg)


if __name__ == "__main__":
    main()
