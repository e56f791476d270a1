"""Grid tasks behind one interface (env/base.py): `ENVS` maps `env.name` to its spec class."""
from env.base import (
    ACTION_DELTAS,
    SPLITS,
    BatchedGridEnv,
    GridTaskEnv,
    GridTaskSpec,
    split_tasks,
)
from env.dark_key_to_door import BatchedDarkKeyToDoor, DarkKeyToDoor, DarkKeyToDoorSpec
from env.darkroom import BatchedDarkroom, Darkroom, DarkroomSpec, optimal_return

ENVS = {spec.name: spec for spec in (DarkroomSpec, DarkKeyToDoorSpec)}


def make_env_spec(env_cfg) -> GridTaskSpec:
    """Build the env description (grid, horizon, task split) from the `env` config group."""
    name = env_cfg["name"]
    if name not in ENVS:
        raise ValueError(f"Unknown env name '{name}'. Known envs: {sorted(ENVS)} (set env.name or pick env=<name>).")
    return ENVS[name].from_config(env_cfg)


__all__ = ["ACTION_DELTAS", "ENVS", "SPLITS", "BatchedDarkKeyToDoor", "BatchedDarkroom", "BatchedGridEnv", "DarkKeyToDoor",
           "DarkKeyToDoorSpec", "Darkroom", "DarkroomSpec", "GridTaskEnv", "GridTaskSpec", "make_env_spec", "optimal_return",
           "split_tasks"]
