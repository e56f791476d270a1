"""Environments. Darkroom is the only one; `make_env_spec` maps a config name to it."""
from env.darkroom import (
    ACTION_DELTAS,
    BatchedDarkroom,
    Darkroom,
    DarkroomSpec,
    optimal_return,
    split_goals,
)

ENVS = {"darkroom": DarkroomSpec}


def make_env_spec(env_cfg) -> DarkroomSpec:
    """Build the env description (grid, horizon, goal split) from the `env` config group."""
    name = env_cfg["name"]
    if name not in ENVS:
        raise ValueError(f"Unknown env name '{name}'. Known envs: {sorted(ENVS)} (set env.name or pick env=<name>).")
    return ENVS[name].from_config(env_cfg)


__all__ = ["ACTION_DELTAS", "BatchedDarkroom", "Darkroom", "DarkroomSpec", "make_env_spec", "optimal_return", "split_goals"]
