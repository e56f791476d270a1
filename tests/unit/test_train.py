"""train.py as a library: the config checks that run before anything is written."""
from __future__ import annotations

import pytest

from tests.helpers import compose_cfg
from train import validate_config
from utils.errors import UserConfigError


@pytest.mark.parametrize("overrides,message", [
    (["training.segments_per_step=0"], r"training.segments_per_step \(0\) must be >= 1"),
    (["training.memory_restart=1.5"], r"training.memory_restart \(1.5\) must be a probability"),
    (["model.n_latent=50", "model.decoder_max_seq_length=56"], "exceeds decoder_max_seq_length"),
    (["training.train_batch_size=95"], "multiple of the number of processes"),
])
def test_compressed_ad_configs_that_cannot_work_are_refused(overrides, message):
    cfg = compose_cfg("train", ["experiment=quick", "model=ad_compressed_dr", *overrides])
    with pytest.raises(UserConfigError, match=message):
        validate_config(cfg, world=2)


def test_the_quick_presets_pass_and_unknown_models_are_named():
    for env in ("darkroom", "dark_key_to_door"):
        for model in ("ad_dr", "ad_compressed_dr"):  # one model file for every env
            validate_config(compose_cfg("train", ["experiment=quick", f"env={env}", f"model={model}"]), world=2)
    with pytest.raises(UserConfigError, match="Unknown model 'GPT'"):
        validate_config(compose_cfg("train", ["model.model=GPT"]), world=1)


def test_an_env_and_model_preset_applies_to_that_pair_only():
    """experiment_env_model/quick_dark_key_to_door_<model>.yaml: both models train longer on Key-to-Door."""
    steps = lambda env, model: compose_cfg("train", ["experiment=quick", f"env={env}", f"model={model}"]).training.train_timesteps
    assert steps("dark_key_to_door", "ad_compressed_dr") == 4000
    assert steps("dark_key_to_door", "ad_dr") == 6000
    assert steps("darkroom", "ad_compressed_dr") == 2600 and steps("darkroom", "ad_dr") == 4000
    override = compose_cfg("train", ["experiment=quick", "env=dark_key_to_door", "model=ad_compressed_dr", "training.train_timesteps=7"])
    assert override.training.train_timesteps == 7  # a command-line override still wins
