"""The one implementation behind train_two_stage.sh and train_two_stage.ps1.

    python two_stage.py [--pretrain-only | --train-only] [--pretrained-path P] [--freeze-encoder]
                        [--num-processes N] [--dry-run] [hydra overrides ...]

Runs, in order: collect.py (a no-op when the dataset exists), stage 1 (pretrain_encoder.py), stage 2
(train.py with CompressedAD, model=ad_compressed_dr, and the stage-1 checkpoint as an override), and
evaluate.py on the test tasks. Stages 1 and 2 go through `accelerate launch --config_file accelerate_config.yaml`.
Each Hydra override reaches the stages it applies to, by its prefix (`ROUTES`). A failing stage stops the chain with its exit code.
"""
from __future__ import annotations

import argparse
import functools
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


STAGES = ("collect", "pretrain_encoder", "train", "evaluate")
# override prefix -> the stages it applies to (the first match wins; evaluate reads env and model from the checkpoint)
ROUTES = (
    ("experiment=", STAGES),
    ("env=", STAGES[:3]), ("env.", STAGES[:3]), ("algorithm=", STAGES[:3]), ("algorithm.", STAGES[:3]),
    ("model.pretrain_", ("pretrain_encoder",)),   # stage 1's settings (config/model/pretrain_encoder.yaml)
    ("model.pretrained_encoder_path", ("train",)), ("model.freeze_encoder", ("train",)),  # stage 2's start
    ("model.", ("pretrain_encoder", "train")),      # the architecture both stages build
    ("training.", ("train",)),                      # stage 2's recipe (config/training/compressed_ad.yaml)
    ("eval.", ("train", "evaluate")),
)
MODEL = "model=ad_compressed_dr"  # stage 2's model, on every env


@functools.cache
def config_keys(path: Path) -> frozenset[str]:
    """The top-level keys a config file declares (its defaults list aside)."""
    from omegaconf import OmegaConf

    return frozenset(k for k in OmegaConf.load(path) if k != "defaults")


def stages_for(override: str) -> tuple[str, ...]:
    """The stages an override applies to, by its key's prefix; for a top-level key, the scripts whose config declares
    it. An override no stage knows (a typo) is an error, so nothing is dropped silently."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key == "model":
        raise SystemExit(f"Error: {override}: the wrappers train CompressedAD ({MODEL}); set its keys with model.<key>=...")
    for prefix, stages in ROUTES:
        if (key + "=").startswith(prefix) if prefix.endswith("=") else key.startswith(prefix):
            group, _, leaf = key.partition(".")
            known = {"model": (ROOT / "config/model/ad_compressed_dr.yaml", ROOT / "config/model/pretrain_encoder.yaml"),
                     "training": (ROOT / "config/training/compressed_ad.yaml",)}.get(group)
            if known and not override.startswith("+") and leaf.split(".")[0] not in set().union(*map(config_keys, known)):
                break
            return stages
    else:
        common = config_keys(ROOT / "config/common.yaml")
        stages = tuple(s for s in STAGES if key in common | config_keys(ROOT / f"config/{s}.yaml"))
        if stages:
            return stages
    raise SystemExit(f"Error: no stage has a config key for {override!r}; check the spelling (python train.py --cfg job "
                     f"lists the keys).")


def plan(args, overrides: list[str]) -> list[list[str]]:
    """The stage commands, in order; each stage gets the overrides that apply to it (`stages_for`)."""
    if args.num_processes is None:
        import torch

        args.num_processes = max(1, torch.cuda.device_count())
    py = sys.executable
    launch = [py, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml"),
              "--num_processes", str(args.num_processes), *cpu_threads(args.num_processes)]
    routed = {o: stages_for(o) for o in overrides}
    keep = lambda stage: [o for o in overrides if stage in routed[o]]

    stages = [[py, str(ROOT / "collect.py"), *keep("collect")]]
    pretrained = args.pretrained_path
    if not args.train_only:
        stage1 = keep("pretrain_encoder")
        stages.append([*launch, str(ROOT / "pretrain_encoder.py"), *stage1])
        if pretrained is None:
            pcfg = composed("pretrain_encoder", stage1)
            pretrained = str(Path(pcfg.run_root) / pcfg.run_name / "encoder-pretrained-final.pt")
    if not args.pretrain_only:
        stage2 = [MODEL, *keep("train")]
        if pretrained:
            stage2.append(f"model.pretrained_encoder_path={pretrained}")
        if args.freeze_encoder:
            stage2.append("model.freeze_encoder=true")
        stages.append([*launch, str(ROOT / "train.py"), *stage2])
        tcfg = composed("train", stage2)
        checkpoint = Path(tcfg.run_root) / tcfg.run_name / "checkpoint-final.pt"
        stages.append([py, str(ROOT / "evaluate.py"), f"checkpoint={checkpoint}", *keep("evaluate")])
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
