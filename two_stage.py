"""The one implementation behind train_two_stage.sh and train_two_stage.ps1.

    python two_stage.py [--pretrain-only | --train-only] [--pretrained-path P] [--freeze-encoder]
                        [--num-processes N] [--dry-run] [hydra overrides ...]

Runs, in order: collect.py (a no-op when the dataset exists), stage 1 (pretrain_encoder.py), stage 2
(train.py with the env's CompressedAD, model=ad_compressed_<env.short_name>, and the stage-1 checkpoint
as an override), and evaluate.py on the test tasks. Stages 1 and 2 go through `accelerate launch --config_file accelerate_config.yaml`.
The Hydra overrides reach every stage. A failing stage stops the chain with its exit code.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# the wrappers' options: (flag of this script, PowerShell parameter); tests check both wrappers against it
OPTIONS = {
    "--pretrain-only": "PretrainOnly",
    "--train-only": "TrainOnly",
    "--pretrained-path": "PretrainedPath",
    "--freeze-encoder": "FreezeEncoder",
    "--num-processes": "NumProcesses",
    "--dry-run": "DryRun",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    only = p.add_mutually_exclusive_group()
    only.add_argument("--pretrain-only", action="store_true", help="run collection and stage 1 only")
    only.add_argument("--train-only", action="store_true", help="skip stage 1 (give --pretrained-path, or train from scratch)")
    p.add_argument("--pretrained-path", help="stage-1 checkpoint for stage 2 (default: the one stage 1 writes)")
    p.add_argument("--freeze-encoder", action="store_true", help="keep the pre-trained encoder and embeddings fixed in stage 2")
    p.add_argument("--num-processes", type=int, default=None, help="processes per stage (default: GPU count, or 1 on CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the stage commands without running them")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        p.error(f"unrecognised arguments {unknown}: options are {sorted(OPTIONS)}, anything else must be a Hydra override key=value")
    return args, overrides


def composed(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def plan(args, overrides: list[str]) -> list[list[str]]:
    """The stage commands, in order. Each stage gets the overrides its config has keys for (collect.py has
    no model; stage-1 keys such as model.pretrain_steps do not exist in stage 2); an override that no
    stage knows is an error, so a typo is never dropped silently."""
    if args.num_processes is None:
        import torch

        args.num_processes = max(1, torch.cuda.device_count())
    py = sys.executable
    launch = [py, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
              "--num_processes", str(args.num_processes), *cpu_threads(args.num_processes)]
    used = set()

    def keep(config_name, base=()):
        kept = overrides_for(config_name, overrides, list(base))
        used.update(kept)
        return kept

    stages = [[py, str(ROOT / "collect.py"), *keep("collect")]]
    pretrained = args.pretrained_path
    if not args.train_only:
        stage1 = keep("pretrain_encoder")
        stages.append([*launch, str(ROOT / "pretrain_encoder.py"), *stage1])
        if pretrained is None:
            pcfg = composed("pretrain_encoder", stage1)
            pretrained = str(Path(pcfg.run_root) / pcfg.run_name / "encoder-pretrained-final.pt")
    if not args.pretrain_only:
        model = f"model=ad_compressed_{composed('collect', [o for o in overrides if o.startswith('env=')]).env.short_name}"
        stage2 = [model, *keep("train", [model])]
        if pretrained:
            stage2.append(f"model.pretrained_encoder_path={pretrained}")
        if args.freeze_encoder:
            stage2.append("model.freeze_encoder=true")
        stages.append([*launch, str(ROOT / "train.py"), *stage2])
        tcfg = composed("train", stage2)
        checkpoint = Path(tcfg.run_root) / tcfg.run_name / "checkpoint-final.pt"
        stages.append([py, str(ROOT / "evaluate.py"), f"checkpoint={checkpoint}", *keep("evaluate", ["checkpoint=x"])])
    unknown = [o for o in overrides if o not in used]
    if unknown:
        raise SystemExit(f"Error: no stage has a config key for {unknown}; check the spelling (python train.py --cfg job lists the keys).")
    return stages


def cpu_threads(num_processes: int) -> list[str]:
    """On a machine without CUDA, `accelerate launch` with this GPU config file sets OMP_NUM_THREADS=1 (its CPU
    heuristic applies only to use_cpu configs): a single process would train on one core. Give each process its
    share of the cores instead, unless OMP_NUM_THREADS says otherwise."""
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return []
    return ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // num_processes))]


def overrides_for(config_name: str, overrides: list[str], base: list[str]) -> list[str]:
    """The overrides whose key exists in `config_name` composed with `base` (and `++key` ones, which add keys)."""
    from omegaconf import OmegaConf

    # evaluate.py reads env and algorithm from the checkpoint: its config has no such groups
    group_keys = ("experiment",) if config_name == "evaluate" else ("experiment", "env", "algorithm")
    groups = [o for o in overrides if o.split("=", 1)[0] in group_keys]
    cfg = composed(config_name, [*base, *groups])
    absent = object()  # a key set to null is present
    kept = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("++") or key in group_keys \
                or OmegaConf.select(cfg, key.lstrip("+~"), default=absent) is not absent:
            kept.append(o)
    return kept


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.freeze_encoder and args.train_only and not args.pretrained_path:
        print("Error: --freeze-encoder with --train-only needs --pretrained-path.", file=sys.stderr)
        return 2
    for cmd in plan(args, overrides):
        print("+ " + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        code = subprocess.call(cmd, cwd=ROOT)
        if code != 0:
            print(f"Stage failed with exit code {code}: {shlex.join(cmd[-len(overrides) - 1:] if overrides else cmd[-1:])}",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
