"""AD (model/ad.py): causality and the cached rollout."""
from __future__ import annotations

import torch

from model import AD, ADConfig, rollout_memory_bytes
from tests.helpers import N_ACTIONS, N_STATES, random_tokens


def small_ad():
    return AD(ADConfig(tf_n_embd=32, tf_n_layer=2, tf_n_head=2, tf_dropout=0.0, n_transit=30), N_STATES, N_ACTIONS).eval()


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


def test_ad_is_causal():
    model = small_ad()
    tokens = random_tokens(2, 30)
    before = model({"tokens": tokens})
    changed = tokens.clone()
    changed[:, 20:] = random_tokens(2, 10, seed=1)
    after = model({"tokens": changed})
    assert torch.allclose(before[:, :20], after[:, :20], atol=1e-6)
    assert not torch.allclose(before[:, 20:], after[:, 20:], atol=1e-3)


def test_ad_cached_rollout_matches_uncached():
    model = small_ad()
    _, cached, lengths = run_rollout(model, 100, True)
    _, plain, _ = run_rollout(model, 100, False)
    assert torch.allclose(cached, plain, atol=1e-5)
    assert max(lengths) == 30 and min(lengths[30:]) == 16
