"""File I/O shared by the scripts: atomic writes and checkpoint loading with clear errors.

Every output is written to a temporary file next to its destination and renamed into place, so a
kill at any moment leaves either the old complete file or the new complete one.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from utils.errors import CheckpointError


def _atomic_write(path: Path, write_fn) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(obj, path) -> None:
    atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def load_checkpoint(path, what: str = "checkpoint", required_keys=()) -> dict:
    """`torch.load(path, weights_only=True)` with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: '{path}'. Check the path (relative paths start at the repo root).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{what} '{path}' was refused by torch.load(weights_only=True): it holds objects other than tensors and "
            f"plain containers ({str(e).splitlines()[0]}). Only load checkpoints this repo wrote."
        ) from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(
            f"{what} '{path}' is not a readable PyTorch checkpoint (truncated or another file type?): {(str(e).splitlines() or [type(e).__name__])[0]}"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required_keys):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{what} '{path}' lacks the keys {list(required_keys)} (found {found}).")
    return ckpt
