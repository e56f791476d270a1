"""Algorithm Distillation (Laskin et al., 2022): a causal transformer over the learning history.

One token per time step (see `model/tokens.py`); the model predicts the action at every position.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.tokens import token_dim, token_features
from model.transformer import Transformer, init_weights


class AD(nn.Module):
    def __init__(self, n_states: int, n_actions: int, tf_n_embd: int, tf_n_layer: int, tf_n_head: int,
                 tf_dropout: float, n_transit: int):
        super().__init__()
        self.n_states, self.n_actions, self.n_transit = n_states, n_actions, n_transit
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), tf_n_embd)
        self.embed_ln = nn.LayerNorm(tf_n_embd)
        self.pos_emb = nn.Embedding(n_transit, tf_n_embd)
        self.drop = nn.Dropout(tf_dropout)
        self.transformer = Transformer(tf_n_embd, tf_n_layer, tf_n_head, tf_dropout)
        self.action_head = nn.Linear(tf_n_embd, n_actions)
        self.apply(init_weights)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embed_ln(self.embed_context(token_features(tokens, self.n_states, self.n_actions)))
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.drop(x + self.pos_emb(pos))

    def forward(self, batch: dict) -> torch.Tensor:
        """batch["tokens"] [B, T, 5] -> action logits [B, T, n_actions], aligned with batch["target_actions"]."""
        tokens = batch["tokens"]
        y, _ = self.transformer(self.embed(tokens), is_causal=True)
        return self.action_head(y)

    def rollout(self, n_envs: int, use_cache: bool = True) -> "ADRollout":
        return ADRollout(self, n_envs, use_cache)


class ADRollout:
    """In-context state of an AD rollout over `n_envs` parallel envs.

    The context holds at most `n_transit` tokens. When it is full, the oldest half is dropped and the
    rest is re-encoded from position 0, so every step sees between n_transit/2 and n_transit tokens
    (positions the model was trained on) and, with the cache, costs one token's compute in between.
    """

    def __init__(self, model: AD, n_envs: int, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.keep = model.n_transit // 2
        self.tokens = None  # [n_envs, T, 5]
        self.cache = None

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append this step's token [n_envs, 5]; return the logits of this step's action [n_envs, A]."""
        m = self.model
        token = token[:, None]
        if self.tokens is not None and self.tokens.shape[1] == m.n_transit:
            self.tokens, self.cache = self.tokens[:, -self.keep :], None
        self.tokens = token if self.tokens is None else torch.cat([self.tokens, token], dim=1)
        if self.use_cache and self.cache is not None:
            x = m.embed(token, start=self.tokens.shape[1] - 1)
            y, self.cache = m.transformer(x, past_kv=self.cache, use_cache=True)
        else:
            y, self.cache = m.transformer(m.embed(self.tokens), is_causal=True, use_cache=self.use_cache)
        return m.action_head(y[:, -1])

    @property
    def context_length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]
