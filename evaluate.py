"""In-context evaluation: run a trained model on held-out tasks for many consecutive episodes.

    python evaluate.py checkpoint=runs/ad-darkroom-seed0/checkpoint-final.pt            # test tasks: the report
    python evaluate.py checkpoint=... split=val                                         # validation: every choice
    python evaluate.py checkpoint=... memory=clear|transplant|truncate memory_chunks=1  # CompressedAD memory tests

The model starts with an empty context and keeps its context across episodes, sampling actions.
Every task is run `n_envs_per_task` times in one batch, on the same starts and action-sampling draws
for every model. Writes `eval/<split>[-memory-<mode>].json` (or `eval/<name>.json`) and `.png` (mean return per episode
against the optimal return and the source algorithm) into the checkpoint's run directory, and,
where the dataset is on disk, the held-out action loss at every step of the split's histories
(`held_out`): by position and, for CompressedAD, the memory value curve.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from env import make_env_spec
from evaluation import config_hash, evaluate_split, result_name, source_curves_for, write_results
from model import build_model
from model.ad_compressed import MEMORY_MODES
from utils.errors import DatasetError, UserConfigError
from utils.io import load_checkpoint
from utils.run import exit_on_user_error


def evaluate(cfg: DictConfig) -> dict:
    ckpt = load_checkpoint(cfg.checkpoint, "checkpoint", required_keys=("model_state_dict", "config"))
    run_cfg = ckpt["config"]
    if cfg.memory not in MEMORY_MODES:
        raise UserConfigError(f"memory={cfg.memory} is not one of {MEMORY_MODES}.")
    spec = make_env_spec(run_cfg["env"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(run_cfg["model"], spec.n_states, spec.n_actions)
    model.load_state_dict(ckpt["model_state_dict"])
    model.to(device)
    run_eval = run_cfg["eval"]  # the run's own evaluation sizes, unless given here
    n_episodes = cfg.eval.n_episodes if cfg.eval.n_episodes is not None else run_eval["n_episodes"]
    n_envs = cfg.eval.n_envs_per_task if cfg.eval.n_envs_per_task is not None else run_eval["n_envs_per_task"]
    histories = None
    if cfg.memory == "normal" and cfg.eval.held_out_streams_per_task:
        from dataset import load_histories

        try:
            histories = load_histories(OmegaConf.create(run_cfg), cfg.split)
        except DatasetError as e:  # the rollout needs no dataset; the held-out loss does
            print(f"Held-out loss skipped: {str(e).splitlines()[0]}")
    result = evaluate_split(model, spec, cfg.split, n_episodes, n_envs, cfg.eval.seed, cfg.eval.use_cache, device,
                            histories, cfg.eval.held_out_streams_per_task, cfg.memory, cfg.memory_chunks, cfg.donor,
                            cfg.donor_permutation, checkpoint=str(cfg.checkpoint),
                            global_step=int(ckpt.get("global_step", -1)), env=run_cfg["env"]["name"],
                            run_config_hash=config_hash(run_cfg))
    tasks = result["tasks"]
    run_dir = Path(cfg.output_dir) if cfg.get("output_dir") else Path(cfg.checkpoint).parent
    name = cfg.get("name") or result_name(cfg.split, cfg.memory, cfg.memory_chunks, cfg.donor, cfg.donor_permutation)
    out = write_results(result, run_dir, name, source_curves_for(run_cfg, cfg.split))
    lo, hi = result["fraction_of_optimal_last10_ci95"]
    print(
        f"{cfg.split} tasks ({len(tasks)} x {n_envs} envs, {n_episodes} episodes, memory={cfg.memory}"
        f"{f', donor={cfg.donor}' if cfg.memory == 'transplant' else ''}): "
        f"fraction of optimal first10 {result['fraction_of_optimal_first10']:.3f} -> last10 "
        f"{result['fraction_of_optimal_last10']:.3f} (task-bootstrap 95% CI {lo:.3f}-{hi:.3f}), "
        f"80% at episode {result['episodes_to_80pct']}, {result['seconds']:.1f} s -> {out}"
    )
    return result


@hydra.main(version_base=None, config_path="config", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(evaluate, cfg)


if __name__ == "__main__":
    main()
