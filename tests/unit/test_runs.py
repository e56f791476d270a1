"""The comparison scripts' helpers (scripts/runs.py): a run or an eval file is reused only when it matches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation import config_hash
from scripts.runs import composed_config, config_differences, reusable_eval, reuse_run

OVERRIDES = ["experiment=quick", "model=ad_compressed_dr", "seed=1", "run_name=compare-x"]


def fake_run(tmp_path, overrides):
    run_dir = tmp_path / "compare-x"
    (run_dir / "eval").mkdir(parents=True)
    config = {**composed_config("train", overrides), "dataset": "datasets/somewhere"}
    torch.save({"config": config, "model_state_dict": {}}, run_dir / "checkpoint-final.pt")
    return run_dir, config


def test_a_run_is_reused_only_under_the_config_that_made_it(tmp_path):
    assert reuse_run(tmp_path / "none" / "checkpoint-final.pt", "train", OVERRIDES) is False  # not there: train it
    run_dir, _ = fake_run(tmp_path, OVERRIDES)
    ckpt = run_dir / "checkpoint-final.pt"
    assert reuse_run(ckpt, "train", OVERRIDES) is True
    assert reuse_run(ckpt, "train", [*OVERRIDES, "resume=true"]) is True  # run control, not part of the run
    assert reuse_run(ckpt, "train", [*OVERRIDES, "run_name=moved-here"]) is True  # a run moved under another name
    # beside the weights: checkpoint cadence and the evaluations after the last step (the comparison evaluates a missing split)
    assert reuse_run(ckpt, "train", [*OVERRIDES, "save_interval=7", "final_eval_splits=[val]"]) is True
    with pytest.raises(SystemExit, match="eval_interval"):  # the validation curve a comparison reads
        reuse_run(ckpt, "train", [*OVERRIDES, "eval_interval=7"])
    with pytest.raises(SystemExit, match=r"training.train_timesteps': \(2600, 100\)"):
        reuse_run(ckpt, "train", [*OVERRIDES, "training.train_timesteps=100"])
    with pytest.raises(SystemExit, match="seed"):
        reuse_run(ckpt, "train", [o.replace("seed=1", "seed=2") for o in OVERRIDES])
    assert config_differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == {"a.c": (2, 3), "d": (None, 4)}


def test_a_run_started_from_a_copied_encoder_is_the_same_run(tmp_path):
    encoder = tmp_path / "stage1" / "encoder-pretrained-final.pt"
    encoder.parent.mkdir()
    encoder.write_bytes(b"weights")
    copied, other = tmp_path / "copy" / encoder.name, tmp_path / "other" / encoder.name
    copied.parent.mkdir(), other.parent.mkdir()
    copied.write_bytes(b"weights")
    other.write_bytes(b"weightz")  # same size, other bytes
    start = [*OVERRIDES, f"model.pretrained_encoder_path={encoder}"]
    run_dir, _ = fake_run(tmp_path, start)
    ckpt = run_dir / "checkpoint-final.pt"
    assert reuse_run(ckpt, "train", [*OVERRIDES, f"model.pretrained_encoder_path={copied}"]) is True
    with pytest.raises(SystemExit, match="pretrained_encoder_path"):
        reuse_run(ckpt, "train", [*OVERRIDES, f"model.pretrained_encoder_path={other}"])
    with pytest.raises(SystemExit, match="pretrained_encoder_path"):  # from scratch is another run
        reuse_run(ckpt, "train", OVERRIDES)
    encoder.unlink()  # the run's own encoder gone: nothing to compare the bytes with
    with pytest.raises(SystemExit, match="pretrained_encoder_path"):
        reuse_run(ckpt, "train", [*OVERRIDES, f"model.pretrained_encoder_path={copied}"])


def test_an_eval_file_is_reused_only_for_this_checkpoint_and_these_settings(tmp_path):
    run_dir, config = fake_run(tmp_path, OVERRIDES)
    ckpt = run_dir / "checkpoint-final.pt"
    result = {"run_config_hash": config_hash(config), "memory": "transplant", "donor": "same_task", "n_envs_per_task": 32}
    (run_dir / "eval" / "val-memory-transplant-same_task.json").write_text(json.dumps(result))
    assert reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="same_task")
    assert not reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="other_task")
    assert not reusable_eval(run_dir, "val-memory-clear", ckpt, memory="clear")  # no such file
    stale = {**result, "run_config_hash": config_hash({**config, "seed": 7})}  # made by another run under this name
    (run_dir / "eval" / "val-memory-transplant-same_task.json").write_text(json.dumps(stale))
    assert not reusable_eval(run_dir, "val-memory-transplant-same_task", ckpt, memory="transplant", donor="same_task")


def test_paired_difference_resamples_tasks_and_refuses_unpaired_results():
    from scripts.runs import paired_difference

    def result(per_task, tasks=((0, 0), (1, 1), (2, 2))):
        return {"returns": [[v] * 10 for v in per_task], "optimal_return": [10.0, 10.0, 10.0], "tasks": [list(t) for t in tasks],
                "n_envs_per_task": 2}

    a = [result([9, 8, 7]), result([9, 9, 9])]
    b = [result([8, 8, 8]), result([8, 8, 8])]
    text = paired_difference(a, b)
    assert text.startswith("+0.050 [") and "(per seed +0.000 / +0.100)" in text  # seed 0: 0/30; seed 1: 3/30
    lo, hi = (float(x) for x in text.split("[")[1].split("]")[0].split(", "))
    assert lo <= 0.05 <= hi and lo < hi
    with pytest.raises(SystemExit, match="not paired"):
        paired_difference(a, [result([8, 8, 8], tasks=((0, 0), (1, 1), (3, 3)))] * 2)


def test_memory_row_pairs_each_test_with_the_normal_rollout_and_averages_derangements():
    from scripts.runs import MEMORY_TESTS, averaged, memory_row

    def result(last10):  # 2 tasks, optimal 10 each; the last 10 episodes return `last10` per task
        return {"tasks": [[0, 0], [1, 1]], "n_envs_per_task": 4, "optimal_return": [10.0, 10.0],
                "returns": [[0.0] * 5 + [last10[0]] * 10, [0.0] * 5 + [last10[1]] * 10],
                "fraction_of_optimal_last10": sum(last10) / 20}

    assert averaged([result([2, 4]), result([4, 8])])["returns"][1][-1] == 6.0
    normal = [result([9, 9]), result([8, 10])]
    memory = {test: [[result([9, 9])] * len(s), [result([8, 10])] * len(s)] for test, s in MEMORY_TESTS}
    memory["clear costs"] = [[result([1, 1])], [result([0, 2])]]
    row = memory_row("m", normal, memory)
    assert "cost +0.800" in row[2] and all("cost +0.000" in c for c in row[3:]), row


def test_collect_gets_only_the_overrides_that_shape_the_histories():
    from scripts.runs import collect_overrides

    extra = ["env=dark_key_to_door", "algorithm.noise_prob=0", "model.n_transit=50", "training.lr=1e-3", "eval.n_episodes=5",
             "data_root=/tmp/d", "force=true"]
    # eval.* is a key of every script (common.yaml): collect.py accepts it and ignores it
    assert collect_overrides(extra) == ["env=dark_key_to_door", "algorithm.noise_prob=0", "eval.n_episodes=5", "data_root=/tmp/d",
                                        "force=true"]


def test_compare_context_refuses_an_unknown_variant_before_running_anything(monkeypatch, capsys):
    """An override written after --variants is parsed as a slug: refused up front, with the fix named."""
    from scripts import compare_context

    monkeypatch.setattr("sys.argv", ["compare_context.py", "--env", "dark_key_to_door", "--variants", "ad-w200",
                                     "eval_interval=2000"])
    monkeypatch.setattr(compare_context, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit):
        compare_context.main()
    assert "put Hydra overrides before --variants" in capsys.readouterr().err


def test_compare_pretraining_variants_compose_and_an_override_after_variants_is_refused(monkeypatch, capsys):
    """Every stage-1 objective and stage-2 start composes into the config it names; a misplaced override is refused."""
    from scripts import compare_pretraining as cp
    from scripts.runs import composed_config

    for slug, (_, objective, overrides) in cp.VARIANTS.items():
        if objective:
            stage1 = composed_config("pretrain_encoder", ["experiment=quick", *cp.OBJECTIVES[objective][1]])["model"]
            assert (stage1["pretrain_retention_weight"] > 0) == (objective == "retention"), slug
            assert (stage1["pretrain_contrastive_weight"] > 0) == (objective == "contrastive"), slug
        stage2 = composed_config("train", ["experiment=quick", "model=ad_compressed_dr", *overrides])["model"]
        assert stage2["freeze_encoder"] == slug.endswith("frozen"), slug
    assert cp.steps_to_reach(np.array([325, 650, 975]), np.array([0.5, 0.8, 0.7]), 0.75) == 650
    assert cp.steps_to_reach(np.array([325, 650]), np.array([0.5, 0.6]), 0.75) is None
    final = 0.8951682692307692  # a final evaluation: the eval file holds float64, the event file float32 (0.89516824)
    curve = np.array([0.5, final], dtype=np.float32).astype(np.float64)  # as scalars() reads it
    assert cp.steps_to_reach(np.array([325, 650]), curve, final) == 650

    monkeypatch.setattr("sys.argv", ["compare_pretraining.py", "--variants", "scratch", "eval_interval=2000"])
    monkeypatch.setattr(cp, "run", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit):
        cp.main()
    assert "invalid choice: 'eval_interval=2000'" in capsys.readouterr().err


def test_compare_context_curves_show_the_source_on_the_same_episodes(tmp_path, monkeypatch):
    """The comparison's curve plot carries the source's learning curve, cut to the models' episodes."""
    import matplotlib.figure

    from scripts.compare_context import plot

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    source = {"source algorithm, its histories": list(np.linspace(0, 1, 120)),
              "source algorithm, episodes without a noise step": [None] * 120}  # no noise-free episode: NaN, not a crash
    plot({"model": np.full(100, 0.5)}, source, tmp_path / "c.png", "t")
    lines = {line.get_label(): line.get_ydata() for line in saved[0].axes[0].get_lines()}
    assert len(lines["source algorithm, its histories"]) == 100
    assert np.isnan(lines["source algorithm, episodes without a noise step"]).all()
    assert set(lines) >= {"model", "optimal"}
