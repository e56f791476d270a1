"""Pre-LN transformer blocks shared by AD, the CompressedAD decoder and the compression encoder.

Attention goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)
and takes an explicit boolean mask (True = may attend), so callers choose causal, bidirectional or
mixed patterns. An optional key/value cache lets a rollout compute only the newest token.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list  # one (k, v) pair per layer, each [B, n_head, T, head_dim]


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"tf_n_embd={n_embd} must be divisible by the number of heads ({n_head}).")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None, past_kv=None, is_causal=False, rows: slice | None = None):
        """`rows`: compute the output for these query rows only (every row is still a key and value)."""
        if rows is not None and is_causal:
            raise ValueError("rows needs an explicit attn_mask: is_causal assumes every row is a query.")
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rows is not None:
            q = q[:, :, rows]
            if attn_mask is not None:
                attn_mask = attn_mask[..., rows, :]
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        # no dropout on the attention weights: on CPU it costs as much as the rest of the layer
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, q.shape[2], C)
        return self.resid_drop(self.proj(y)), (k, v)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x, attn_mask=None, past_kv=None, is_causal=False, rows: slice | None = None):
        a, kv = self.attn(self.ln_1(x), attn_mask, past_kv, is_causal, rows)
        x = (x if rows is None else x[:, rows]) + a
        return x + self.mlp(self.ln_2(x)), kv


class Transformer(nn.Module):
    """A stack of blocks and a final LayerNorm."""

    def __init__(self, n_embd: int, n_layer: int, n_head: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, x, attn_mask=None, past_kv: KVCache | None = None, use_cache: bool = False, is_causal: bool = False,
                out_rows: slice | None = None):
        """x [B, T, C]; attn_mask (True = may attend) broadcastable to [B, n_head, T, T_past + T], or
        is_causal for a plain causal mask. Returns (y, cache or None). `out_rows`: the rows of y the
        caller reads; the last block computes only those (the others still serve as its keys and values,
        and the cache stays complete), which saves most of a layer where few rows are read."""
        cache = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, kv = block(x, attn_mask, None if past_kv is None else past_kv[i], is_causal, out_rows if i == last else None)
            cache.append(kv)
        return self.ln_f(x), (cache if use_cache else None)


def causal_mask(T: int, device=None) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
