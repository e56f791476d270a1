"""Stage 1: dataset, objective, metric, checkpoint hand-off, freezing, and the wrappers."""
import re
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dataset_pretrain import ADCompressedPretrainDataset, collate_pretrain_batch
from model import build_model
from pretrain_encoder import EncoderPretrainModel, centred_correlation, pretrain_loss, validate
from tests.conftest import ROOT, compose_cfg, random_histories
from tests.test_dataset import labelled_histories
from two_stage import OPTIONS, parse_args, plan
from utils.io import CheckpointError
from utils.stage1 import STAGE1_KEYS, freeze_stage1, load_stage1, stage1_checkpoint

N_STATES, N_ACTIONS = 81, 5


def pretrain_cfg(**over):
    cfg = compose_cfg("pretrain_encoder", ["experiment=quick", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1"])
    cfg.model.merge_with(over)
    return cfg.model


def test_pretrain_dataset_depths_streams_and_chain_lengths():
    mcfg = pretrain_cfg()
    h = labelled_histories(n_goals=2, n_streams=5, T=400)
    train = ADCompressedPretrainDataset(h, mcfg, "train", n_val_streams=2, depth_weights=[1, 2, 3])
    val = ADCompressedPretrainDataset(h, mcfg, "val", n_val_streams=2)
    batch = train.__getitems__(np.arange(len(train)))
    counts = np.bincount(batch["depth"].numpy(), minlength=4)
    assert counts[0] == 0 and counts[1] < counts[2] < counts[3]  # no depth 0, weighted towards deeper
    lengths = batch["chunk_lengths"]
    used = lengths[torch.arange(3)[None] < batch["depth"][:, None]]
    assert used.min() == mcfg.min_compress_length and used.max() == mcfg.max_compress_length
    assert (lengths[torch.arange(3)[None] >= batch["depth"][:, None]] == 0).all()
    for b in range(0, len(train), 37):  # a chain is contiguous steps of one stream
        states = torch.cat([batch["chunks"][b, j, : int(lengths[b, j]), 4] for j in range(int(batch["depth"][b]))]).long()
        assert (states // 1000 == states[0] // 1000).all() and (torch.diff(states) == 1).all()
    stream_of = lambda ds, idx: set((ds.__getitems__(idx)["chunks"][:, 0, 0, 4].long() // 1000).tolist())
    train_streams = stream_of(train, np.arange(0, len(train), 7))
    val_streams = stream_of(val, np.arange(0, len(val), 7))
    assert train_streams and val_streams and not train_streams & val_streams  # held-out streams
    trimmed = collate_pretrain_batch(train.__getitems__(np.arange(0, len(train), 97)[:16]))
    assert trimmed["chunks"].shape[1:3] == (int(trimmed["depth"].max()), int(trimmed["chunk_lengths"].max()))


def test_stage1_chunk_lengths_min_above_max_are_refused():
    from dataset import DatasetError

    with pytest.raises(DatasetError, match=r"min_compress_length \(45\) <= model.max_compress_length \(40\)"):
        ADCompressedPretrainDataset(labelled_histories(T=400), pretrain_cfg(min_compress_length=45), "train", 1)


def test_checkpoint_has_exactly_the_seed_keys_and_loads_into_compressed_ad(tmp_path):
    mcfg = pretrain_cfg()
    pre = EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg)
    path = tmp_path / "enc.pt"
    torch.save(stage1_checkpoint(pre, 7, OmegaConf.to_container(mcfg)), path)
    ckpt = torch.load(path, weights_only=True)
    assert tuple(ckpt) == STAGE1_KEYS and ckpt["global_step"] == 7 and isinstance(ckpt["config"], dict)

    model = build_model(mcfg, N_STATES, N_ACTIONS)
    info = load_stage1(model, path)
    assert info["global_step"] == 7
    for part in ("encoder", "embed_context", "embed_ln"):
        for k, v in getattr(model, part).state_dict().items():
            assert torch.equal(v, ckpt[f"{part}_state_dict"][k]), (part, k)


def test_a_stage1_checkpoint_of_another_env_is_refused(tmp_path):
    mcfg = pretrain_cfg()
    path = tmp_path / "enc.pt"
    darkroom = dict(compose_cfg("collect", []).env)
    key_door = dict(compose_cfg("collect", ["env=dark_key_to_door"]).env)
    torch.save(stage1_checkpoint(EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg), 3, {"env": key_door}), path)
    model = build_model(mcfg, N_STATES, N_ACTIONS)  # the same shapes: only the env tells them apart
    with pytest.raises(CheckpointError, match=r"(?s)another env config.*'name': \('dark_key_to_door', 'darkroom'\)"):
        load_stage1(model, path, darkroom)
    assert load_stage1(model, path, key_door)["global_step"] == 3


def test_wrong_shape_and_missing_file_give_clear_errors(tmp_path):
    small = EncoderPretrainModel(N_STATES, N_ACTIONS, pretrain_cfg(n_latent=8))
    path = tmp_path / "small.pt"
    torch.save(stage1_checkpoint(small, 1, {"model": {"n_latent": 8}}), path)
    model = build_model(pretrain_cfg(), N_STATES, N_ACTIONS)
    with pytest.raises(CheckpointError, match=r"encoder\.queries: checkpoint \(8, 64\) vs model \(16, 64\)"):
        load_stage1(model, path)
    with pytest.raises(CheckpointError, match="not found"):
        load_stage1(model, tmp_path / "missing.pt")
    torch.save({"model_state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="lacks the keys"):
        load_stage1(model, tmp_path / "other.pt")


def test_frozen_encoder_stays_bit_identical_while_decoder_trains():
    from dataset import HistoryLanes
    from train import action_loss
    from utils.lanes import exact_memory

    mcfg = pretrain_cfg(tf_dropout=0.0)
    model = build_model(mcfg, N_STATES, N_ACTIONS)
    freeze_stage1(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in ("encoder", "embed_context", "embed_ln")}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lanes = HistoryLanes(random_histories(n_goals=4, n_streams=4), model.schedule, n_lanes=4, segments_per_step=2)
    carried = exact_memory(model, lanes, 0, np.arange(4), "cpu")
    for step in range(3):
        batch = {**lanes.batch(step, np.arange(4)), "memory": carried[0], "memory_empty": carried[1]}
        loss, _, carried = action_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.equal(decoder_before[k], model.decoder.state_dict()[k]) for k in decoder_before)


def test_objective_has_detached_targets_and_collapse_scores_zero():
    mcfg = pretrain_cfg(tf_dropout=0.0)
    model = EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg)
    ds = ADCompressedPretrainDataset(random_histories(n_goals=4, n_streams=4), mcfg, "train", 1)
    batch = collate_pretrain_batch(ds.__getitems__(np.arange(16) * 31))
    stages = model(batch)
    assert len(stages) == int(batch["depth"].max())
    assert all(not s["target_chunk"].requires_grad for s in stages)
    assert all(s["target_prev"] is None or not s["target_prev"].requires_grad for s in stages)
    loss, logs = pretrain_loss(stages, 1.0, 1.0)
    assert {"mse_chunk", "mse_latents", "ce_state", "ce_action", "bce_reward"} <= set(logs) and torch.isfinite(loss)

    # a collapsed encoder (constant latents whatever the input) scores ~0 correlation
    class Constant(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, latents, chunk, valid=None):
            return self.enc.initial_latents.expand(chunk.shape[0], -1, -1) * 1.0

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.enc, name)

    model.encoder = Constant(model.encoder)
    metrics = validate(model, [batch])
    assert abs(metrics["correlation"]) < 1e-4 and abs(metrics["correlation_chunks"]) < 1e-4


def test_centred_correlation():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 5, 8, generator=g)
    valid = torch.ones(64, 5, dtype=torch.bool)
    corr = lambda p: (lambda c, pp, tt: c / (pp * tt) ** 0.5)(*centred_correlation(p, t, valid))
    assert corr(t) == pytest.approx(1.0)
    assert corr(2 * t + 3) == pytest.approx(1.0)
    assert corr(-t) == pytest.approx(-1.0)
    assert abs(corr(torch.randn(64, 5, 8, generator=g))) < 0.1
    assert centred_correlation(t.mean(0, keepdim=True).expand_as(t), t, valid)[1] == pytest.approx(0.0, abs=1e-8)


def ps1_options() -> dict:
    """PowerShell parameter -> two_stage.py flag, read from train_two_stage.ps1."""
    text = (ROOT / "train_two_stage.ps1").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r'if \(\$(\w+)[^)]*\) \{ \$argsList \+= @?\(?"(--[\w-]+)"', text)}


def test_both_wrappers_accept_the_same_options():
    ps1 = ps1_options()
    assert ps1 == {ps: flag for flag, ps in OPTIONS.items()}
    sh = (ROOT / "train_two_stage.sh").read_text()
    assert 'two_stage.py "$@"' in sh  # the shell wrapper forwards every option unchanged
    for flag in OPTIONS:
        assert flag.lstrip("-") in (ROOT / "two_stage.py").read_text()


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


def test_failing_stage_stops_the_chain_with_its_exit_code(tmp_path):
    # no dataset and a dataset_path that cannot be written: collect fails, nothing after it runs
    bad = tmp_path / "file"
    bad.write_text("not a directory")
    proc = subprocess.run(["bash", str(ROOT / "train_two_stage.sh"), "experiment=quick", f"dataset_path={bad}/x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pretrain_encoder.py" not in proc.stdout and "Stage failed with exit code" in proc.stderr


def test_wrapper_routes_stage_keys_and_refuses_unknown_ones():
    args, overrides = parse_args(["model.pretrain_steps=4", "model.train_timesteps=3", "experiment=quick", "--num-processes", "1"])
    collect_cmd, stage1, stage2, _ = plan(args, overrides)
    assert "model.pretrain_steps=4" in stage1 and "model.pretrain_steps=4" not in stage2
    assert "model.train_timesteps=3" in stage2 and not any(o.startswith("model.") for o in collect_cmd)
    args, overrides = parse_args(["model.pretrain_stepz=4"])
    with pytest.raises(SystemExit, match="no stage has a config key"):
        plan(args, overrides)


def test_wrapper_picks_the_env_s_model_and_run_dirs():
    args, overrides = parse_args(["env=dark_key_to_door", "experiment=quick", "--num-processes", "1"])
    _, stage1, stage2, evaluate = plan(args, overrides)
    assert "model=ad_compressed_dktd" in stage2 and "env=dark_key_to_door" in stage1
    assert any(p.startswith("model.pretrained_encoder_path=runs/pretrain-encoder-dark_key_to_door-seed0/") for p in stage2)
    assert any("compressed-ad-dark_key_to_door-seed0" in p for p in evaluate)
