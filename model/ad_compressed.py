"""CompressedAD: Algorithm Distillation whose old context is compressed into latent tokens.

The decoder reads `[n_latent latents | recent tokens]` (the last recent token is the query). When the
recent part would outgrow its window, its oldest chunk is compressed together with the current
latents into new latents by the `CompressionEncoder`: L_1 = E(L_0, chunk_1), L_k = E(L_{k-1}, chunk_k),
where L_0 is a learned "empty memory". Every stage is the same step, so the rollout can compress
any number of times with a bounded decoder length. When to compress is `model/schedule.py`'s rule.

Training carries the memory (`forward`): each batch row is a lane that reads one learning history in
order, segment after segment (a segment = the steps during which the latents are L_k), so every
target is predicted from the context the rollout would hold there, at the rollout's depth, and each
segment costs one compression whatever its depth. The memory a lane carries into a step comes from
the step before (`dataset.HistoryLanes` says which segments a lane reads when); gradients reach each
segment's last compression only (L_{k-1} enters it detached, as truncated backpropagation through time
of length 1), so backward never walks into an earlier step.

Memory interventions (`memory=`), the causal tests of what the latents hold, replace the latents
after every compression: `clear` (the empty memory L_0), `truncate` (rebuilt from L_0 over only the
last `memory_chunks` chunks) and, in the rollout, `transplant` (another rollout's latents).

Parameter names: `embed_context`, `embed_ln` and `encoder` are exactly the parts that stage-1
pre-training (pretrain_encoder.py) saves and that train.py loads.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn as nn

from model.schedule import CompressionSchedule
from model.tokens import token_dim, token_features
from model.transformer import Transformer, init_weights


class LaneBatch(TypedDict, total=False):
    """CompressedAD's training input (`dataset.HistoryLanes`): L lanes, S consecutive segments each."""
    index: torch.Tensor           # [L, S] stream * n_segments + k of each segment
    chunks: torch.Tensor          # [L, S, c, 6] the chunk compression k compresses
    windows: torch.Tensor         # [L, S, W, 6] segment k's raw window
    target_actions: torch.Tensor  # [L * S, W] the action to predict; NO_TARGET outside the segment's own steps, on noise
    memory_reset: torch.Tensor    # [L, S] bool: the memory is L_0 at this segment (a history's first, or a restart)
    memory: torch.Tensor          # [L, n_latent, C] the latents each lane carries in (set by the training loop)
    memory_empty: torch.Tensor    # [L] bool: the carried memory is L_0


@dataclass(frozen=True)
class CompressedADConfig:
    """CompressedAD's architecture: the keys of config/model/ad_compressed_*.yaml that shape the network (the file's
    other keys are the training recipe, read by train.py). Validated once, here; stored in every checkpoint."""
    n_latent: int = 60                  # latent tokens the whole compressed past is held in
    max_uncompressed_length: int = 40   # the rollout's raw window W
    rollout_compress_length: int = 36   # tokens compressed when the window is full (W - this survive raw)
    max_compress_length: int = 40       # the longest chunk the encoder has positions for
    decoder_max_seq_length: int | None = None  # None: n_latent + max_uncompressed_length, the most the rollout needs
    tf_n_embd: int = 64
    tf_n_layer: int = 4
    tf_n_head: int = 4
    tf_dropout: float = 0.1
    encoder_n_layer: int = 3
    encoder_n_head: int = 4
    encoder_dropout: float = 0.0
    latent_write: str = "replace"       # replace | gated

    @property
    def schedule(self) -> CompressionSchedule:
        """When the rollout compresses: the one schedule the rollout, the lanes (dataset.py) and the model share."""
        return CompressionSchedule(window=self.max_uncompressed_length, chunk=self.rollout_compress_length)

    def __post_init__(self):
        if self.decoder_max_seq_length is None:
            object.__setattr__(self, "decoder_max_seq_length", self.n_latent + self.max_uncompressed_length)
        errors = []
        if self.n_latent < 1:
            errors.append(f"n_latent ({self.n_latent}) must be >= 1")
        if self.n_latent + self.max_uncompressed_length > self.decoder_max_seq_length:
            errors.append(
                f"n_latent ({self.n_latent}) + max_uncompressed_length ({self.max_uncompressed_length}) = "
                f"{self.n_latent + self.max_uncompressed_length} exceeds decoder_max_seq_length ({self.decoder_max_seq_length}): "
                f"the decoder has no room for the latents plus the recent context and query (null derives it)")
        c, window = self.rollout_compress_length, self.max_uncompressed_length
        if not 1 <= c <= self.max_compress_length:
            errors.append(f"rollout_compress_length ({c}) must lie in [1, max_compress_length ({self.max_compress_length})], "
                          f"the chunk lengths the encoder has positions for")
        if not c <= window:
            errors.append(f"rollout_compress_length ({c}) must be <= max_uncompressed_length ({window}): the window it is cut from")
        for n_head_key in ("tf_n_head", "encoder_n_head"):
            if self.tf_n_embd % getattr(self, n_head_key):
                errors.append(f"tf_n_embd ({self.tf_n_embd}) must be divisible by {n_head_key} ({getattr(self, n_head_key)})")
        if self.latent_write not in ("replace", "gated"):
            errors.append(f"latent_write ({self.latent_write}) must be replace or gated")
        if errors:
            raise ValueError("CompressedAD config does not fit together:\n  - " + "\n  - ".join(errors))



class CompressionEncoder(nn.Module):
    """Perceiver-style compressor: `n_latent` learned queries read [previous latents | chunk].

    One bidirectional transformer runs over [queries | previous latents | chunk tokens] (chunk
    padding masked out as keys); the outputs at the query slots, layer-normed, are the new latents.
    """

    def __init__(self, n_latent: int, n_embd: int, n_layer: int, n_head: int, dropout: float, max_chunk_length: int,
                 latent_write: str = "replace"):
        super().__init__()
        if latent_write not in ("replace", "gated"):
            raise ValueError(f"latent_write must be replace or gated, got {latent_write}")
        self.n_latent = n_latent
        self.queries = nn.Parameter(torch.zeros(n_latent, n_embd))
        self.initial_latents = nn.Parameter(torch.zeros(n_latent, n_embd))  # L_0: the empty memory
        self.latent_pos = nn.Parameter(torch.zeros(n_latent, n_embd))
        self.chunk_pos = nn.Embedding(max_chunk_length, n_embd)
        self.drop = nn.Dropout(dropout)  # on the chunk's embeddings
        self.transformer = Transformer(n_embd, n_layer, n_head, dropout)
        # gated: L_k = g * L_{k-1} + (1 - g) * new, g = sigmoid(W [L_{k-1} | new] + b) per latent dimension
        self.gate = nn.Linear(2 * n_embd, n_embd) if latent_write == "gated" else None
        self.apply(init_weights)
        for p in (self.queries, self.initial_latents, self.latent_pos):
            nn.init.normal_(p, std=0.02)
        if self.gate is not None:
            nn.init.constant_(self.gate.bias, 2.0)  # sigmoid(2) = 0.88: keep most of the old memory at first

    @classmethod
    def from_config(cls, c: CompressedADConfig) -> "CompressionEncoder":
        """The encoder CompressedAD and stage 1's EncoderPretrainModel share (one config, same shapes)."""
        return cls(c.n_latent, c.tf_n_embd, c.encoder_n_layer, c.encoder_n_head, c.encoder_dropout, c.max_compress_length,
                   c.latent_write)

    def empty_memory(self, batch_size: int) -> torch.Tensor:
        return self.initial_latents.expand(batch_size, -1, -1)

    def forward(self, latents: torch.Tensor, chunk: torch.Tensor, chunk_valid: torch.Tensor | None = None) -> torch.Tensor:
        """latents [B, n_latent, C], embedded chunk [B, L, C], chunk_valid [B, L] bool -> new latents [B, n_latent, C]."""
        B, L, _ = chunk.shape
        x = torch.cat([
            self.queries.expand(B, -1, -1),
            latents + self.latent_pos,
            self.drop(chunk) + self.chunk_pos(torch.arange(L, device=chunk.device)),
        ], dim=1)
        mask = None
        if chunk_valid is not None:
            always = torch.ones(B, 2 * self.n_latent, dtype=torch.bool, device=chunk.device)
            mask = torch.cat([always, chunk_valid], dim=1)[:, None, None, :]  # keys only
        new, _ = self.transformer(x, mask, out_rows=slice(0, self.n_latent))  # only the query slots are read
        if self.gate is None:
            return new
        keep = torch.sigmoid(self.gate(torch.cat([latents, new], dim=-1)))
        return keep * latents + (1 - keep) * new


def decoder_mask(n_latent: int, n_tokens: int, device=None) -> torch.Tensor:
    """[n_latent + n_tokens]^2, True = may attend: latents see latents (bidirectional); each token sees
    all latents, itself and earlier tokens, never a later token."""
    T = n_latent + n_tokens
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask[:n_latent, :n_latent] = True
    return mask


MEMORY_MODES = ("normal", "clear", "transplant", "truncate")


@contextmanager
def without_dropout(*modules: nn.Module):
    """Run modules as the rollout does (no dropout), then restore their mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class CompressedAD(nn.Module):
    def __init__(self, config: CompressedADConfig, n_states: int, n_actions: int):
        super().__init__()
        self.config = c = config
        self.n_states, self.n_actions, self.n_latent = n_states, n_actions, c.n_latent
        self.decoder_max_seq_length = c.decoder_max_seq_length
        self.schedule = c.schedule
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), c.tf_n_embd)
        self.embed_ln = nn.LayerNorm(c.tf_n_embd)
        self.encoder = CompressionEncoder.from_config(c)
        self.latent_pos = nn.Parameter(torch.zeros(c.n_latent, c.tf_n_embd))
        self.token_pos = nn.Embedding(c.decoder_max_seq_length - c.n_latent, c.tf_n_embd)
        self.drop = nn.Dropout(c.tf_dropout)
        self.decoder = Transformer(c.tf_n_embd, c.tf_n_layer, c.tf_n_head, c.tf_dropout)
        self.action_head = nn.Linear(c.tf_n_embd, n_actions)
        for name, module in self.named_children():
            if name != "encoder":  # the encoder initialises itself
                module.apply(init_weights)
        nn.init.normal_(self.latent_pos, std=0.02)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shared token embedding of decoder and encoder: embed_ln(embed_context(features))."""
        return self.embed_ln(self.embed_context(token_features(tokens, self.n_states, self.n_actions)))

    def compress(self, latents: torch.Tensor, chunk_tokens: torch.Tensor, chunk_valid=None) -> torch.Tensor:
        return self.encoder(latents, self.embed(chunk_tokens), chunk_valid)

    def roll(self, latents: torch.Tensor, chunks: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Compress chunks [N, m, c, 6] into latents [N, n_latent, C] one after another; stage i runs on
        the rows where active[:, i] (a row's inactive stages keep its latents as they are)."""
        for i in range(chunks.shape[1]):
            rows = torch.nonzero(active[:, i]).squeeze(1)
            if rows.numel() == len(latents):
                latents = self.compress(latents, chunks[:, i])
            elif rows.numel():
                latents = latents.index_put((rows,), self.compress(latents[rows], chunks[rows, i]))
        return latents

    def decode(self, latents: torch.Tensor, tokens: torch.Tensor, past_kv=None, use_cache: bool = False):
        """Decoder over [latents | tokens] (or, with past_kv, over new tokens only) -> (logits per token, cache)."""
        T = tokens.shape[1]
        if past_kv is None:
            x = torch.cat([latents + self.latent_pos, self.embed(tokens) + self.token_pos.weight[:T]], dim=1)
            y, cache = self.decoder(self.drop(x), decoder_mask(self.n_latent, T, tokens.device), use_cache=use_cache,
                                    out_rows=slice(self.n_latent, None))  # the latents' own outputs are never read
        else:  # one new token that may attend to everything cached
            start = past_kv[0][0].shape[2] - self.n_latent
            x = self.embed(tokens) + self.token_pos.weight[start : start + T]
            y, cache = self.decoder(x, past_kv=past_kv, use_cache=True)
        return self.action_head(y), cache

    # ------------------------------------------------------------------ training: lanes carry the memory

    def forward(self, batch: LaneBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One training step of `L` lanes over `S` consecutive segments each (a `dataset.HistoryLanes` batch).

        batch: `memory` [L, n_latent, C] and `memory_empty` [L] (the latents each lane carries in: L_{k-1} of
        its first segment k, or L_0 where empty), `chunks` [L, S, c, 6] (the chunk compression k compresses),
        `windows` [L, S, W, 6] (segment k's raw window), `memory_reset` [L, S] (the memory is L_0 at this
        segment: a history's first segment, or a restart). Returns action logits [L * S, W, A] aligned with
        batch["target_actions"], and the memory to carry into the next step (detached) with its empty flags.
        """
        memory, empty, reset = batch["memory"], batch["memory_empty"], batch["memory_reset"]
        n_lanes, n_segments = reset.shape
        initial = self.encoder.empty_memory(n_lanes)
        latents = []
        for s in range(n_segments):
            previous = torch.where(empty[:, None, None], initial, memory.detach())  # L_0 keeps its gradient
            rows = torch.nonzero(~reset[:, s]).squeeze(1)
            if rows.numel() == n_lanes:
                memory = self.compress(previous, batch["chunks"][:, s])
            else:
                memory = initial if rows.numel() == 0 else \
                    initial.index_put((rows,), self.compress(previous[rows], batch["chunks"][rows, s]))
            empty = reset[:, s]
            latents.append(memory)
        logits, _ = self.decode(torch.stack(latents, 1).flatten(0, 1), batch["windows"].flatten(0, 1))
        return logits, (memory.detach(), empty)

    # ------------------------------------------------------------------ the teacher-forced view (exact, no gradient)

    def history_chunks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The chunks the rollout compresses in histories tokens [B, T, 6] from their first step: [B, K, c, 6]."""
        seg, c = self.schedule.segments(tokens.shape[1]), self.schedule.chunk
        t = torch.as_tensor(seg.chunk_start, device=tokens.device)[:, None] + torch.arange(c, device=tokens.device)
        return tokens[:, t]

    @torch.no_grad()
    def memory_at(self, tokens: torch.Tensor, k: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """L_{k[b]} of history b (tokens [B, T, 6] from its first step), as the rollout holds it after k[b]
        compressions with the current weights, the memory begun empty at segment start[b] (default 0):
        [B, n_latent, C]. The slow, exact reference for the memory that training carries."""
        chunks = self.history_chunks(tokens)[:, : int(k.max())]
        stage = torch.arange(chunks.shape[1], device=tokens.device)[None]  # stage i is compression i + 1
        active = (stage < k[:, None]) & (stage >= (0 if start is None else start[:, None]))
        with without_dropout(self.encoder):
            return self.roll(self.encoder.empty_memory(len(tokens)), chunks, active)

    @torch.no_grad()
    def segment_latents(self, tokens: torch.Tensor, memory: str = "normal", memory_chunks: int = 1) -> torch.Tensor:
        """L_k of every segment k of histories tokens [B, T, 6] from their first step: [B, K + 1, n_latent, C].
        `memory` = clear / truncate: L_0 / rebuilt from L_0 over the last `memory_chunks` chunks instead."""
        B = len(tokens)
        chunks = self.history_chunks(tokens)
        K = chunks.shape[1]
        with without_dropout(self.encoder):
            if memory == "normal":
                chain = [self.encoder.empty_memory(B)]
                for j in range(K):
                    chain.append(self.compress(chain[-1], chunks[:, j]))
                return torch.stack(chain, 1)
            if memory not in ("clear", "truncate"):
                raise ValueError(f"memory='{memory}' has no teacher-forced form; use one of normal, clear, truncate.")
            m = 0 if memory == "clear" else memory_chunks
            k = torch.arange(K + 1, device=tokens.device)
            stages = k[:, None] - m + 1 + torch.arange(m, device=tokens.device)[None]  # segment k's last m chunks (1-based)
            picked = chunks[:, (stages - 1).clamp(min=0)].flatten(0, 1)  # [B * (K + 1), m, c, 6]
            latents = self.roll(self.encoder.empty_memory(len(picked)), picked, (stages >= 1).repeat(B, 1))
            return latents.view(B, K + 1, *latents.shape[1:])

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor, memory: str = "normal", memory_chunks: int = 1) -> torch.Tensor:
        """Logits [B, T, A] at every step of histories tokens [B, T, 6], each from the rollout's context
        there: [L_k | the raw window since the last compression]."""
        B, T, _ = tokens.shape
        seg = self.schedule.segments(T)
        latents = self.segment_latents(tokens, memory, memory_chunks).flatten(0, 1)  # [B * (K + 1), n_latent, C]
        device = tokens.device
        t, is_target = (torch.as_tensor(x, device=device).repeat(B, 1) for x in seg.windows())  # [B * (K + 1), W]
        sample = torch.arange(B, device=device).repeat_interleave(seg.n_compressions + 1)
        logits, _ = self.decode(latents, tokens[sample[:, None], t.clamp(max=T - 1)])
        out = logits.new_zeros(B, T, logits.shape[-1])
        out[sample[:, None].expand_as(t)[is_target], t[is_target]] = logits[is_target]
        return out

    def rollout(self, n_envs: int, use_cache: bool = True, memory: str = "normal", memory_chunks: int = 1,
                donor=None) -> "CompressedADRollout":
        return CompressedADRollout(self, n_envs, use_cache, memory, memory_chunks, donor)


class CompressedADRollout:
    """In-context state of a CompressedAD rollout: latents plus at most `schedule.window` recent tokens.

    When the schedule says so, the oldest `schedule.chunk` tokens are compressed with the latents into
    new latents. The decoder length is therefore at most n_latent + window <= decoder_max_seq_length,
    whatever the history length. `memory` alters the latents after every compression (module
    docstring); `transplant` gives env i the latents of env `donor[i]` (donors keep their own).
    """

    def __init__(self, model: CompressedAD, n_envs: int, use_cache: bool = True, memory: str = "normal",
                 memory_chunks: int = 1, donor=None):
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory='{memory}' is not one of {MEMORY_MODES}.")
        if memory == "transplant" and donor is None:
            raise ValueError("memory='transplant' needs donor: the env whose latents each env receives.")
        if memory == "truncate" and memory_chunks < 1:
            raise ValueError(f"memory='truncate' needs memory_chunks >= 1 (0 is memory='clear'), got {memory_chunks}.")
        self.model, self.use_cache = model, use_cache
        self.memory, self.memory_chunks = memory, memory_chunks
        self.donor = None if donor is None else torch.as_tensor(donor, dtype=torch.long)
        self.latents = model.encoder.empty_memory(n_envs)
        self.tokens = None
        self.cache = None
        self.recent_chunks = []  # truncate: the last memory_chunks compressed chunks
        self.n_compressions = 0
        self.peak_decoder_length = 0

    def _compress(self) -> None:
        m, c = self.model, self.model.schedule.chunk
        chunk, self.tokens, self.cache = self.tokens[:, :c], self.tokens[:, c:], None
        if self.memory == "clear":
            self.latents = m.encoder.empty_memory(len(chunk))
        elif self.memory == "truncate":
            self.recent_chunks = (self.recent_chunks + [chunk])[-self.memory_chunks :]
            latents = m.encoder.empty_memory(len(chunk))
            for old in self.recent_chunks:
                latents = m.compress(latents, old)
            self.latents = latents
        else:
            self.latents = m.compress(self.latents, chunk)
            if self.memory == "transplant":
                self.latents = self.latents[self.donor.to(self.latents.device)]
        self.n_compressions += 1

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        m = self.model
        token = token[:, None]
        if self.tokens is not None and m.schedule.compress_now(self.tokens.shape[1]):
            self._compress()
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
