"""Source RL algorithms whose learning histories AD distils. `ALGORITHMS` maps config names."""
from algorithm.q_learning import run_q_learning

ALGORITHMS = {"q_learning": run_q_learning}

__all__ = ["ALGORITHMS", "run_q_learning"]
