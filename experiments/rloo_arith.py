"""RLOO past a flawed teacher (see `exceed_teacher.py`): leave-one-out baseline per prompt.

    python -m rlhfjax.main --config=experiments/rloo_arith.py --workdir=/tmp/rloo_arith

Advantage of sample i: r_i - mean_{j != i} r_j over its group (Ahmadian et al. 2024, eq. 5), with
the KL penalty folded into the sequence reward (kl_mode auto = "reward"), whitened over the batch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import exceed_teacher  # noqa: E402


def get_config():
  c = exceed_teacher.get_config("rloo")
  c.rl.whiten_advantages = True  # normalize advantages over the batch's response tokens
  return c
