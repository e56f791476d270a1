"""The two-stage wrappers (two_stage.py, train_two_stage.sh, train_two_stage.ps1): options and stage plans."""
from __future__ import annotations

import pytest
import tree_sitter
import tree_sitter_powershell

from tests.helpers import ROOT
from two_stage import OPTIONS, parse_args, plan


def ps1_tree(source: bytes):
    """train_two_stage.ps1 parsed with a real PowerShell grammar (no PowerShell runs on these machines)."""
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))
    return parser.parse(source).root_node


def descendants(node, node_type: str):
    for child in node.children:
        if child.type == node_type:
            yield child
        yield from descendants(child, node_type)


def ps1_interface(root) -> tuple[set, dict]:
    """(the script's declared parameters, parameter -> two_stage.py flag from its `if ($P ...) { $argsList += "--flag" }`)."""
    declared = {c.text.decode().lstrip("$") for block in descendants(root, "param_block")
                for par in descendants(block, "script_parameter") for c in par.children if c.type == "variable"}
    forwarded = {}
    for stmt in descendants(root, "if_statement"):
        condition = next(descendants(stmt, "pipeline"))
        body = next(descendants(stmt, "statement_block"))
        flags = [s.text.decode().strip('"') for s in descendants(body, "expandable_string_literal")
                 if s.text.decode().startswith('"--')]
        if flags:
            forwarded[next(descendants(condition, "variable")).text.decode().lstrip("$")] = flags[0]
    return declared, forwarded


def test_powershell_wrapper_parses_and_forwards_every_option():
    source = (ROOT / "train_two_stage.ps1").read_bytes()
    root = ps1_tree(source)
    assert not root.has_error, "train_two_stage.ps1 has a syntax error"
    declared, forwarded = ps1_interface(root)
    assert forwarded == {ps: flag for flag, ps in OPTIONS.items()}
    assert declared == set(forwarded) | {"Overrides"}  # and the Hydra overrides, passed on as they are
    # the check can fail: a missing parenthesis, or an option dropped from the wrapper
    assert ps1_tree(source.replace(b"if ($DryRun)", b"if ($DryRun", 1)).has_error
    assert "DryRun" not in ps1_interface(ps1_tree(source.replace(b'"--dry-run"', b'"dry-run"')))[1]


def test_every_wrapper_flag_is_an_option_of_two_stage_py():
    sh = (ROOT / "train_two_stage.sh").read_text()
    assert 'two_stage.py "$@"' in sh  # the shell wrapper forwards every option unchanged
    values = {"--pretrained-path": ["p.pt"], "--num-processes": ["2"]}
    for flag in OPTIONS:
        args, overrides = parse_args([flag, *values.get(flag, [])])
        assert overrides == [] and vars(args)[flag.lstrip("-").replace("-", "_")] not in (None, False), flag
    with pytest.raises(SystemExit):
        parse_args(["--pretrain-onyl"])


@pytest.mark.parametrize("options,expected", [
    ([], ["collect.py", "pretrain_encoder.py", "train.py", "evaluate.py"]),
    (["--pretrain-only"], ["collect.py", "pretrain_encoder.py"]),
    (["--train-only"], ["collect.py", "train.py", "evaluate.py"]),
])
def test_wrapper_options_map_to_stages(options, expected):
    args, overrides = parse_args(options + ["experiment=quick", "seed=3", "--num-processes", "1"])
    stages = plan(args, overrides)
    assert [next(p.rsplit("/", 1)[-1] for p in cmd if p.endswith(".py")) for cmd in stages] == expected
    for cmd in stages:
        assert "experiment=quick" in cmd
    for cmd in stages:
        if cmd[-1].endswith(".py") or any(p.endswith(("pretrain_encoder.py", "train.py")) for p in cmd):
            if any(p.endswith(("pretrain_encoder.py", "train.py")) for p in cmd):
                assert "accelerate_config.yaml" in " ".join(cmd)
    train_cmd = [c for c in stages if any(p.endswith("train.py") for p in c)]
    if "--train-only" not in options and train_cmd:
        assert any(p.startswith("model.pretrained_encoder_path=runs/pretrain-encoder-darkroom-seed3/") for p in train_cmd[0])


def test_wrapper_passes_path_and_freeze_as_overrides():
    args, overrides = parse_args(["--train-only", "--pretrained-path", "x/enc.pt", "--freeze-encoder", "experiment=quick"])
    train_cmd = [c for c in plan(args, overrides) if any(p.endswith("train.py") for p in c)][0]
    assert "model.pretrained_encoder_path=x/enc.pt" in train_cmd and "model.freeze_encoder=true" in train_cmd


def test_wrapper_routes_stage_keys_and_refuses_unknown_ones():
    args, overrides = parse_args(["model.pretrain_steps=4", "training.train_timesteps=3", "experiment=quick", "--num-processes", "1"])
    collect_cmd, stage1, stage2, _ = plan(args, overrides)
    assert "model.pretrain_steps=4" in stage1 and "model.pretrain_steps=4" not in stage2
    assert "training.train_timesteps=3" in stage2 and not any(o.startswith("model.") for o in collect_cmd)
    for typo in ("model.pretrain_stepz=4", "training.lrr=1", "model.n_latnet=8", "log_intervall=5"):
        args, overrides = parse_args([typo])
        with pytest.raises(SystemExit, match="no stage has a config key"):
            plan(args, overrides)


def test_wrapper_sends_architecture_keys_to_both_stages_and_stage_keys_to_one():
    args, overrides = parse_args(["model.n_latent=8", "eval.n_envs_per_task=2", "log_interval=5", "model.pretrain_lr=0.01",
                                  "--num-processes", "1"])
    collect_cmd, stage1, stage2, evaluate = plan(args, overrides)
    assert "model.n_latent=8" in stage1 and "model.n_latent=8" in stage2 and "model.n_latent=8" not in collect_cmd
    assert "eval.n_envs_per_task=2" in stage2 and "eval.n_envs_per_task=2" in evaluate and "eval.n_envs_per_task=2" not in stage1
    assert "log_interval=5" in stage1 and "log_interval=5" in stage2 and "log_interval=5" not in evaluate
    assert "model.pretrain_lr=0.01" in stage1 and "model.pretrain_lr=0.01" not in stage2
    args, overrides = parse_args(["model.freeze_encoder=true", "model.pretrained_encoder_path=x/enc.pt", "--num-processes", "1"])
    _, stage1, stage2, _ = plan(args, overrides)  # stage 2's start: not given to stage 1, which would refuse it
    assert "model.freeze_encoder=true" in stage2 and not any("encoder_path" in o or "freeze" in o for o in stage1)
    args, overrides = parse_args(["model=ad_dr"])
    with pytest.raises(SystemExit, match="train CompressedAD"):
        plan(args, overrides)


def test_wrapper_picks_the_env_s_model_and_run_dirs():
    args, overrides = parse_args(["env=dark_key_to_door", "experiment=quick", "--num-processes", "1"])
    _, stage1, stage2, evaluate = plan(args, overrides)
    assert "model=ad_compressed_dr" in stage2 and "env=dark_key_to_door" in stage1
    assert any(p.startswith("model.pretrained_encoder_path=runs/pretrain-encoder-dark_key_to_door-seed0/") for p in stage2)
    assert any("compressed-ad-dark_key_to_door-seed0" in p for p in evaluate)


def test_each_cpu_process_gets_its_share_of_the_cores(monkeypatch):
    """accelerate launch with the GPU config file would give every CPU process one thread."""
    import os

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for n, threads in ((1, "4"), (2, "2"), (8, "1")):
        args, overrides = parse_args(["--pretrain-only", "--num-processes", str(n)])
        stage1 = plan(args, overrides)[1]
        assert stage1[stage1.index("--num_cpu_threads_per_process") + 1] == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    args, overrides = parse_args(["--pretrain-only", "--num-processes", "1"])
    assert "--num_cpu_threads_per_process" not in plan(args, overrides)[1]
