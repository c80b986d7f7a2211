"""Best-of-N rejection sampling past a flawed teacher (see `exceed_teacher.py`).

    python -m rlhfjax.main --config=experiments/best_of_n_arith.py --workdir=/tmp/bon_arith

N = 8 attempts per problem; the top-k by verifier reward are positive (+1) and the bottom-k negative
(-1) signal, the rest ignored. A positive must beat its group's worst and a negative trail its best,
so a group whose attempts all tie (all right or all wrong) gives no signal, and with one right
answer of 8 only that one is positive.
KL to the SFT reference in the loss (kl_mode auto = "loss").
"""

try:
  from . import exceed_teacher
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  exceed_teacher = import_sibling(__file__, "exceed_teacher")


def get_config():
  c = exceed_teacher.get_config("best_of_n")
  c.rl.best_of_n_k = 2  # top-2 positive, bottom-2 negative of each 8
  return c
