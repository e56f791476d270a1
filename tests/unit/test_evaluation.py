"""The evaluation's metrics on hand-made returns, and the rollout's memory interventions (evaluation.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from env import (
    make_env_spec,
)
from evaluation import (
    bootstrap_ratio,
    donor_tasks,
    episodes_to_fraction,
    held_out_loss,
    miss_rate_after_first_success,
    result_name,
    run_in_context,
    summarize,
)
from model import build_model
from tests.helpers import N_ACTIONS, N_STATES, compose_cfg, darkroom, stream_cfg
from utils.errors import UserConfigError


def test_miss_rate_counts_only_episodes_after_the_first_success():
    returns = np.array([[[0, 0, 5, 0, 3, 3], [0, 0, 0, 0, 0, 0]]], float)  # [task, repeat, episode]
    assert miss_rate_after_first_success(returns) == 1 / 3  # episodes 3-5 of repeat 0; repeat 1 never found it
    assert miss_rate_after_first_success(np.zeros((1, 2, 4))) is None


def test_episodes_to_80pct_uses_a_trailing_window():
    curve = np.linspace(0, 1, 20)  # curve[e] = e / 19: first >= 0.8 at episode 16
    # the trailing 5-episode mean (episodes e-4..e) is (e - 2) / 19: it first reaches 0.8 at episode 18, never earlier
    assert episodes_to_fraction(curve, 0.8) == 18
    assert episodes_to_fraction(np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1.0]), 0.8) == 8
    spike = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.0])  # one good episode never makes 80% of five
    assert episodes_to_fraction(spike, 0.8) is None
    assert episodes_to_fraction(np.ones(3), 0.8) is None  # fewer episodes than the window


def test_summary_against_optimal():
    spec = darkroom()
    goals = spec.tasks("test")[:2]
    optimal = spec.optimal_returns(goals)
    returns = np.broadcast_to(optimal[:, None, None] * np.linspace(0, 1, 20), (2, 3, 20)).copy()
    out = summarize(goals, spec, {"returns": returns, "seconds": 1.0, "seconds_per_env_step": 0.1})
    assert np.isclose(out["fraction_of_optimal_last10"], np.linspace(0, 1, 20)[-10:].mean())
    assert np.isclose(out["mean_task_fraction_last10"], out["fraction_of_optimal_last10"])
    assert out["episodes_to_80pct"] == 18
    assert out["miss_rate_after_first_success"] == 0.0 and out["fraction_of_optimal_last10_rollout_se"] == 0.0
    lo, hi = out["fraction_of_optimal_last10_ci95"]
    assert np.isclose(lo, hi) and np.isclose(lo, out["fraction_of_optimal_last10"])  # tasks agree: no spread
    assert np.isclose(out["mean_optimal_return"], optimal.mean())


def test_ratio_of_means_and_mean_of_fractions_differ_when_far_tasks_fail():
    spec = darkroom()
    goals = np.array([[4, 5], [0, 0]])  # near (optimal 20) and far (optimal 13)
    optimal = spec.optimal_returns(goals)
    returns = np.stack([np.full((2, 10), optimal[0]), np.zeros((2, 10))])  # the far one fails
    out = summarize(goals, spec, {"returns": returns, "seconds": 1.0, "seconds_per_env_step": 0.1})
    assert np.isclose(out["fraction_of_optimal_last10"], optimal[0] / optimal.sum())
    assert np.isclose(out["mean_task_fraction_last10"], 0.5) and out["fraction_of_optimal_last10"] > 0.5


def test_bootstrap_interval_widens_when_tasks_disagree():
    optimal = np.full(8, 10.0)
    agree = np.full(8, 8.0)
    disagree = np.array([10, 10, 10, 10, 6, 6, 6, 6.0])  # the same mean, 0.8
    lo_a, hi_a = bootstrap_ratio(agree, optimal)
    lo_d, hi_d = bootstrap_ratio(disagree, optimal)
    assert np.isclose(lo_a, 0.8) and np.isclose(hi_a, 0.8)
    assert lo_d < 0.75 and hi_d > 0.85 and lo_d < 0.8 < hi_d
    # over training seeds: the same resampled tasks for every seed; seeds that disagree per task average out
    two_seeds = np.stack([disagree, disagree[::-1]])
    lo_s, hi_s = bootstrap_ratio(two_seeds, optimal)
    assert hi_s - lo_s < hi_d - lo_d


def test_result_files_are_separate_per_split_and_memory_mode():
    names = {result_name("test"), result_name("val"), result_name("test", "clear"), result_name("test", "truncate", 1),
             result_name("test", "truncate", 2), result_name("test", "transplant")}
    assert len(names) == 6 and "test" in names and "test-memory-truncate1" in names


def test_memory_interventions_in_the_evaluation_keep_starts_and_draws():
    """Every memory mode rolls out on the same starts and action draws: before the first compression the
    returns are identical; after it they differ. Transplant's donors do not disturb the main envs."""
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS)
    spec = make_env_spec(compose_cfg("collect", ["env=dark_key_to_door", "env.horizon=10"]).env)
    tasks = spec.tasks("val")[:3]
    runs = {m: run_in_context(model, spec, tasks, 8, 2, seed=0, memory=m, memory_chunks=1)["returns"]
            for m in ("normal", "clear", "transplant", "truncate")}
    first = model.schedule.segments(80).first_target[1] // spec.horizon  # episodes before the first compression
    for m, r in runs.items():
        assert np.array_equal(r[..., :first], runs["normal"][..., :first]), m
    again = run_in_context(model, spec, tasks, 8, 2, seed=0)["returns"]
    assert np.array_equal(again, runs["normal"])

    ad = build_model(compose_cfg("train", ["model=ad_dr"]).model, N_STATES, N_ACTIONS)
    with pytest.raises(UserConfigError, match="has none"):
        run_in_context(ad, spec, tasks, 2, 1, seed=0, memory="clear")


def test_evaluate_split_is_the_rollout_summary_plus_the_held_out_loss_for_the_normal_memory_only():
    """train.py's evaluations and evaluate.py share this: same draws -> same returns; the held-out loss is
    scored only when histories are given and the memory is left alone; `record` is stored as given."""
    from evaluation import evaluate_split
    from tests.helpers import labelled_histories

    h = labelled_histories(n_goals=2, n_streams=2, T=240)
    for k in ("states", "next_states"):
        h[k] = h[k] % N_STATES
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS)
    spec = darkroom()
    normal = evaluate_split(model, spec, "val", 4, 2, seed=0, histories=h, held_out_streams_per_task=1, global_step=7)
    tasks = spec.tasks("val")
    direct = run_in_context(model, spec, tasks, 4, 2, seed=0)["returns"]
    assert np.allclose(normal["returns"], direct.mean(axis=1), atol=1e-4)
    assert normal["split"] == "val" and normal["memory"] == "normal" and normal["global_step"] == 7
    assert normal["held_out"]["loss_action"] > 0
    cleared = evaluate_split(model, spec, "val", 4, 2, seed=0, histories=h, held_out_streams_per_task=1, memory="clear")
    assert cleared["held_out"] == {} and cleared["memory"] == "clear" and cleared["memory_chunks"] is None
    assert evaluate_split(model, spec, "val", 4, 2, seed=0, memory="truncate", memory_chunks=2)["memory_chunks"] == 2


def test_held_out_loss_is_scored_at_fixed_positions_with_a_memory_value_curve():
    from tests.helpers import labelled_histories

    h = labelled_histories(n_goals=2, n_streams=3, T=240)
    for k in ("states", "next_states"):
        h[k] = h[k] % N_STATES
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS)
    out = held_out_loss(model, h, n_streams_per_task=2)
    bins = [k for k in out if k.startswith("loss_action_ep")]
    assert bins == ["loss_action_ep0", "loss_action_ep1", "loss_action_ep2-4", "loss_action_ep5-11"]
    assert {f"memory_value/chunks{k}" for k in (0, 1, 2, 4, 8)} | {"memory_value/all"} <= set(out)
    assert out["memory_value/chunks0"] != out["memory_value/all"]
    # the positions are fixed: the same for a model with another window
    other = build_model(stream_cfg(rollout_compress_length=20), N_STATES, N_ACTIONS)
    assert set(held_out_loss(other, h, 2)) == set(out)
    ad = build_model(compose_cfg("train", ["model=ad_dr", "model.n_transit=40"]).model, N_STATES, N_ACTIONS)
    assert not any(k.startswith("memory_value") for k in held_out_loss(ad, h, 2))
    # by phase, on the last two thirds: rewarded at step 3 of every episode, so steps 0-3 seek the goal, 4-19 are on it
    h["rewards"][..., 3::h["horizon"]] = 1.0
    phased = held_out_loss(ad, h, 2, phase_names=("to_goal", "at_goal"))
    from dataset import select_streams, stream_tokens

    tokens, actions = (torch.from_numpy(x) for x in stream_tokens(select_streams(h, slice(0, 2))))
    per_step = torch.nn.functional.cross_entropy(ad.eval().teacher_forced_logits(tokens).transpose(1, 2), actions.long(),
                                                 reduction="none")[:, 240 // 3:]
    seeking = (torch.arange(240 // 3, 240) % h["horizon"]) <= 3
    assert phased["loss_action_late_to_goal"] == pytest.approx(float(per_step[:, seeking].mean()), rel=1e-5)
    assert phased["loss_action_late_at_goal"] == pytest.approx(float(per_step[:, ~seeking].mean()), rel=1e-5)


def test_transplant_donors_are_the_same_task_or_a_derangement_and_are_run_on_their_own_starts():
    assert donor_tasks(5, "same_task").tolist() == [0, 1, 2, 3, 4]
    orders = [donor_tasks(8, "other_task", p) for p in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(8)) and (order != np.arange(8)).all()
    assert len({tuple(o) for o in orders}) == 3 and (donor_tasks(8, "other_task", 1) == orders[1]).all()
    with pytest.raises(UserConfigError, match="at least 2 tasks"):
        donor_tasks(1, "other_task")
    with pytest.raises(UserConfigError, match="not one of"):
        donor_tasks(3, "next_task")
    # same_task on Key-to-Door (random starts): the donors are other repeats of the same tasks, not copies of the envs
    torch.manual_seed(0)
    model = build_model(stream_cfg(), N_STATES, N_ACTIONS)
    spec = make_env_spec(compose_cfg("collect", ["env=dark_key_to_door", "env.horizon=10"]).env)
    tasks = spec.tasks("val")[:3]
    out = run_in_context(model, spec, tasks, 8, 2, seed=0, memory="transplant", donor="same_task")
    assert out["donor"] == "same_task" and out["donor_tasks"] == [0, 1, 2] and out["donor_permutation"] is None
    env_tasks = np.repeat(tasks, 2, axis=0)
    starts = spec.batched(np.concatenate([env_tasks, env_tasks]), seed=0).reset()
    assert (starts[:6] != starts[6:]).any()  # donor env n + i starts elsewhere than env i on the same task
    other = run_in_context(model, spec, tasks, 8, 2, seed=0, memory="transplant", donor_permutation=4)
    assert other["donor_tasks"] == donor_tasks(3, "other_task", 4).tolist() and other["donor_permutation"] == 4
