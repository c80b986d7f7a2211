"""REINFORCE++ past a flawed teacher (see `exceed_teacher.py`): no critic, no group baseline.

    python -m rlhfjax.main --config=experiments/reinforce_pp_arith.py --workdir=/tmp/rpp_arith

Token rewards = score at the last token - beta * KL_t; advantages = their return-to-go whitened over
the whole batch (Hu 2025, sec. 3). Samples per prompt stay 8 only to keep the rollout batch equal
to the other algorithms'; REINFORCE++ does not use the grouping.
"""

try:
  from . import exceed_teacher
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  exceed_teacher = import_sibling(__file__, "exceed_teacher")


def get_config():
  c = exceed_teacher.get_config("reinforce_pp")
  c.rl.kl_estimator = "k1"  # per-token KL in the reward
  return c
