"""Models: config in, tensors out. `MODELS` maps the config name (`model.model`) to the class and its typed config."""
from __future__ import annotations

from dataclasses import fields

from model.ad import AD, ADConfig
from model.ad_compressed import CompressedAD, CompressedADConfig, CompressionEncoder

MODELS = {"AD": (AD, ADConfig), "CompressedAD": (CompressedAD, CompressedADConfig)}


def model_config(model_cfg) -> ADConfig | CompressedADConfig:
    """The typed architecture config of a model config group (its other keys, the training recipe, are left out):
    validated on construction, so a config that cannot work is refused before anything is built or written."""
    name = model_cfg["model"]
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}'. Known models: {sorted(MODELS)} (set model.model or pick model=<file>).")
    config_class = MODELS[name][1]
    return config_class(**{f.name: model_cfg[f.name] for f in fields(config_class) if f.name in model_cfg})


def build_model(model_cfg, n_states: int, n_actions: int):
    """The model named by `model_cfg["model"]`, from a config group (dict / DictConfig) or a typed config."""
    config = model_cfg if isinstance(model_cfg, (ADConfig, CompressedADConfig)) else model_config(model_cfg)
    model_class = next(cls for cls, config_class in MODELS.values() if isinstance(config, config_class))
    return model_class(config, n_states, n_actions)


def rollout_memory_bytes(rollout) -> int:
    """Bytes of the in-context state a rollout keeps (tokens, latents, KV cache): what grows with history."""
    tensors = [getattr(rollout, name, None) for name in ("tokens", "latents")]
    tensors += [t for kv in rollout.cache or [] for t in kv]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


__all__ = ["AD", "ADConfig", "CompressedAD", "CompressedADConfig", "CompressionEncoder", "MODELS", "build_model",
           "model_config", "rollout_memory_bytes"]
