"""Stage 1's objective and metric (pretrain_encoder.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset_pretrain import ADCompressedPretrainDataset, collate_pretrain_batch
from pretrain_encoder import (
    EncoderPretrainModel,
    centred_correlation,
    contrastive_logits,
    contrastive_loss,
    pretrain_loss,
    validate,
)
from tests.helpers import N_ACTIONS, N_STATES, compose_cfg, random_histories


def pretrain_cfg(**over):
    cfg = compose_cfg("pretrain_encoder", ["experiment=quick", "model.encoder_n_layer=1", "model.pretrain_decoder_n_layer=1"])
    cfg.model.merge_with(over)
    return cfg.model


def test_objective_has_detached_targets_and_collapse_scores_zero():
    mcfg = pretrain_cfg(tf_dropout=0.0)
    model = EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg)
    ds = ADCompressedPretrainDataset(random_histories(n_goals=4, n_streams=4), mcfg, "train", 1)
    batch = collate_pretrain_batch(ds.__getitems__(np.arange(16) * 31))
    out = model(batch)
    stages = out["stages"]
    assert len(stages) == int(batch["depth"].max()) and set(out) == {"stages", "latents"}
    assert all(not s["target_chunk"].requires_grad for s in stages)
    assert all(s["target_prev"] is None or not s["target_prev"].requires_grad for s in stages)
    loss, logs = pretrain_loss(out, batch, mcfg)
    assert {"mse_chunk", "mse_latents", "ce_state", "ce_action", "bce_reward"} <= set(logs) and torch.isfinite(loss)

    # a collapsed encoder (constant latents whatever the input) scores ~0 correlation
    metrics = validate(model, [batch])
    assert -1 <= metrics["correlation_shuffled"] <= 1 and metrics["correlation_shuffled"] != metrics["correlation"]
    model.encoder = Constant(model.encoder)
    metrics = validate(model, [batch])
    assert abs(metrics["correlation"]) < 1e-4 and abs(metrics["correlation_chunks"]) < 1e-4
    assert abs(metrics["correlation_shuffled"]) < 1e-4


class Constant(torch.nn.Module):
    """A collapsed encoder: the same latents whatever it reads."""

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


def test_retention_decodes_every_older_chunk_and_a_collapsed_encoder_cannot_tell_chains_apart():
    mcfg = pretrain_cfg(tf_dropout=0.0, pretrain_retention_weight=1.0, pretrain_max_depth=4, pretrain_depth_weights=[0, 0, 0, 1])
    model = EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg)
    ds = ADCompressedPretrainDataset(random_histories(n_goals=4, n_streams=4), mcfg, "train", 1, mcfg.pretrain_depth_weights)
    batch = collate_pretrain_batch(ds.__getitems__(np.arange(16) * 31))
    out = model(batch)
    assert [sorted(age.unique().tolist()) for *_, age in out["older"]] == [[3], [2], [1]]  # depth 4: chunks 0-2 are older
    for (pred, tokens, valid, _), j in zip(out["older"], range(3)):
        assert pred["state_logits"].shape == (16, int(batch["chunk_lengths"][:, j].max()), N_STATES)
        assert torch.equal(tokens, batch["chunks"][:, j, : tokens.shape[1]])
    loss, logs = pretrain_loss(out, batch, mcfg)
    assert "retention_ce" in logs and torch.isfinite(loss)
    loss.backward()
    assert model.decoder.age_embedding.weight.grad.abs().sum() > 0
    metrics = validate(model, [batch])
    assert {"retention_action_acc_age1", "retention_action_acc_age3"} <= set(metrics)

    model.encoder = Constant(model.encoder)  # collapsed: the decoded older chunks are the same for every chain
    pred = model(batch)["older"][0][0]["state_logits"]
    assert torch.allclose(pred, pred[:1].expand_as(pred))


def test_contrastive_pairs_a_chain_with_one_of_its_task_and_collapse_scores_chance():
    mcfg = pretrain_cfg(tf_dropout=0.0, pretrain_contrastive_weight=1.0)
    model = EncoderPretrainModel(N_STATES, N_ACTIONS, mcfg)
    ds = ADCompressedPretrainDataset(random_histories(n_goals=8, n_streams=3), mcfg, "train", 1, positives=True)
    batch = collate_pretrain_batch(ds.__getitems__(np.arange(16) * 397))  # spread over the 8 goals
    assert batch["positive_chunks"].shape == batch["chunks"].shape
    out = model(batch)
    assert out["task_embeddings"].shape == out["positive_task_embeddings"].shape == (16, mcfg.tf_n_embd)
    loss, logs = pretrain_loss(out, batch, mcfg)
    assert "contrastive" in logs and torch.isfinite(loss)
    loss.backward()
    assert model.task_head[0].weight.grad.abs().sum() > 0

    logits = contrastive_logits(out, batch["task"], 1.0)
    same = batch["task"][:, None] == batch["task"][None, :]
    assert torch.isinf(logits[same & ~torch.eye(16, dtype=torch.bool)]).all() and torch.isfinite(logits.diagonal()).all()
    # embeddings that name the task exactly: loss near 0; a collapsed encoder: log(candidates), its best is chance
    one_hot = torch.nn.functional.one_hot(batch["task"], 8).float()
    named = {"task_embeddings": one_hot, "positive_task_embeddings": one_hot}
    assert contrastive_loss(contrastive_logits(named, batch["task"], 0.05)) < 0.01
    model.encoder = Constant(model.encoder)
    collapsed = model(batch)
    candidates = (~same).sum(1).float() + 1
    expected = torch.log(candidates).mean()
    assert contrastive_loss(contrastive_logits(collapsed, batch["task"], 0.1)).item() == pytest.approx(expected.item(), rel=1e-4)


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


def test_stage1_config_reads_every_key_and_shares_stage2_shapes():
    """Stage 1 gets CompressedAD's architecture and its own pretrain_* settings, not stage 2's recipe."""
    from dataclasses import fields

    from model import CompressedADConfig, model_config
    from tests.helpers import compose_cfg

    for env in ("darkroom", "dark_key_to_door"):
        stage1 = compose_cfg("pretrain_encoder", ["experiment=quick", f"env={env}"])
        stage2 = compose_cfg("train", ["experiment=quick", f"env={env}", "model=ad_compressed_dr"])
        assert "training" not in stage1 and "train_batch_size" in stage2.training
        architecture = {f.name for f in fields(CompressedADConfig)}
        stray = {k for k in stage1.model if k not in architecture and not k.startswith("pretrain_")}
        # the seed's hand-off keys, which stage 1 refuses when set (test below)
        assert stray == {"model", "tag", "pretrained_encoder_path", "freeze_encoder"}, stray
        assert model_config(stage1.model) == model_config(stage2.model)


@pytest.mark.parametrize("stage2_key", ["model.pretrained_encoder_path=runs/x/encoder-pretrained-final.pt",
                                        "model.freeze_encoder=true"])
def test_stage1_refuses_stage2s_hand_off_keys(stage2_key, tmp_path):
    """The hand-off keys come with the inherited model file; stage 1 would ignore them, so it refuses them."""
    from pretrain_encoder import pretrain_encoder
    from utils.errors import UserConfigError

    cfg = compose_cfg("pretrain_encoder", ["experiment=quick", f"data_root={tmp_path}", stage2_key])
    with pytest.raises(UserConfigError, match="stage 2's start"):
        pretrain_encoder(cfg)
