"""CompressedAD: Algorithm Distillation whose old context is compressed into latent tokens.

The decoder reads `[n_latent latents | recent tokens]` (the last recent token is the query). When the
recent part would outgrow its window, its oldest chunk is compressed together with the current
latents into new latents by the `CompressionEncoder`: L_1 = E(L_0, chunk_1), L_k = E(L_{k-1}, chunk_k),
where L_0 is a learned "empty memory". Every stage is the same step, so the rollout can compress
any number of times with a bounded decoder length. When to compress is `model/schedule.py`'s rule.

Two ways to train it (`training_mode`):
- `stream`: a sample is a span of one learning history processed exactly as the rollout processes
  it (same schedule from the history's first step, latents carried from compression to compression),
  so every target sees the context the rollout would have there, at the rollout's compression depth;
  gradients flow through each target's last `grad_compression_stages` compressions.
- `chains`: a sample is a short random chain of chunks (depth 0..max_compression_depth) followed by
  an uncompressed part whose every token is a target (the earlier recipe).

Memory interventions (`memory=`), the causal tests of what the latents hold, replace the latents
after every compression: `clear` (the empty memory L_0), `truncate` (rebuilt from L_0 over only the
last `memory_chunks` chunks) and, in the rollout, `transplant` (another rollout's latents).

Parameter names: `embed_context`, `embed_ln` and `encoder` are exactly the parts that stage-1
pre-training (pretrain_encoder.py) saves and that train.py loads.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from model.schedule import CompressionSchedule
from model.tokens import token_dim, token_features
from model.transformer import Transformer, init_weights


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
        y, _ = self.transformer(x, mask)
        new = y[:, : self.n_latent]
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
    def __init__(self, n_states: int, n_actions: int, tf_n_embd: int, tf_n_layer: int, tf_n_head: int, tf_dropout: float,
                 encoder_n_layer: int, encoder_n_head: int, n_latent: int, decoder_max_seq_length: int,
                 max_compress_length: int, max_uncompressed_length: int, rollout_compress_length: int,
                 grad_compression_stages: int | None = None, stream_gradient: str = "per_target", latent_write: str = "replace",
                 encoder_dropout: float | None = None):
        super().__init__()
        if stream_gradient not in ("per_target", "span"):
            raise ValueError(f"stream_gradient must be per_target or span, got {stream_gradient}")
        self.grad_compression_stages = grad_compression_stages
        self.stream_gradient = stream_gradient
        self.n_states, self.n_actions, self.n_latent = n_states, n_actions, n_latent
        self.decoder_max_seq_length = decoder_max_seq_length
        self.schedule = CompressionSchedule(window=max_uncompressed_length, chunk=rollout_compress_length)
        self.embed_context = nn.Linear(token_dim(n_states, n_actions), tf_n_embd)
        self.embed_ln = nn.LayerNorm(tf_n_embd)
        encoder_dropout = tf_dropout if encoder_dropout is None else encoder_dropout
        self.encoder = CompressionEncoder(n_latent, tf_n_embd, encoder_n_layer, encoder_n_head, encoder_dropout,
                                          max_compress_length, latent_write)
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
        return self.encoder(latents, self.embed(chunk_tokens), chunk_valid)

    def roll(self, latents: torch.Tensor, chunks: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Compress chunks [N, m, c, 6] into latents [N, n_latent, C] one after another; stage i runs on
        the rows where active[:, i] (rows may start late: a row's inactive stages precede its active ones)."""
        for i in range(chunks.shape[1]):
            rows = torch.nonzero(active[:, i]).squeeze(1)
            if rows.numel() == len(latents):
                latents = self.compress(latents, chunks[:, i])
            elif rows.numel():
                latents = latents.index_put((rows,), self.compress(latents[rows], chunks[rows, i]))
        return latents

    def compress_history(self, chunks: torch.Tensor, chunk_lengths: torch.Tensor) -> torch.Tensor:
        """`chains` mode: chunks [B, D, Lc, 6], chunk_lengths [B, D] (0 = no such stage) -> latents [B, n_latent, C].

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

    def segment_latents(self, tokens: torch.Tensor, first_segment: torch.Tensor, n_segments: torch.Tensor,
                        memory: str = "normal", memory_chunks: int = 1, grad_stages: int | None = None,
                        gradient: str = "per_target", memory_start: torch.Tensor | None = None):
        """The latents L_k of every segment k of every span: (sample [N], k [N], latents [N, n_latent, C]).

        tokens [B, T, 6] are histories from their first step; sample b's span is its segments
        first_segment[b] .. first_segment[b] + n_segments[b] - 1 (model/schedule.py). With gradient
        enabled and `gradient` = per_target, each L_k carries gradient through exactly its last
        `grad_stages` compressions (all when None; each segment recomputes them); with `span`, one
        chain carries gradient from `grad_stages` compressions before the span's first segment through
        the whole span (truncated backpropagation through time: the span's i-th segment reaches
        grad_stages + i compressions, at one encoder pass per segment). Either reaches L_0 when the chain
        from it is no longer. The stages before run without gradient or dropout, as the rollout runs them.
        `memory` = clear / truncate: L_0 / rebuilt from L_0 over the last `memory_chunks` chunks instead.
        `memory_start` [B] (training only): sample b's memory begins empty after compression
        memory_start[b] instead of at the history's first step (0), as if its history had begun there.
        """
        B, T, _ = tokens.shape
        seg, c, device = self.schedule.segments(T), self.schedule.chunk, tokens.device
        span = torch.arange(int(n_segments.max()), device=device)
        pair_ok = span[None] < n_segments[:, None]
        sample = torch.arange(B, device=device)[:, None].expand_as(pair_ok)[pair_ok]
        k = (first_segment[:, None] + span[None])[pair_ok]  # segment index = compressions before it
        chunk_at = torch.as_tensor(seg.chunk_start if seg.n_compressions else [0], device=device)  # [K]
        offsets = torch.arange(c, device=device)

        def chunk_tokens(rows: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
            """Tokens of compression `stage` (1-based; clamped where the stage does not exist) per row: [N, m, c, 6]."""
            start = chunk_at[(stage - 1).clamp(0, len(chunk_at) - 1)]
            return tokens[rows[:, None, None], (start[..., None] + offsets).clamp(max=T - 1)]

        empty = self.encoder.empty_memory(len(k))
        if memory in ("clear", "truncate"):
            m = 0 if memory == "clear" else memory_chunks
            stages = k[:, None] - m + 1 + torch.arange(m, device=device)[None]  # the last m chunks, oldest first
            return sample, k, self.roll(empty, chunk_tokens(sample, stages), stages >= 1)
        if memory != "normal":
            raise ValueError(f"memory='{memory}' has no teacher-forced form; use one of normal, clear, truncate.")
        if not torch.is_grad_enabled():
            G = 0  # values only: every segment reads the one chain
        else:
            G = int(k.max()) if grad_stages is None else grad_stages
        # L_j of every sample without gradient, up to the stage each segment starts its gradient from
        start_stage = (k - G).clamp(min=0)
        if gradient == "span" and G > 0:  # the chain with gradient starts G stages before each span's first segment
            start_stage = torch.minimum(start_stage, (first_segment[sample] - G).clamp(min=0))
        need = torch.zeros(B, dtype=torch.long, device=device).scatter_reduce_(0, sample, start_stage, "amax")
        all_rows = torch.arange(B, device=device)
        begin = torch.zeros(B, dtype=torch.long, device=device) if memory_start is None else memory_start  # memory is L_0 up to here
        with torch.no_grad(), without_dropout(self.encoder):  # the latents the rollout would hold
            chain = [self.encoder.empty_memory(B)]
            for j in range(1, int(need.max()) + 1):
                stage = torch.full((B, 1), j, device=device)
                chain.append(self.roll(chain[-1], chunk_tokens(all_rows, stage), (need >= j)[:, None] & (stage > begin[:, None])))
            chain = torch.stack(chain, 1)  # [B, J + 1, n_latent, C]
        if gradient == "span" and G > 0:  # one chain per sample from its span's start_stage, gradient all along
            first = (first_segment - G).clamp(min=0)
            last = first_segment + n_segments - 1
            at = self.encoder.empty_memory(B)
            at = torch.where((first > begin)[:, None, None], chain[all_rows, first], at)  # L_0 keeps its gradient
            along = [at]
            for i in range(int((last - first).max())):
                stage = first + 1 + i
                at = self.roll(at, chunk_tokens(all_rows, stage[:, None]), ((stage <= last) & (stage > begin))[:, None])
                along.append(at)
            return sample, k, torch.stack(along, 1)[sample, k - first[sample]]
        start = torch.where((start_stage > begin[sample])[:, None, None], chain[sample, start_stage], empty)  # L_0 keeps its gradient
        stages = start_stage[:, None] + 1 + torch.arange(G, device=device)[None]
        return sample, k, self.roll(start, chunk_tokens(sample, stages), (stages <= k[:, None]) & (stages > begin[sample, None]))

    def stream_logits(self, tokens: torch.Tensor, first_segment: torch.Tensor, n_segments: torch.Tensor,
                      memory: str = "normal", memory_chunks: int = 1, grad_stages: int | None = None,
                      memory_start: torch.Tensor | None = None) -> torch.Tensor:
        """`stream` mode: the rollout's view of whole histories, teacher-forced. Logits [B, T, A] for the
        targets of each sample's span (zero elsewhere), each predicted from [L_k | raw window] exactly as
        the rollout predicts it at that step (see `segment_latents` for the arguments)."""
        B, T, _ = tokens.shape
        seg = self.schedule.segments(T)
        sample, k, latents = self.segment_latents(tokens, first_segment, n_segments, memory, memory_chunks, grad_stages,
                                                  self.stream_gradient, memory_start)
        # decoder windows: [L_k | tokens window_start[k] .. end[k] - 1]
        window_start, first_target, end = (torch.as_tensor(x, device=tokens.device)[k]
                                           for x in (seg.window_start, seg.first_target, seg.end))
        t = window_start[:, None] + torch.arange(int((end - window_start).max()), device=tokens.device)[None]
        logits, _ = self.decode(latents, tokens[sample[:, None], t.clamp(max=T - 1)])
        is_target = (t >= first_target[:, None]) & (t < end[:, None])
        out = logits.new_zeros(B, T, logits.shape[-1])
        out[sample[:, None].expand_as(t)[is_target], t[is_target]] = logits[is_target]
        return out

    def forward(self, batch: dict) -> torch.Tensor:
        """Action logits aligned with batch["target_actions"]: a `stream` batch has `first_segment`, a
        `chains` batch has `chunks`."""
        if "first_segment" in batch:
            return self.stream_logits(batch["tokens"], batch["first_segment"], batch["n_segments"],
                                      grad_stages=self.grad_compression_stages, memory_start=batch.get("memory_start"))
        latents = self.compress_history(batch["chunks"], batch["chunk_lengths"])
        return self.decode(latents, batch["tokens"])[0]

    @torch.no_grad()
    def teacher_forced_logits(self, tokens: torch.Tensor, memory: str = "normal", memory_chunks: int = 1) -> torch.Tensor:
        """Logits [B, T, A] at every step of histories tokens [B, T, 6], each from the rollout's context there."""
        n = self.schedule.segments(tokens.shape[1]).n_compressions + 1
        zeros = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        return self.stream_logits(tokens, zeros, zeros + n, memory, memory_chunks)

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


def check_sizes(cfg) -> None:
    """Refuse CompressedAD sizes that cannot work together, naming the values that clash."""
    errors = []
    mode = cfg.get("training_mode", "chains")
    if mode not in ("stream", "chains"):
        errors.append(f"training_mode ({mode}) must be stream or chains")
    pairs = [("min_uncompressed_length", "max_uncompressed_length")]
    if mode == "chains":
        pairs.insert(0, ("min_compress_length", "max_compress_length"))
    for lo, hi in pairs:
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
    c, window = cfg['rollout_compress_length'], cfg['max_uncompressed_length']
    if mode == "chains" and not cfg['min_compress_length'] <= c <= cfg['max_compress_length']:
        errors.append(f"rollout_compress_length ({c}) must lie in [min_compress_length, max_compress_length] "
                      f"= [{cfg['min_compress_length']}, {cfg['max_compress_length']}], the range training uses")
    if mode == "stream" and not 1 <= c <= cfg['max_compress_length']:
        errors.append(f"rollout_compress_length ({c}) must lie in [1, max_compress_length ({cfg['max_compress_length']})], "
                      f"the chunk lengths the encoder has positions for")
    if not c <= window:
        errors.append(f"rollout_compress_length ({c}) must be <= max_uncompressed_length ({window}): the window it is cut from")
    if mode == "chains" and c == window:
        errors.append(f"rollout_compress_length ({c}) must be < max_uncompressed_length ({window}) in chains mode, whose "
                      f"targets always see at least min_uncompressed_length raw tokens")
    if cfg['max_compression_depth'] < 0:
        errors.append(f"max_compression_depth ({cfg['max_compression_depth']}) must be >= 0")
    stages = cfg.get("grad_compression_stages")
    if stages is not None and stages < 1:
        errors.append(f"grad_compression_stages ({stages}) must be >= 1 or null (every stage)")
    for n_head_key in ("tf_n_head", "encoder_n_head"):
        if cfg['tf_n_embd'] % cfg[n_head_key]:
            errors.append(f"tf_n_embd ({cfg['tf_n_embd']}) must be divisible by {n_head_key} ({cfg[n_head_key]})")
    if errors:
        raise ValueError("CompressedAD config does not fit together:\n  - " + "\n  - ".join(errors))
