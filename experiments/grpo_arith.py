"""GRPO past a flawed teacher (see `exceed_teacher.py`): group-normalized 0/1 verifier rewards.

    python -m rlhfjax.main --config=experiments/grpo_arith.py --workdir=/tmp/grpo_arith

Advantages: (r - mean_group) / std_group over the 8 samples of each prompt (DeepSeekMath eq. 3);
KL to the SFT reference in the loss with the k3 estimator (kl_mode auto = "loss").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import exceed_teacher  # noqa: E402


def get_config():
  c = exceed_teacher.get_config("grpo")
  c.rl.advantage_scale = "group"  # group std (GRPO); "none" = Dr. GRPO
  return c
