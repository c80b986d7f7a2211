"""The `rm` stage: comparisons -> reward model (or an ensemble), evaluated, normalized, checkpointed.

Runs after `sft`, or alone on a workdir whose `sft` stage finished. `prepare`: comparisons from
`config.rm.train_file`/`test_file` (human JSONL) or the simulated labeler sampling the SFT policy,
written to `<workdir>/preferences/`, validated with the tokenizer (invalid records skipped and
reported), stored as TFDS array_record. `step`: `rlhfjax.train.reward`'s jitted step (vmapped for
ensembles). `evaluate`: held-out agreement with the labels and the gold preference. `finalize`:
gain/bias so the SFT policy's samples score mean 0 / std 1 (the final checkpoint is normalized).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import jax
import numpy as np

from rlhfjax.config import get_field, to_dataclass
from rlhfjax.data import DataIterator, encode_sequences
from rlhfjax.data.labeler import (ANSWER_RE, LabelerConfig, answer_from_prompt, gold_features,
                                  gold_score, simulate_labels)
from rlhfjax.data.preferences import (collate_preferences, load_preferences, read_preferences,
                                      responses_of, write_jsonl)
from rlhfjax.parallel import shard_batch
from rlhfjax.rewards.scorers import score_batched
from rlhfjax.train.reward import (RM_BATCH_KEYS, RMConfig, create_reward_state, make_reward_step,
                                  normalize_params, reward_state_shardings)
from rlhfjax.train.stage import Run, Stage, register_stage, stage_params
from rlhfjax.train.state import make_optimizer

log = logging.getLogger("rlhfjax")


def _n_train_records(cfg: RMConfig, lab: LabelerConfig) -> int:
  if cfg.format == "pairs":
    return lab.label_budget
  return max(1, lab.label_budget // (cfg.ranking_size * (cfg.ranking_size - 1) // 2))


def preference_files(run: Run, cfg: RMConfig, lab: LabelerConfig, sft_params) -> tuple[str, str, bool]:
  """(train JSONL, test JSONL, simulated?) — user files, or labels from the simulated human
  (generated once per workdir; a resumed run reuses them)."""
  if cfg.train_file:
    if not cfg.test_file:
      raise ValueError("config.rm.train_file needs config.rm.test_file (held-out comparisons)")
    return cfg.train_file, cfg.test_file, False
  d = run.config.data
  out = os.path.join(run.workdir, "preferences")
  train_path = os.path.join(out, f"{cfg.format}_train.jsonl")
  test_path = os.path.join(out, f"{cfg.format}_test.jsonl")
  common = dict(config=lab, max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len)
  if not os.path.exists(train_path):
    recs = simulate_labels(sft_params, run.model_cfg, run.tokenizer, run.train_examples,
                           n_records=_n_train_records(cfg, lab), kind=cfg.format, k=cfg.ranking_size,
                           seed=run.seed + 101, **common)
    write_jsonl(train_path, recs)
  if not os.path.exists(test_path):
    # held-out comparisons are always pairs (a pair is a ranking of 2), so formats compare fairly
    recs = simulate_labels(sft_params, run.model_cfg, run.tokenizer, run.test_examples,
                           n_records=lab.test_comparisons, kind="pairs", k=2, seed=run.seed + 202,
                           **common)
    if cfg.format == "rankings":
      recs = [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "answer": r["answer"]}
              for r in recs]
    write_jsonl(test_path, recs)
  return train_path, test_path, True


def prepare_preferences(run: Run, cfg: RMConfig, paths, simulated: bool = True) -> tuple:
  """Validate (tokenizer-aware) -> `*.valid.jsonl` -> TFDS array_record; returns (train, test,
  {split: SkipReport})."""
  d = run.config.data
  reports, valid_paths = {}, []
  for split, path in zip(("train", "test"), paths):
    recs, rep = read_preferences(path, cfg.format, keys="" if simulated else cfg.file_keys,
                                 tokenizer=run.tokenizer, max_prompt_len=d.max_prompt_len,
                                 max_response_len=d.max_response_len)
    reports[split] = rep
    vpath = os.path.join(run.workdir, "preferences", f"{cfg.format}_{split}.valid.jsonl")
    write_jsonl(vpath, recs)
    valid_paths.append(vpath)
  data_dir = d.data_dir or os.path.join(run.workdir, "tfds")
  train, test = load_preferences(data_dir, cfg.format, *valid_paths)
  return train, test, reports


def _flat_responses(records):
  prompts, resps, answers, rec_of = [], [], [], []
  for i, r in enumerate(records):
    for x in responses_of(r):
      prompts.append(r["prompt"])
      resps.append(x)
      answers.append(r.get("answer", ""))
      rec_of.append(i)
  return prompts, resps, answers, np.asarray(rec_of)


def evaluate_rm(params, records, run: Run, cfg: RMConfig, *, ensemble: bool, gold: bool) -> dict:
  """Held-out pairwise accuracy vs the labels and (if `gold`) vs the noiseless gold preference.

  Every ordered pair (i ranked above j) of every record counts; for ensembles the member mean is
  the score (and `member_accuracy` the members' average accuracy). Gold agreement skips pairs the
  gold preference ties. `labeler_gold_agreement` is how often the noisy labels themselves agree
  with the gold preference (the ceiling a perfect imitator of the labels would reach on them).
  """
  d = run.config.data
  records = list(records)
  prompts, resps, answers, rec_of = _flat_responses(records)
  tokens, mask = encode_sequences(run.tokenizer, prompts, resps, d.max_prompt_len, d.max_response_len)
  s = score_batched(params, tokens, mask, run.model_cfg, ensemble=ensemble,
                    batch_size=cfg.eval_batch_size, pool=cfg.pool)
  members = s if ensemble else s[None]
  s = members.mean(0)
  # ordered pairs (i above j) within each record
  starts = np.searchsorted(rec_of, np.arange(len(records)))
  ii, jj = [], []
  for r, st in enumerate(starts):
    k = len(responses_of(records[r]))
    a, b = np.triu_indices(k, 1)
    ii.append(st + a)
    jj.append(st + b)
  ii, jj = np.concatenate(ii), np.concatenate(jj)
  diff = s[ii] - s[jj]
  out = {"accuracy": float(np.mean(diff > 0)), "margin": float(np.mean(diff)), "pairs": int(len(ii)),
         "reward_mean": float(np.mean(s)), "reward_std": float(np.std(s))}
  if ensemble:
    out["member_accuracy"] = float(np.mean(members[:, ii] > members[:, jj]))
    out["member_std"] = float(np.mean(np.std(members, 0)))
  if gold:
    g = np.asarray([gold_score(p, x, a or None) for p, x, a in zip(prompts, resps, answers)])
    gd = g[ii] - g[jj]
    untied = gd != 0
    out["gold_accuracy"] = float(np.mean(np.sign(diff[untied]) == np.sign(gd[untied])))
    out["gold_pairs"] = int(untied.sum())
    out["labeler_gold_agreement"] = float(np.mean(gd[untied] > 0))
    # split by what separates the two responses: one states no answer at all; both answer and only
    # one is right (the RM must check the arithmetic); or only style (work shown, repetition, padding)
    right = np.asarray([gold_features(x, a or answer_from_prompt(p) or "")["correct"]
                        for p, x, a in zip(prompts, resps, answers)])
    answered = np.asarray([bool(ANSWER_RE.search(x)) for x in resps])
    no_answer = answered[ii] != answered[jj]
    wrong = ~no_answer & (right[ii] != right[jj])
    for name, sel in (("no_answer", no_answer), ("correctness", wrong), ("style", ~no_answer & ~wrong)):
      sel = sel & untied
      if sel.any():
        out[f"gold_accuracy_{name}"] = float(np.mean(np.sign(diff[sel]) == np.sign(gd[sel])))
        out[f"gold_pairs_{name}"] = int(sel.sum())
  return out


def reference_sample(run: Run, sft_params, n: int, temperature: float, rng):
  """`n` responses of the SFT (reference) policy to train prompts: tokens, mask [n, P+R]."""
  from rlhfjax.data.labeler import sample_policy
  d = run.config.data
  order = np.random.default_rng(run.seed + 303).permutation(len(run.train_examples))[:n]
  prompts = [run.train_examples[int(i)]["prompt"] for i in order]
  texts = sample_policy(sft_params, run.model_cfg, run.tokenizer, prompts, n=1,
                        max_prompt_len=d.max_prompt_len, max_new_tokens=d.max_response_len,
                        temperature=temperature, batch_size=min(256, len(prompts)), rng=rng)
  return encode_sequences(run.tokenizer, prompts, [t[0] for t in texts], d.max_prompt_len,
                          d.max_response_len)


@register_stage("rm")
class RMStage(Stage):
  """A reward model from comparisons (`config.rm`, `config.labeler`); eval: held-out agreement."""

  finite_keys = ("loss", "grad_norm")
  rate_name = "responses_per_s"
  progress_keys = ("loss", "accuracy")

  @classmethod
  def check_config(cls, config):
    to_dataclass(RMConfig, config.rm)
    if get_field(config, "labeler") is not None:
      to_dataclass(LabelerConfig, config.labeler)

  def __init__(self, run: Run):
    super().__init__(run)
    self.cfg = cfg = to_dataclass(RMConfig, run.config.rm)
    lab_section = get_field(run.config, "labeler")
    self.lab = to_dataclass(LabelerConfig, lab_section) if lab_section is not None else LabelerConfig()
    if cfg.format not in ("pairs", "rankings"):
      raise ValueError(f"config.rm.format must be 'pairs' or 'rankings', got {cfg.format!r}")
    self.k = 2 if cfg.format == "pairs" else cfg.ranking_size
    if self.k < 2:
      raise ValueError(f"config.rm.ranking_size must be >= 2, got {cfg.ranking_size}")
    self.log_every, self.eval_every = cfg.log_every, cfg.eval_every
    self.checkpoint_every, self.keep_checkpoints = cfg.checkpoint_every, cfg.keep_checkpoints
    self.ensemble = cfg.ensemble_size > 1
    self.n = cfg.ensemble_size if self.ensemble else None
    self.total_steps = cfg.steps  # 0 until `prepare` counts the comparisons (epochs)
    self.tx = make_optimizer(cfg.optim(), max(self.total_steps, 1))

  def prepare(self):
    run, cfg = self.run, self.cfg
    self.sft_params = stage_params(run, "sft")
    *paths, self.simulated = preference_files(run, cfg, self.lab, self.sft_params)
    self.train, self.test, self.reports = prepare_preferences(run, cfg, paths, self.simulated)
    self.total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(self.train) / cfg.batch_size))
    self.tx = make_optimizer(cfg.optim(), self.total_steps)
    d = run.config.data
    collate = functools.partial(collate_preferences, tokenizer=run.tokenizer,
                                max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
                                k=self.k)
    self.data = DataIterator(self.train, cfg.batch_size // jax.process_count(), seed=run.seed,
                             collate=collate)

  def state_spec(self):
    return reward_state_shardings(self.run.model_cfg, self.tx, self.run.mesh, self.run.rules, self.n)

  def init_state(self):
    run = self.run
    return create_reward_state(run.model_cfg, self.tx, jax.random.key(run.seed + 7), run.mesh,
                               run.rules, trunk=self.sft_params["trunk"], n=self.n)[0]

  def start(self, state):
    _, shardings = self.state_spec()
    self.step_fn = make_reward_step(self.run.model_cfg, self.tx, self.cfg.loss(), shardings,
                                    self.run.mesh, self.run.rules, ensemble=self.ensemble)

  def step(self, state, step):
    batch = next(self.data)
    batch = {key: batch[key] for key in RM_BATCH_KEYS}
    state, metrics = self.step_fn(state, shard_batch(batch, self.run.mesh, self.run.rules))
    return state, metrics, float(np.sum(batch["valid"]))

  def finalize(self, state):
    """Normalize on the reference (SFT) policy's samples: mean 0 / std 1."""
    run, cfg = self.run, self.cfg
    tokens, mask = reference_sample(run, self.sft_params, cfg.norm_samples,
                                    self.lab.sample_temperature, jax.random.key(run.seed + 404))
    params, raw = normalize_params(state.params, tokens, mask, run.model_cfg, ensemble=self.ensemble,
                                   batch_size=cfg.eval_batch_size, pool=cfg.pool)
    after = score_batched(params, tokens, mask, run.model_cfg, ensemble=self.ensemble,
                          batch_size=cfg.eval_batch_size, pool=cfg.pool)
    norm = {"raw_mean": np.asarray(raw["mean"]).tolist(), "raw_std": np.asarray(raw["std"]).tolist(),
            "mean": np.mean(after, -1).tolist(), "std": np.std(after, -1).tolist(),
            "samples": int(tokens.shape[0])}
    return state.replace(params=params), {"normalized": True, "pool": cfg.pool, "norm": norm}

  def evaluate(self, state):
    return evaluate_rm(state.params, self.test, self.run, self.cfg, ensemble=self.ensemble,
                       gold=self.simulated), []

  def result(self, state, result):
    cfg, norm = self.cfg, self.meta["norm"]
    result.update(steps=self.total_steps, format=cfg.format, ranking_size=self.k,
                  ensemble_size=cfg.ensemble_size, train_records=len(self.train),
                  test_records=len(self.test), norm_ref_mean=float(np.mean(norm["mean"])),
                  norm_ref_std=float(np.mean(norm["std"])))
    for split, rep in self.reports.items():
      result.update({f"{split}_{key}": v for key, v in rep.as_dict().items()})
    return result
