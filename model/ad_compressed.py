"""CompressedAD: Algorithm Distillation whose old context is compressed into latent tokens.

The decoder reads `[n_latent latents | recent tokens]` (the last recent token is the query). When the
recent part would outgrow the decoder, its oldest chunk is compressed together with the current
latents into new latents by the `CompressionEncoder`: L_1 = E(L_0, chunk_1), L_k = E(L_{k-1}, chunk_k),
where L_0 is a learned "empty memory". Every stage is the same step, so the rollout can compress
any number of times with a bounded decoder length.

Parameter names: `embed_context`, `embed_ln` and `encoder` are exactly the parts that stage-1
pre-training (pretrain_encoder.py) saves and that train.py loads.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.tokens import token_dim, token_features
from model.transformer import Transformer, init_weights


class CompressionEncoder(nn.Module):
    """Perceiver-style compressor: `n_latent` learned queries read [previous latents | chunk].

    One bidirectional transformer runs over [queries | previous latents | chunk tokens] (chunk
    padding masked out as keys); the outputs at the query slots, layer-normed, are the new latents.
    """

    def __init__(self, n_latent: int, n_embd: int, n_layer: int, n_head: int, dropout: float, max_chunk_length: int):
        super().__init__()
        self.n_latent = n_latent
        self.queries = nn.Parameter(torch.zeros(n_latent, n_embd))
        self.initial_latents = nn.Parameter(torch.zeros(n_latent, n_embd))  # L_0: the empty memory
        self.latent_pos = nn.Parameter(torch.zeros(n_latent, n_embd))
        self.chunk_pos = nn.Embedding(max_chunk_length, n_embd)
        self.transformer = Transformer(n_embd, n_layer, n_head, dropout)
        self.apply(init_weights)
        for p in (self.queries, self.initial_latents, self.latent_pos):
            nn.init.normal_(p, std=0.02)

    def empty_memory(self, batch_size: int) -> torch.Tensor:
        return self.initial_latents.expand(batch_size, -1, -1)

    def forward(self, latents: torch.Tensor, chunk: torch.Tensor, chunk_valid: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, n_latent, C], embedded chunk [B, L, C], chunk_valid [B, L] bool -> new latents [B, n_latent, C]."""
        B, L, _ = chunk.shape
        x = torch.cat([
            self.queries.expand(B, -1, -1),
            latents + self.latent_pos,
            chunk + self.chunk_pos(torch.arange(L, device=chunk.device)),
        ], dim=1)
        mask = None
        if chunk_valid is not None:
            always = torch.ones(B, 2 * self.n_latent, dtype=torch.bool, device=chunk.device)
            mask = torch.cat([always, chunk_valid], dim=1)[:, None, None, :]  # keys only
        y, _ = self.transformer(x, mask)
        return y[:, : self.n_latent]


def decoder_mask(n_latent: int, n_tokens: int, device=None) -> torch.Tensor:
    """[n_latent + n_tokens]^2, True = may attend: latents see latents (bidirectional); each token sees
    all latents, itself and earlier tokens, never a later token."""
    T = n_latent + n_tokens
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask[:n_latent, :n_latent] = True
    return mask


class CompressedAD(nn.Module):
    def __init__(self, n_states: int, n_actions: int, tf_n_embd: int, tf_n_layer: int, tf_n_head: int, tf_dropout: float,
                 encoder_n_layer: int, encoder_n_head: int, n_latent: int, decoder_max_seq_length: int,
                 max_compress_length: int, max_uncompressed_length: int, rollout_compress_length: int,
                 grad_compression_stages: int | None = None):
        super().__init__()
        self.grad_compression_stages = grad_compression_stages
        self.n_states, self.n_actions, self.n_latent = n_states, n_actions, n_latent
        self.decoder_max_seq_length = decoder_max_seq_length
        self.max_recent = max_uncompressed_length  # the rollout keeps at most this many uncompressed tokens
        self.rollout_compress_length = rollout_compress_length
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), tf_n_embd)
        self.embed_ln = nn.LayerNorm(tf_n_embd)
        self.encoder = CompressionEncoder(n_latent, tf_n_embd, encoder_n_layer, encoder_n_head, tf_dropout, max_compress_length)
        self.latent_pos = nn.Parameter(torch.zeros(n_latent, tf_n_embd))
        self.token_pos = nn.Embedding(decoder_max_seq_length - n_latent, tf_n_embd)
        self.drop = nn.Dropout(tf_dropout)
        self.decoder = Transformer(tf_n_embd, tf_n_layer, tf_n_head, tf_dropout)
        self.action_head = nn.Linear(tf_n_embd, n_actions)
        for name, module in self.named_children():
            if name != "encoder":  # the encoder initialises itself
                module.apply(init_weights)
        nn.init.normal_(self.latent_pos, std=0.02)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared token embedding of decoder and encoder: embed_ln(embed_context(features))."""
        return self.embed_ln(self.embed_context(token_features(tokens, self.n_states, self.n_actions)))

    def compress(self, latents: torch.Tensor, chunk_tokens: torch.Tensor, chunk_valid=None) -> torch.Tensor:
        return self.encoder(latents, self.drop(self.embed(chunk_tokens)), chunk_valid)

    def compress_history(self, chunks: torch.Tensor, chunk_lengths: torch.Tensor) -> torch.Tensor:
        """chunks [B, D, Lc, 5], chunk_lengths [B, D] (0 = no such stage) -> latents [B, n_latent, C].

        Stage j runs batched on the samples that have a j-th chunk. Gradients flow through each
        sample's last `grad_compression_stages` stages (all stages when None); older stages run
        without gradient (truncated backpropagation), so chains can be deep at little cost.
        """
        B = chunks.shape[0]
        latents = self.encoder.empty_memory(B)
        positions = torch.arange(chunks.shape[2], device=chunks.device)
        depth = (chunk_lengths > 0).sum(1)
        for j in range(chunks.shape[1]):
            active = chunk_lengths[:, j] > 0
            if not active.any():
                break
            with_grad = active if self.grad_compression_stages is None else active & (j >= depth - self.grad_compression_stages)
            for idx, grad in ((torch.nonzero(active & ~with_grad).squeeze(1), False), (torch.nonzero(with_grad).squeeze(1), True)):
                if idx.numel() == 0:
                    continue
                length = int(chunk_lengths[idx, j].max())
                valid = positions[:length] < chunk_lengths[idx, j, None]
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    new = self.compress(latents[idx], chunks[idx, j, :length], valid)
                latents = latents.index_put((idx,), new) if idx.numel() < B else new
        return latents

    def decode(self, latents: torch.Tensor, tokens: torch.Tensor, past_kv=None, use_cache: bool = False):
        """Decoder over [latents | tokens] (or, with past_kv, over new tokens only) -> (logits per token, cache)."""
        T = tokens.shape[1]
        if past_kv is None:
            x = torch.cat([latents + self.latent_pos, self.embed(tokens) + self.token_pos.weight[:T]], dim=1)
            y, cache = self.decoder(self.drop(x), decoder_mask(self.n_latent, T, tokens.device), use_cache=use_cache)
            y = y[:, self.n_latent :]
        else:  # one new token that may attend to everything cached
            start = past_kv[0][0].shape[2] - self.n_latent
            x = self.embed(tokens) + self.token_pos.weight[start : start + T]
            y, cache = self.decoder(x, past_kv=past_kv, use_cache=True)
        return self.action_head(y), cache

    def forward(self, batch: dict) -> torch.Tensor:
        """Action logits [B, Lu, n_actions] for batch["tokens"] after compressing batch["chunks"]."""
        latents = self.compress_history(batch["chunks"], batch["chunk_lengths"])
        return self.decode(latents, batch["tokens"])[0]

    def rollout(self, n_envs: int, use_cache: bool = True) -> "CompressedADRollout":
        return CompressedADRollout(self, n_envs, use_cache)


class CompressedADRollout:
    """In-context state of a CompressedAD rollout: latents plus at most `max_recent` recent tokens.

    When a new token would exceed `max_recent`, the oldest `rollout_compress_length` tokens (a chunk
    length seen in training) are compressed with the latents into new latents. The decoder length is
    therefore at most n_latent + max_recent <= decoder_max_seq_length, whatever the history length.
    """

    def __init__(self, model: CompressedAD, n_envs: int, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.latents = model.encoder.empty_memory(n_envs)
        self.tokens = None
        self.cache = None
        self.n_compressions = 0
        self.peak_decoder_length = 0

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        m = self.model
        token = token[:, None]
        if self.tokens is not None and self.tokens.shape[1] == m.max_recent:
            c = m.rollout_compress_length
            self.latents = m.compress(self.latents, self.tokens[:, :c])
            self.tokens, self.cache = self.tokens[:, c:], None
            self.n_compressions += 1
        self.tokens = token if self.tokens is None else torch.cat([self.tokens, token], dim=1)
        self.peak_decoder_length = max(self.peak_decoder_length, m.n_latent + self.tokens.shape[1])
        if self.use_cache and self.cache is not None:
            logits, self.cache = m.decode(self.latents, token, past_kv=self.cache)
        else:
            logits, self.cache = m.decode(self.latents, self.tokens, use_cache=self.use_cache)
        return logits[:, -1]

    @property
    def context_length(self) -> int:
        return self.model.n_latent + (0 if self.tokens is None else self.tokens.shape[1])

    def stats(self) -> dict:
        return {"n_compressions": self.n_compressions, "peak_decoder_length": self.peak_decoder_length}


def check_sizes(cfg) -> None:
    """Refuse CompressedAD sizes that cannot work together, naming the values that clash."""
    errors = []
    for lo, hi in (("min_compress_length", "max_compress_length"), ("min_uncompressed_length", "max_uncompressed_length")):
        if not 1 <= cfg[lo] <= cfg[hi]:
            errors.append(f"need 1 <= {lo} ({cfg[lo]}) <= {hi} ({cfg[hi]})")
    if cfg['n_latent'] < 1:
        errors.append(f"n_latent ({cfg['n_latent']}) must be >= 1")
    if cfg['n_latent'] + cfg['max_uncompressed_length'] > cfg['decoder_max_seq_length']:
        errors.append(
            f"n_latent ({cfg['n_latent']}) + max_uncompressed_length ({cfg['max_uncompressed_length']}) = "
            f"{cfg['n_latent'] + cfg['max_uncompressed_length']} exceeds decoder_max_seq_length ({cfg['decoder_max_seq_length']}): "
            f"the decoder has no room for the latents plus the recent context and query"
        )
    c = cfg['rollout_compress_length']
    if not cfg['min_compress_length'] <= c <= cfg['max_compress_length']:
        errors.append(f"rollout_compress_length ({c}) must lie in [min_compress_length, max_compress_length] "
                      f"= [{cfg['min_compress_length']}, {cfg['max_compress_length']}], the range training uses")
    if c >= cfg['max_uncompressed_length']:
        errors.append(f"rollout_compress_length ({c}) must be < max_uncompressed_length ({cfg['max_uncompressed_length']}) "
                      f"so that recent context remains after a compression")
    if cfg['max_compression_depth'] < 0:
        errors.append(f"max_compression_depth ({cfg['max_compression_depth']}) must be >= 0")
    for n_head_key in ("tf_n_head", "encoder_n_head"):
        if cfg['tf_n_embd'] % cfg[n_head_key]:
            errors.append(f"tf_n_embd ({cfg['tf_n_embd']}) must be divisible by {n_head_key} ({cfg[n_head_key]})")
    if errors:
        raise ValueError("CompressedAD config does not fit together:\n  - " + "\n  - ".join(errors))
