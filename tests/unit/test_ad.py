"""AD (model/ad.py): causality and the cached rollout."""
from __future__ import annotations

import torch

from model import AD, ADConfig
from tests.helpers import N_ACTIONS, N_STATES, random_tokens, run_rollout


def small_ad():
    return AD(ADConfig(tf_n_embd=32, tf_n_layer=2, tf_n_head=2, tf_dropout=0.0, n_transit=30), N_STATES, N_ACTIONS).eval()


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
