"""CompressedAD (model/ad_compressed.py): masks, bounded rollouts, the teacher-forced view, lane training, memory tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset import HistoryLanes
from model import build_model, model_config
from tests.helpers import (
    N_ACTIONS,
    N_STATES,
    compressed_cfg,
    random_histories,
    random_tokens,
    rollout_trace,
    run_rollout,
    stream_cfg,
)


def run_lanes(model, lanes, steps, lane_ids):
    """Train-mode forwards over `steps`, the memory carried from step to step (train.py's loop without the update)."""
    from utils.lanes import exact_memory

    carried = exact_memory(model, lanes, steps[0], lane_ids, "cpu")
    for step in steps:
        batch = lanes.batch(step, lane_ids)
        batch["memory"], batch["memory_empty"] = carried
        logits, carried = model(batch)
        yield step, batch, logits


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


def test_padding_inside_a_chunk_is_ignored():
    model = build_model(compressed_cfg(tf_dropout=0.0), N_STATES, N_ACTIONS).eval()
    chunk = random_tokens(1, 30)
    valid = torch.arange(30)[None] < 22
    a = model.compress(model.encoder.empty_memory(1), chunk, valid)
    junk = chunk.clone()
    junk[:, 22:] = random_tokens(1, 8, seed=4)
    b = model.compress(model.encoder.empty_memory(1), junk, valid)
    assert torch.allclose(a, b, atol=1e-6)


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
    assert max(lengths) <= model.config.decoder_max_seq_length and r.peak_decoder_length == max(lengths)
    # the rollout compresses as often as the shared schedule says: every rollout_compress_length steps once the window is full
    assert r.n_compressions == model.schedule.segments(2000).n_compressions
    assert r.n_compressions >= (2000 - cfg.max_uncompressed_length) // cfg.rollout_compress_length
    assert torch.isfinite(r.latents).all()
    assert max(r.memory[1900:]) == max(r.memory[100:200]) > 0  # memory (tokens, latents, KV cache) stays flat


def test_the_three_stage1_parts_are_exactly_what_compression_reads():
    """Stage 1 hands over encoder, embed_context and embed_ln: compression must depend on each and on nothing else,
    or a pre-trained encoder would arrive without what it was trained with."""
    torch.manual_seed(0)
    model = build_model(compressed_cfg(tf_dropout=0.0), N_STATES, N_ACTIONS).eval()
    chunk, previous = random_tokens(2, 36), torch.randn(2, 16, 64)
    before = model.compress(previous, chunk)
    stage1 = ("encoder.", "embed_context.", "embed_ln.")
    with torch.no_grad():
        others = [p for k, p in model.named_parameters() if not k.startswith(stage1)]
        assert others  # the decoder, its head and its positions
        for p in others:
            p.add_(torch.randn_like(p))
    assert torch.allclose(model.compress(previous, chunk), before, atol=1e-6)
    for part in stage1:
        changed = build_model(compressed_cfg(tf_dropout=0.0), N_STATES, N_ACTIONS).eval()
        changed.load_state_dict(model.state_dict())
        with torch.no_grad():
            for k, p in changed.named_parameters():
                if k.startswith(part):
                    p.add_(0.5 * torch.randn_like(p))
        assert not torch.allclose(changed.compress(previous, chunk), before, atol=1e-3), part


def test_sizes_that_clash_are_named_and_the_decoder_length_is_derived():
    assert model_config(compressed_cfg()).decoder_max_seq_length == 16 + 40  # null: n_latent + window
    assert build_model(compressed_cfg(), N_STATES, N_ACTIONS).token_pos.num_embeddings == 40
    with pytest.raises(ValueError, match=r"n_latent \(50\) \+ max_uncompressed_length \(40\) = 90 exceeds decoder_max_seq_length \(56\)"):
        model_config(compressed_cfg(n_latent=50, decoder_max_seq_length=56))
    with pytest.raises(ValueError, match="rollout_compress_length"):
        model_config(compressed_cfg(rollout_compress_length=41))
    with pytest.raises(ValueError, match=r"tf_n_embd \(64\) must be divisible by encoder_n_head \(3\)"):
        model_config(compressed_cfg(encoder_n_head=3))
    model_config(compressed_cfg(rollout_compress_length=40))  # a compression may keep no raw token
    with pytest.raises(ValueError, match="Unknown model"):
        build_model({"model": "GPT"}, N_STATES, N_ACTIONS)


@pytest.mark.parametrize("memory", [{}, {"memory": "clear"}, {"memory": "truncate", "memory_chunks": 1},
                                    {"memory": "truncate", "memory_chunks": 3}])
def test_teacher_forced_view_equals_the_rollout_latents_and_logits(memory):
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS).eval()
    tokens = random_tokens(3, 230, seed=2)
    rollout_logits, rollout_latents = rollout_trace(model, tokens, **memory)
    assert torch.allclose(model.teacher_forced_logits(tokens, **memory), rollout_logits, atol=1e-5)
    latents = model.segment_latents(tokens, **memory)
    assert latents.shape[1] == len(rollout_latents) + 1
    for k, lat in enumerate(rollout_latents, start=1):
        assert torch.allclose(latents[:, k], lat, atol=1e-5)
        if not memory:  # the slow reference for what training carries: L_k from the history's start
            assert torch.allclose(model.memory_at(tokens, torch.full((3,), k)), lat, atol=1e-5)


@pytest.mark.parametrize("segments_per_step", [1, 3, None])
def test_lanes_carrying_the_memory_predict_exactly_as_the_rollout(segments_per_step):
    """Across steps, history boundaries and staggered starts, every target's logits equal the rollout's."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS).train()  # dropout is 0: train mode changes only the gradient path
    lanes = HistoryLanes(random_histories(), model.schedule, n_lanes=2, segments_per_step=segments_per_step, seed=3)
    reference = {}
    with torch.no_grad():
        for stream in range(lanes.n_streams):
            reference[stream] = rollout_trace(model.eval(), torch.from_numpy(lanes.tokens[stream : stream + 1]))[0][0]
    model.train()
    checked = 0
    for step, batch, logits in run_lanes(model, lanes, range(lanes.n_segments * 3 // lanes.segments_per_step), np.arange(2)):
        stream = (batch["index"] // lanes.n_segments).flatten()
        k = (batch["index"] % lanes.n_segments).flatten()
        for row in range(len(k)):
            target = torch.from_numpy(lanes.is_target[k[row]])
            t = torch.from_numpy(lanes.window_t[k[row]])[target]
            assert torch.allclose(logits[row][target], reference[int(stream[row])][t], atol=1e-5), (step, row)
            checked += len(t)
    assert checked >= 2 * 2 * 400  # at least two whole histories per lane


def test_lane_gradient_reaches_each_segment_s_last_compression_only():
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS).train()
    lanes = HistoryLanes(random_histories(T=400), model.schedule, n_lanes=2, segments_per_step=3, seed=0)
    from utils.lanes import exact_memory

    step = 2  # lane 0 reads segments 6-8 of its first history; lane 1 (staggered) segments 0-2 of its second
    batch = lanes.batch(step, np.arange(2))
    assert lanes.position(step, np.arange(2))[1].tolist() == [[6, 7, 8], [0, 1, 2]] and lanes.n_segments == 11
    batch["memory"], batch["memory_empty"] = exact_memory(model, lanes, step, np.arange(2), "cpu")
    embedded = []
    original = model.embed

    def record(tokens):  # every embedding call of a chunk: [N, c, C] with N rows of one stage
        out = original(tokens)
        if tokens.shape[1] == model.schedule.chunk:
            out.retain_grad()
            embedded.append(out)
        return out

    model.embed = record
    logits, _ = model(batch)
    W = logits.shape[1]
    for s in range(3):  # the loss of lane 0's segment s reaches compression s's chunk and no earlier one
        model.zero_grad()
        for e in embedded:
            e.grad = None
        logits[s].sum().backward(retain_graph=True)
        reached = [e.grad is not None and bool(e.grad[0].abs().sum() > 0) for e in embedded]
        assert reached == [j == s for j in range(3)], (s, reached)
        assert model.encoder.initial_latents.grad is None or model.encoder.initial_latents.grad.abs().sum() == 0
    for row, chunk in ((3, None), (4, 1)):  # lane 1: segment 0 reads L_0 itself, segment 1 compresses L_0 and chunk 1
        model.zero_grad()
        for e in embedded:
            e.grad = None
        logits[row].sum().backward(retain_graph=True)
        assert model.encoder.initial_latents.grad.abs().sum() > 0
        reached = [e.grad is not None and bool(e.grad[-1].abs().sum() > 0) for e in embedded]
        assert reached == [chunk == j for j in range(3)], (row, reached)
    assert W == int((model.schedule.segments(400).end - model.schedule.segments(400).window_start).max())


def test_a_memory_restart_is_a_history_that_begins_at_the_restart():
    """memory_reset at segment m: the lane then predicts as a rollout whose history began with segment m's window."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS).train()
    lanes = HistoryLanes(random_histories(T=400), model.schedule, n_lanes=1, segments_per_step=3, seed=0)
    c, m = model.schedule.chunk, 3
    batch = lanes.batch(1, np.arange(1))  # segments 3, 4, 5
    batch["memory"], batch["memory_empty"] = model.encoder.empty_memory(1).detach().clone(), torch.tensor([False])
    batch["memory_reset"][0, 0] = True  # the memory restarts empty at segment 3
    logits, _ = model(batch)
    stream = int(batch["index"][0, 0] // lanes.n_segments)
    later, _ = rollout_trace(model.eval(), torch.from_numpy(lanes.tokens[stream : stream + 1, m * c :]))
    for s, k in enumerate((3, 4, 5)):
        target = torch.from_numpy(lanes.is_target[k])
        t = torch.from_numpy(lanes.window_t[k])[target] - m * c
        assert torch.allclose(logits[s][target], later[0, t], atol=1e-5)
    batch["memory_reset"][0, 0] = False  # without it the carried memory (here L_0 marked as not empty) matters
    plain, _ = model.train()(batch)
    assert not torch.allclose(plain[1], logits[1], atol=1e-4)


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
            assert not torch.allclose(latents[0], normal_latents[0][0:1].expand(4, -1, -1), atol=1e-4)
            assert torch.allclose(latents[0], normal_latents[0][[1, 0, 3, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="donor"):
        model.rollout(2, memory="transplant")
