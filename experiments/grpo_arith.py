"""GRPO past a flawed teacher (see `exceed_teacher.py`): group-normalized 0/1 verifier rewards.

    python -m rlhfjax.main --config=experiments/grpo_arith.py --workdir=/tmp/grpo_arith

Advantages: (r - mean_group) / std_group over the 8 samples of each prompt (DeepSeekMath eq. 3);
KL to the SFT reference in the loss with the k3 estimator (kl_mode auto = "loss").
"""

try:
  from . import exceed_teacher
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  exceed_teacher = import_sibling(__file__, "exceed_teacher")


def get_config():
  c = exceed_teacher.get_config("grpo")
  c.rl.advantage_scale = "group"  # group std (GRPO); "none" = Dr. GRPO
  return c


def get_sweep():
  """`python -m rlhfjax.sweep --config=grpo_arith --root=DIR`: RL learning rate x seed."""
  from rlhfjax.sweep import product
  return product({"rl_optim.learning_rate": [3e-5, 1e-4, 3e-4], "seed": [0, 1]})
