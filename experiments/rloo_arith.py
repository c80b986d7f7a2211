"""RLOO past a flawed teacher (see `exceed_teacher.py`): leave-one-out baseline per prompt.

    python -m rlhfjax.main --config=experiments/rloo_arith.py --workdir=/tmp/rloo_arith

Advantage of sample i: r_i - mean_{j != i} r_j over its group (Ahmadian et al. 2024, eq. 5), with
the KL penalty folded into the sequence reward (kl_mode auto = "reward"), whitened over the batch.
"""

try:
  from . import exceed_teacher
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  exceed_teacher = import_sibling(__file__, "exceed_teacher")


def get_config():
  c = exceed_teacher.get_config("rloo")
  c.rl.whiten_advantages = True  # normalize advantages over the batch's response tokens
  return c
