"""The benchmark scripts run (smoke sizes)."""
from __future__ import annotations

import sys

import pytest

from tests.helpers import run_script

pytestmark = pytest.mark.slow  # subprocess runs of the repo's scripts


def test_gpu_throughput_script_says_there_is_no_gpu_and_runs_its_smoke_size():
    out = run_script("bench/gpu_throughput.py", launcher=[sys.executable], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert "No GPU here" in out.stdout
    lines = [line for line in out.stdout.splitlines() if "tokens/s" in line]
    assert len(lines) == 2 and "AD" in lines[0] and "CompressedAD" in lines[1] and "% of 989" in lines[0]
    assert "batch 2," in lines[0] and "batch 5," in lines[1]  # 2% of the paper batches (128 windows, 256 lanes)


def test_rollout_bench_smoke():
    out = run_script("bench/rollout.py", "--envs", "2", "--lengths", "30", "60", "--block", "10", timeout=300)
    assert "CompressedAD: cost at 60 / cost at 30" in out.stdout and "AD, full history" in out.stdout
