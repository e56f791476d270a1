"""Models: config in, tensors out. `MODELS` maps the config name (`model.model`) to the class."""
from __future__ import annotations

from model.ad import AD
from model.ad_compressed import CompressedAD, CompressionEncoder, check_sizes

MODELS = {"AD": AD, "CompressedAD": CompressedAD}

# constructor arguments each model reads from its config group
_ARCH_KEYS = {
    "AD": ("tf_n_embd", "tf_n_layer", "tf_n_head", "tf_dropout", "n_transit"),
    "CompressedAD": ("tf_n_embd", "tf_n_layer", "tf_n_head", "tf_dropout", "encoder_n_layer", "encoder_n_head", "n_latent",
                     "decoder_max_seq_length", "max_compress_length", "max_uncompressed_length", "rollout_compress_length",
                     "latent_write", "encoder_dropout"),
}


def build_model(model_cfg, n_states: int, n_actions: int):
    name = model_cfg["model"]
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}'. Known models: {sorted(MODELS)} (set model.model or pick model=<file>).")
    if name == "CompressedAD":
        check_sizes(model_cfg)
    kwargs = {k: model_cfg[k] for k in _ARCH_KEYS[name]}
    return MODELS[name](n_states=n_states, n_actions=n_actions, **kwargs)


def rollout_memory_bytes(rollout) -> int:
    """Bytes of the in-context state a rollout keeps (tokens, latents, KV cache): what grows with history."""
    tensors = [getattr(rollout, name, None) for name in ("tokens", "latents")]
    tensors += [t for kv in rollout.cache or [] for t in kv]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


__all__ = ["AD", "CompressedAD", "CompressionEncoder", "MODELS", "build_model", "check_sizes", "rollout_memory_bytes"]
