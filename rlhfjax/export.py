"""Export a trained stage's policy as a Hugging Face checkpoint directory.

    python -m rlhfjax.export --workdir=W --stage=rl --out=DIR

reads W's config.json, restores the stage's final parameters (the same `stage_params` a later stage
uses) and writes config.json + model.safetensors (+ the tokenizer files when the run's tokenizer is a
Hugging Face one) that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "the run's workdir (holds config.json and checkpoints/)")
flags.DEFINE_string("stage", "rl", "whose policy: sft | rl | ppo")
flags.DEFINE_string("out", None, "output directory")


def export(workdir: str, stage: str, out: str) -> str:
  """Write `stage`'s final policy of the run in `workdir` to `out`; returns `out`."""
  import ml_collections
  from rlhfjax.models.hf import save_hf
  from rlhfjax.train.pipeline import import_stages, setup_run
  from rlhfjax.train.stage import stage_params
  if stage not in ("sft", "rl", "ppo"):
    raise ValueError(f"--stage must be sft, rl or ppo (a policy), got {stage!r}")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a run's workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  import_stages()
  run = setup_run(config, workdir)
  params = stage_params(run, stage)
  tokenizer = run.tokenizer if hasattr(run.tokenizer, "save_pretrained") else None
  save_hf(run.model_cfg, params, out, tokenizer=tokenizer)
  return out


def main(argv):
  del argv
  out = export(FLAGS.workdir, FLAGS.stage, FLAGS.out)
  print(f"wrote {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
