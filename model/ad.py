"""Algorithm Distillation (Laskin et al., 2022): a causal transformer over the learning history.

One token per time step (see `model/tokens.py`); the model predicts the action at every position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn as nn

from model.schedule import CompressionSchedule
from model.tokens import token_dim, token_features
from model.transformer import Transformer, init_weights


class WindowBatch(TypedDict):
    """AD's training input (`dataset.ADDataset`): windows of consecutive tokens of one stream each."""
    index: torch.Tensor           # [B] dataset index (stream, start) of each window
    tokens: torch.Tensor          # [B, T, 6]
    target_actions: torch.Tensor  # [B, T] the action to predict at each position; NO_TARGET: none (noise, padding)


@dataclass(frozen=True)
class ADConfig:
    """AD's architecture: the keys of config/model/ad_dr.yaml (its recipe is config/training/ad.yaml). Validated
    once, here; stored in every checkpoint."""
    n_transit: int = 100      # context window in steps; the rollout keeps between n_transit/2 and n_transit
    tf_n_embd: int = 64
    tf_n_layer: int = 4
    tf_n_head: int = 4
    tf_dropout: float = 0.1

    @property
    def schedule(self) -> CompressionSchedule:
        """The rollout's context rule: when n_transit tokens are held, the oldest half is dropped."""
        return CompressionSchedule(window=self.n_transit, chunk=self.n_transit - self.n_transit // 2)

    def __post_init__(self):
        if self.n_transit < 2:
            raise ValueError(f"AD config does not fit together: n_transit ({self.n_transit}) must be >= 2 (half is dropped)")
        if self.tf_n_embd % self.tf_n_head:
            raise ValueError(f"AD config does not fit together: tf_n_embd ({self.tf_n_embd}) must be divisible by "
                             f"tf_n_head ({self.tf_n_head})")


class AD(nn.Module):
    def __init__(self, config: ADConfig, n_states: int, n_actions: int):
        super().__init__()
        self.config = c = config
        self.n_states, self.n_actions, self.n_transit = n_states, n_actions, c.n_transit
        self.schedule = c.schedule
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), c.tf_n_embd)
        self.embed_ln = nn.LayerNorm(c.tf_n_embd)
        self.pos_emb = nn.Embedding(c.n_transit, c.tf_n_embd)
        self.drop = nn.Dropout(c.tf_dropout)
        self.transformer = Transformer(c.tf_n_embd, c.tf_n_layer, c.tf_n_head, c.tf_dropout)
        self.action_head = nn.Linear(c.tf_n_embd, n_actions)
        self.apply(init_weights)

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embed_ln(self.embed_context(token_features(tokens, self.n_states, self.n_actions)))
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.drop(x + self.pos_emb(pos))

    def forward(self, batch: WindowBatch) -> torch.Tensor:
        """batch["tokens"] [B, T, 5] -> action logits [B, T, n_actions], aligned with batch["target_actions"]."""
        tokens = batch["tokens"]
        y, _ = self.transformer(self.embed(tokens), is_causal=True)
        return self.action_head(y)

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, A] at every step of histories tokens [B, T, 6], each from the rollout's context
        there (the window since the last drop, re-encoded from position 0)."""
        B, T, _ = tokens.shape
        seg = self.schedule.segments(T)
        n_seg = len(seg.window_start)
        window_start = torch.as_tensor(seg.window_start, device=tokens.device).repeat(B)
        first_target = torch.as_tensor(seg.first_target, device=tokens.device).repeat(B)
        end = torch.as_tensor(seg.end, device=tokens.device).repeat(B)
        sample = torch.arange(B, device=tokens.device).repeat_interleave(n_seg)
        t = window_start[:, None] + torch.arange(int((end - window_start).max()), device=tokens.device)[None]
        logits = self({"tokens": tokens[sample[:, None], t.clamp(max=T - 1)]})
        is_target = (t >= first_target[:, None]) & (t < end[:, None])
        out = logits.new_zeros(B, T, logits.shape[-1])
        out[sample[:, None].expand_as(t)[is_target], t[is_target]] = logits[is_target]
        return out

    def rollout(self, n_envs: int, use_cache: bool = True) -> "ADRollout":
        return ADRollout(self, n_envs, use_cache)


class ADRollout:
    """In-context state of an AD rollout over `n_envs` parallel envs.

    The context holds at most `n_transit` tokens. When it is full, the oldest half is dropped and the
    rest is re-encoded from position 0 (`model.schedule`), so every step sees between n_transit/2 and
    n_transit tokens (positions the model was trained on) and, with the cache, costs one token's
    compute in between. Tables call it "AD, window n (drop-half)": it sees n/2..n tokens.
    """

    def __init__(self, model: AD, n_envs: int, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.tokens = None  # [n_envs, T, 6]
        self.cache = None

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append this step's token [n_envs, 6]; return the logits of this step's action [n_envs, A]."""
        m = self.model
        token = token[:, None]
        if self.tokens is not None and m.schedule.compress_now(self.tokens.shape[1]):
            self.tokens, self.cache = self.tokens[:, m.schedule.chunk :], None
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
