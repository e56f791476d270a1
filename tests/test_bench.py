"""The benchmark scripts run (tiny sizes): a GPU session must not be spent on a script that crashes."""
import sys

from tests.conftest import run_script


def test_gpu_throughput_script_smoke_on_cpu():
    out = run_script("bench/gpu_throughput.py", "--device", "cpu", "--steps", "1", "--batch-scale", "0.02",
                     launcher=[sys.executable], timeout=300)
    lines = [line for line in out.stdout.splitlines() if "tokens/s" in line]
    assert len(lines) == 3 and "AD" in lines[0] and "CompressedAD" in lines[1] and "chains" in lines[2] and "% of 989" in lines[0]


def test_rollout_bench_smoke():
    out = run_script("bench/rollout.py", "--envs", "2", "--lengths", "30", "60", "--block", "10", timeout=300)
    assert "CompressedAD: cost at 60 / cost at 30" in out.stdout and "AD, full history" in out.stdout
