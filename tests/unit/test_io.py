"""Checkpoint files (utils/io.py): malicious, truncated and foreign checkpoints give clear errors."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import run_script
from utils.errors import CheckpointError
from utils.io import load_checkpoint


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.slow
def test_malicious_checkpoint_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"model_state_dict": {}, "config": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused by torch.load"):
        load_checkpoint(path)
    out = run_script("evaluate.py", f"checkpoint={path}", check=False)
    assert out.returncode == 1 and "refused" in out.stderr
    assert not marker.exists()
    run, args = Payload(marker).__reduce__()  # what a full unpickle would call: the payload is live, so the check
    run(*args)                                # above can fail
    assert marker.exists()


@pytest.mark.slow  # runs evaluate.py
def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model_state_dict": {}, "config": {}}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    (tmp_path / "text.pt").write_text("hello")
    for name in ("cut.pt", "text.pt"):
        out = run_script("evaluate.py", f"checkpoint={tmp_path / name}", check=False)
        assert out.returncode == 1 and "not a readable PyTorch checkpoint" in out.stderr and "Traceback" not in out.stderr
    torch.save({"weights": 1}, tmp_path / "other.pt")
    out = run_script("evaluate.py", f"checkpoint={tmp_path / 'other.pt'}", check=False)
    assert out.returncode == 1 and "lacks the keys" in out.stderr
