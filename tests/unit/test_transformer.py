"""The shared transformer (model/transformer.py) and CompressedAD's decoder mask."""
from __future__ import annotations

import torch

from model.ad_compressed import decoder_mask
from model.transformer import Transformer


def test_decoder_mask_pattern():
    m = decoder_mask(3, 4)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # latents: bidirectional among latents, blind to tokens
    assert m[3:, :3].all()  # every token sees all latents
    assert torch.equal(m[3:, 3:], torch.ones(4, 4, dtype=torch.bool).tril())  # tokens causal


def test_out_rows_computes_exactly_the_rows_asked_for():
    torch.manual_seed(0)
    net = Transformer(32, 2, 4, 0.0)
    x, mask = torch.randn(3, 20, 32), decoder_mask(5, 15)
    full, cache = net(x, mask, use_cache=True)
    for rows in (slice(0, 5), slice(5, None)):
        part, part_cache = net(x, mask, use_cache=True, out_rows=rows)
        assert torch.allclose(part, full[:, rows], atol=1e-6)
        assert all(torch.allclose(a, b) for kv, pkv in zip(cache, part_cache) for a, b in zip(kv, pkv))  # the cache stays whole
