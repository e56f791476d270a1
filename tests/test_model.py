import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from model import AD, CompressedAD, build_model, check_sizes, rollout_memory_bytes
from model.ad_compressed import decoder_mask
from model.tokens import random_tokens as tokens_in_range
from tests.conftest import ROOT

N_STATES, N_ACTIONS = 81, 5


def random_tokens(B, T, seed=0):
    return tokens_in_range((B, T), N_STATES, N_ACTIONS, seed)


def compressed_cfg(**over):
    cfg = OmegaConf.load(ROOT / "config/model/ad_compressed_dr.yaml")
    cfg.merge_with(OmegaConf.load(ROOT / "config/experiment_model/quick_ad_compressed_dr.yaml").model)
    cfg.merge_with(dict(tf_n_layer=2, encoder_n_layer=1, **over))
    return cfg


def small_ad():
    return AD(N_STATES, N_ACTIONS, tf_n_embd=32, tf_n_layer=2, tf_n_head=2, tf_dropout=0.0, n_transit=30).eval()


def test_ad_is_causal():
    model = small_ad()
    tokens = random_tokens(2, 30)
    before = model({"tokens": tokens})
    changed = tokens.clone()
    changed[:, 20:] = random_tokens(2, 10, seed=1)
    after = model({"tokens": changed})
    assert torch.allclose(before[:, :20], after[:, :20], atol=1e-6)
    assert not torch.allclose(before[:, 20:], after[:, 20:], atol=1e-3)


def test_decoder_mask_pattern():
    m = decoder_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # latents: bidirectional among latents, blind to tokens
    assert m[3:, :3].all()  # every token sees all latents
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())  # tokens causal


def test_compressed_ad_no_position_sees_a_later_token():
    model = build_model(compressed_cfg(tf_dropout=0.0), N_STATES, N_ACTIONS).eval()
    latents = model.encoder.empty_memory(2)
    tokens = random_tokens(2, 30)
    before, _ = model.decode(latents, tokens)
    changed = tokens.clone()
    changed[:, 12:] = random_tokens(2, 18, seed=3)
    after, _ = model.decode(latents, changed)
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-6)
    # and the latents matter for every token
    other, _ = model.decode(torch.randn_like(latents), tokens)
    assert not torch.allclose(before[:, 0], other[:, 0], atol=1e-4)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_compressed_shapes_at_every_depth_and_gradients_reach_every_stage(depth):
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before
    cfg = compressed_cfg(tf_dropout=0.0)
    model = build_model(cfg, N_STATES, N_ACTIONS)
    B, Lc, Lu = 3, 25, 30
    chunks = random_tokens(B, max(depth, 1) * Lc).view(B, max(depth, 1), Lc, 5)[:, :depth]
    lengths = torch.full((B, depth), Lc)
    if depth:
        lengths[0, -1] = 0  # sample 0 is one stage shallower
        lengths[1, 0] = 21  # and sample 1 has a shorter first chunk (padding masked)
    latents = model.compress_history(chunks, lengths)
    assert latents.shape == (B, cfg.n_latent, cfg.tf_n_embd)
    logits = model({"chunks": chunks, "chunk_lengths": lengths, "tokens": random_tokens(B, Lu, 5)})
    assert logits.shape == (B, Lu, N_ACTIONS)
    if depth:
        chunks.requires_grad_(False)
        emb_grad = torch.autograd.grad(logits[2].sum(), model.embed_context.weight, retain_graph=True)[0]
        assert emb_grad.abs().sum() > 0
        # a change in the first chunk reaches the prediction through all stages
        altered = chunks.clone()
        altered[2, 0, :5] = random_tokens(1, 5, 9)[0]
        new = model({"chunks": altered, "chunk_lengths": lengths, "tokens": random_tokens(B, Lu, 5)})
        assert (new[2] - logits[2]).abs().max() > 0  # small at initialisation after 3 stages, but not zero
        assert torch.equal(new[:2], logits[:2])  # and it changes nothing in the other samples


def test_padding_inside_a_chunk_is_ignored():
    model = build_model(compressed_cfg(tf_dropout=0.0), N_STATES, N_ACTIONS).eval()
    chunk = random_tokens(1, 30)
    valid = torch.arange(30)[None] < 22
    a = model.compress(model.encoder.empty_memory(1), chunk, valid)
    junk = chunk.clone()
    junk[:, 22:] = random_tokens(1, 8, seed=4)
    b = model.compress(model.encoder.empty_memory(1), junk, valid)
    assert torch.allclose(a, b, atol=1e-6)


def run_rollout(model, n_steps, use_cache, n_envs=3):
    r = model.rollout(n_envs, use_cache=use_cache)
    torch.manual_seed(0)
    tokens = random_tokens(n_envs, n_steps, seed=7)
    lengths, logits, r.memory = [], [], []
    for t in range(n_steps):
        logits.append(r.step(tokens[:, t]))
        lengths.append(r.context_length)
        r.memory.append(rollout_memory_bytes(r))
    return r, torch.stack(logits, 1), lengths


def test_ad_cached_rollout_matches_uncached():
    model = small_ad()
    _, cached, lengths = run_rollout(model, 100, True)
    _, plain, _ = run_rollout(model, 100, False)
    assert torch.allclose(cached, plain, atol=1e-5)
    assert max(lengths) == 30 and min(lengths[30:]) == 16


def test_compressed_rollout_cached_matches_uncached_and_stays_bounded():
    cfg = compressed_cfg(tf_dropout=0.0)
    model = build_model(cfg, N_STATES, N_ACTIONS).eval()
    r, cached, lengths = run_rollout(model, 150, True)
    _, plain, _ = run_rollout(model, 150, False)
    assert torch.allclose(cached, plain, atol=1e-4)
    assert r.n_compressions == (150 - cfg.max_uncompressed_length - 1) // cfg.rollout_compress_length + 1


def test_compressed_rollout_decoder_length_bounded_over_2000_steps():
    cfg = compressed_cfg(tf_dropout=0.0)
    model = build_model(cfg, N_STATES, N_ACTIONS).eval()
    r, _, lengths = run_rollout(model, 2000, True, n_envs=2)
    assert max(lengths) <= cfg.decoder_max_seq_length and r.peak_decoder_length == max(lengths)
    assert r.n_compressions >= 90
    assert torch.isfinite(r.latents).all()
    assert max(r.memory[1900:]) == max(r.memory[100:200]) > 0  # memory (tokens, latents, KV cache) stays flat


def test_state_dict_splits_into_the_three_stage1_parts():
    model = build_model(compressed_cfg(), N_STATES, N_ACTIONS)
    keys = model.state_dict().keys()
    stage1 = {p for p in ("encoder.", "embed_context.", "embed_ln.") for k in keys if k.startswith(p)}
    assert stage1 == {"encoder.", "embed_context.", "embed_ln."}
    parts = {p: {k for k in keys if k.startswith(p)} for p in stage1}
    assert sum(len(v) for v in parts.values()) == len({k for v in parts.values() for k in v})  # disjoint
    assert set(model.encoder.state_dict()) == {k[len("encoder."):] for k in parts["encoder."]}
    assert set(model.embed_context.state_dict()) == {"weight", "bias"}


def test_sizes_that_clash_are_named():
    with pytest.raises(ValueError, match=r"n_latent \(50\) \+ max_uncompressed_length \(40\) = 90 exceeds decoder_max_seq_length \(56\)"):
        check_sizes(compressed_cfg(n_latent=50))
    with pytest.raises(ValueError, match=r"min_compress_length \(45\) <= max_compress_length \(40\)"):
        check_sizes(compressed_cfg(min_compress_length=45))
    with pytest.raises(ValueError, match="rollout_compress_length"):
        check_sizes(compressed_cfg(rollout_compress_length=10))
    with pytest.raises(ValueError, match="Unknown model"):
        build_model({"model": "GPT"}, N_STATES, N_ACTIONS)


def test_truncated_backprop_through_old_stages():
    cfg = compressed_cfg(tf_dropout=0.0, grad_compression_stages=1)
    model = build_model(cfg, N_STATES, N_ACTIONS)
    chunks = random_tokens(2, 3 * 20).view(2, 3, 20, 5)
    lengths = torch.full((2, 3), 20)
    # stage outputs of old stages carry no gradient: perturbing the first chunk changes the output, but
    # the gradient of the output w.r.t. the encoder's parameters comes from the last stage only
    out = model.compress_history(chunks, lengths)
    assert out.requires_grad
    full = build_model(compressed_cfg(tf_dropout=0.0, grad_compression_stages=None), N_STATES, N_ACTIONS)
    full.load_state_dict(model.state_dict())
    g_trunc = torch.autograd.grad(model.compress_history(chunks, lengths).sum(), model.encoder.initial_latents, allow_unused=True)[0]
    g_full = torch.autograd.grad(full.compress_history(chunks, lengths).sum(), full.encoder.initial_latents)[0]
    assert g_trunc is None or g_trunc.abs().sum() == 0  # L_0 enters at stage 0, which is truncated
    assert g_full.abs().sum() > 0
    assert torch.allclose(model.compress_history(chunks, lengths), full.compress_history(chunks, lengths), atol=1e-6)
