import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from model import AD, CompressedAD, build_model, check_sizes, rollout_memory_bytes
from model.ad_compressed import decoder_mask
from model.schedule import CompressionSchedule
from model.tokens import STATE
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
    chunks = random_tokens(B, max(depth, 1) * Lc).view(B, max(depth, 1), Lc, 6)[:, :depth]
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
    # the rollout compresses as often as the shared schedule says: every rollout_compress_length steps once the window is full
    assert r.n_compressions == model.schedule.segments(2000).n_compressions
    assert r.n_compressions >= (2000 - cfg.max_uncompressed_length) // cfg.rollout_compress_length
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
        check_sizes(compressed_cfg(training_mode="chains", min_compress_length=45))
    with pytest.raises(ValueError, match="rollout_compress_length"):
        check_sizes(compressed_cfg(rollout_compress_length=41))
    with pytest.raises(ValueError, match="rollout_compress_length"):
        check_sizes(compressed_cfg(training_mode="chains", rollout_compress_length=10))
    check_sizes(compressed_cfg(rollout_compress_length=40))  # stream mode may keep no raw token
    with pytest.raises(ValueError, match="Unknown model"):
        build_model({"model": "GPT"}, N_STATES, N_ACTIONS)


def test_truncated_backprop_through_old_stages():
    cfg = compressed_cfg(tf_dropout=0.0, grad_compression_stages=1)
    model = build_model(cfg, N_STATES, N_ACTIONS)
    chunks = random_tokens(2, 3 * 20).view(2, 3, 20, 6)
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


# ---------------------------------------------------------------- the compression schedule, teacher-forced

@pytest.mark.parametrize("window,chunk", [(40, 20), (40, 36), (40, 40), (7, 3)])
def test_schedule_segments_follow_the_rollout_rule(window, chunk):
    schedule = CompressionSchedule(window=window, chunk=chunk)
    T = 157
    seg = schedule.segments(T)
    # every token is the target of exactly one segment, in order
    assert seg.first_target[0] == 0 and (seg.end[:-1] == seg.first_target[1:]).all() and seg.end[-1] == T
    assert (seg.segment_of(np.arange(T)) == np.repeat(np.arange(len(seg.end)), seg.end - seg.first_target)).all()
    # chunk k is the k-th block of `chunk` tokens; the window after it starts where it ends
    assert (seg.chunk_start == chunk * np.arange(seg.n_compressions)).all()
    assert (seg.window_start[1:] == seg.chunk_start + chunk).all()
    assert (seg.end - seg.window_start).max() <= window  # the decoder never sees more than the window
    assert ((seg.first_target[1:] - seg.window_start[1:]) == window - chunk).all()  # what survives a compression
    # a token-by-token simulation of the rollout agrees
    n_recent, compressions = 0, []
    for t in range(T):
        if schedule.compress_now(n_recent):
            compressions.append(t)
            n_recent -= chunk
        n_recent += 1
    assert compressions == seg.first_target[1:].tolist()


def stream_cfg(**over):
    return compressed_cfg(**{"tf_dropout": 0.0, "training_mode": "stream", "rollout_compress_length": 36, **over})


def rollout_trace(model, tokens, **memory):
    """Per-step logits of a rollout over `tokens`, and its latents right after every compression."""
    r = model.rollout(len(tokens), use_cache=True, **memory)
    logits, latents = [], []
    for t in range(tokens.shape[1]):
        n = r.n_compressions
        logits.append(r.step(tokens[:, t]))
        if r.n_compressions > n:
            latents.append(r.latents.clone())
    return torch.stack(logits, 1), latents


@pytest.mark.parametrize("memory", [{}, {"memory": "clear"}, {"memory": "truncate", "memory_chunks": 1},
                                    {"memory": "truncate", "memory_chunks": 3}])
@pytest.mark.parametrize("gradient", ["per_target", "span"])
def test_teacher_forced_view_equals_the_rollout_latents_and_logits(memory, gradient):
    torch.manual_seed(0)
    model = build_model(stream_cfg(stream_gradient=gradient), N_STATES, N_ACTIONS).eval()
    tokens = random_tokens(3, 230, seed=2)
    rollout_logits, rollout_latents = rollout_trace(model, tokens, **memory)
    assert torch.allclose(model.teacher_forced_logits(tokens, **memory), rollout_logits, atol=1e-5)
    with torch.no_grad():
        n = model.schedule.segments(230).n_compressions
        sample, k, latents = model.segment_latents(tokens, torch.zeros(3, dtype=torch.long), torch.full((3,), n + 1), **memory)
    for j, lat in enumerate(rollout_latents, start=1):
        assert torch.allclose(latents[k == j], lat, atol=1e-5)


@pytest.mark.parametrize("gradient", ["per_target", "span"])
def test_training_forward_of_any_span_equals_the_rollout(gradient):
    """The training forward (gradient on, truncated stages recomputed) gives the rollout's logits on every span."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(grad_compression_stages=2, stream_gradient=gradient), N_STATES, N_ACTIONS)
    tokens = random_tokens(3, 230, seed=4)
    rollout_logits, _ = rollout_trace(model.eval(), tokens)
    model.train()  # dropout is 0: train mode changes nothing but the gradient path
    first, n = torch.tensor([0, 2, 5]), torch.tensor([3, 2, 2])
    logits = model({"tokens": tokens, "first_segment": first, "n_segments": n,
                    "target_actions": torch.zeros(3, 230, dtype=torch.long)})
    seg = model.schedule.segments(230)
    for b in range(3):
        targets = slice(seg.first_target[first[b]], seg.end[first[b] + n[b] - 1])
        assert torch.allclose(logits[b, targets], rollout_logits[b, targets], atol=1e-5)
        assert (logits[b, : targets.start] == 0).all() and (logits[b, targets.stop :] == 0).all()


@pytest.mark.parametrize("gradient,grad_stages", [("per_target", 1), ("per_target", 2), ("per_target", 3), ("span", 1), ("span", 2)])
def test_gradients_reach_exactly_the_configured_stages(gradient, grad_stages):
    """per_target: the loss of a segment reaches the chunks of its last `grad_stages` compressions and no
    earlier ones. span: the i-th segment of a span reaches grad_stages + i (truncated backpropagation
    through the span). Neither reaches the empty memory L_0 once the chain has left it behind."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(grad_compression_stages=grad_stages, stream_gradient=gradient), N_STATES, N_ACTIONS).train()
    tokens = random_tokens(1, 400, seed=5)
    tokens[0, :, STATE] = torch.arange(400).float() % N_STATES  # so each chunk is identifiable by its first state
    seg = model.schedule.segments(400)
    original = model.compress

    def record(latents, chunk_tokens, chunk_valid=None):
        out = original(latents, chunk_tokens, chunk_valid)
        if out.requires_grad:
            for row in range(len(out)):  # one entry per row: rows of one call may be different stages
                entry = {"step": int(chunk_tokens[row, 0, STATE]), "grad": False}
                out.register_hook(lambda g, e=entry, r=row: e.update(grad=e["grad"] or bool(g[r].abs().sum() > 0)))
                calls.append(entry)
        return out

    model.compress = record
    first, span = 5, 3 if gradient == "span" else 1
    for i in range(span):
        calls = []
        model.zero_grad()
        logits = model.stream_logits(tokens, torch.tensor([first]), torch.tensor([span]), grad_stages=grad_stages)
        k = first + i
        logits[0, seg.first_target[k] : seg.end[k]].sum().backward()
        reached = sorted({c["step"] for c in calls if c["grad"]})
        deepest = k - grad_stages + 1 - (i if gradient == "span" else 0)
        assert reached == sorted(int(seg.chunk_start[j - 1]) % N_STATES for j in range(deepest, k + 1)), (i, reached)
        assert model.encoder.initial_latents.grad is None or model.encoder.initial_latents.grad.abs().sum() == 0
    # a segment with fewer compressions than grad_stages reaches all of them and L_0
    model.zero_grad()
    logits = model.stream_logits(tokens, torch.tensor([1]), torch.tensor([1]), grad_stages=grad_stages)
    logits[0, seg.first_target[1] : seg.end[1]].sum().backward()
    assert model.encoder.initial_latents.grad.abs().sum() > 0


def test_memory_interventions_change_what_they_say_and_nothing_else():
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS).eval()
    tokens = random_tokens(4, 200, seed=6)
    first = model.schedule.segments(200).first_target[1]  # the first compression happens before this step
    normal, normal_latents = rollout_trace(model, tokens)
    empty = model.encoder.empty_memory(4)
    for memory in ({"memory": "clear"}, {"memory": "truncate", "memory_chunks": 2},
                   {"memory": "transplant", "donor": [1, 0, 3, 2]}):
        logits, latents = rollout_trace(model, tokens, **memory)
        assert torch.equal(logits[:, :first], normal[:, :first])  # nothing changes before the first compression
        assert not torch.allclose(logits[:, first:], normal[:, first:], atol=1e-4)
        if memory["memory"] == "clear":
            assert all(torch.equal(lat, empty) for lat in latents)
        elif memory["memory"] == "truncate":  # the first two compressions have no older chunk to drop
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(latents[:2], normal_latents[:2]))
            assert not torch.allclose(latents[2], normal_latents[2], atol=1e-4)
        else:  # env i holds the latents env donor[i] computed, on its own tokens
            donor_view, _ = rollout_trace(model, tokens[[1, 0, 3, 2]])
            assert not torch.allclose(latents[0], normal_latents[0][0:1].expand(4, -1, -1), atol=1e-4)
            assert torch.allclose(latents[0], normal_latents[0][[1, 0, 3, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="donor"):
        model.rollout(2, memory="transplant")


def test_a_memory_restart_is_a_history_that_begins_at_the_restart():
    """memory_start = m: the span's latents are those of a rollout whose history began with chunk m + 1."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(grad_compression_stages=2), N_STATES, N_ACTIONS).train()
    tokens = random_tokens(1, 300, seed=8)
    c, m = model.schedule.chunk, 3
    later, _ = rollout_trace(model.eval(), tokens[:, m * c :])
    model.train()
    logits = model.stream_logits(tokens, torch.tensor([5]), torch.tensor([2]), grad_stages=2, memory_start=torch.tensor([m]))
    seg = model.schedule.segments(300)
    targets = slice(seg.first_target[5], seg.end[6])
    assert torch.allclose(logits[0, targets], later[0, targets.start - m * c : targets.stop - m * c], atol=1e-5)
    plain = model.stream_logits(tokens, torch.tensor([5]), torch.tensor([2]), grad_stages=2)
    assert not torch.allclose(plain[0, targets], logits[0, targets], atol=1e-4)
