"""The stage-1 -> stage-2 hand-off (utils/stage1.py): the seed's checkpoint keys, refusals, freezing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dataset import HistoryLanes
from model import build_model
from pretrain_encoder import (
    EncoderPretrainModel,
)
from tests.helpers import N_ACTIONS, N_STATES, compose_cfg, random_histories
from utils.errors import CheckpointError
from utils.stage1 import STAGE1_KEYS, freeze_stage1, load_stage1, stage1_checkpoint


def pretrain_cfg(**over):
    cfg = compose_cfg("pretrain_encoder", ["experiment=quick", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1"])
    cfg.model.merge_with(over)
    return cfg.model


OBJECTIVES = {"autoencode": {}, "retention": {"pretrain_retention_weight": 1.0, "pretrain_max_depth": 4,
                                             "pretrain_depth_weights": [1, 1, 1, 1]},
              "contrastive": {"pretrain_contrastive_weight": 1.0}}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_checkpoint_has_exactly_the_seed_keys_and_loads_into_compressed_ad(objective, tmp_path):
    """Whatever the objective, what stage 1 adds (decoder, age embedding, task head) stays out of the hand-off."""
    mcfg = pretrain_cfg(**OBJECTIVES[objective])
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
    from utils.lanes import exact_memory
    from utils.loop import action_loss

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
