"""The RL stages' host loop: sample -> score -> experience -> update, with eval, metrics, checkpoints.

Stage `rl` scores with verifiers (`config.rl_reward`, e.g. "math:1.0,format:0.1"); the same loop
serves reward-model RL (`ppo` stage) through a different `Scorer`. Per iteration the only host
round-trip is the decoded text for verifiers (and metrics once per `log_every`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhfjax import rl
from rlhfjax.checkpoint import Checkpointer, abstract_like
from rlhfjax.config import to_dataclass
from rlhfjax.data import DataIterator, collate_prompts
from rlhfjax.models.heads import PolicyModel, PolicyValueModel, ValueModel, transplant_trunk
from rlhfjax.parallel import replicated, shard_batch
from rlhfjax.sampling import SamplingConfig, generate
from rlhfjax.train.pipeline import Run, register_stage
from rlhfjax.train.rl import RLConfig, RLState, make_experience_fn, make_rl_update
from rlhfjax.train.sft import check_finite
from rlhfjax.train.state import create_train_state, make_optimizer, state_shardings

log = logging.getLogger("rlhfjax")


UPDATE_VARIANTS = ("jit", "shard_map")


@dataclasses.dataclass(frozen=True)
class RLLoopConfig:
  eval_every: int = 20  # held-out accuracy / pass@k every N iterations (0 = before and after only)
  eval_examples: int = 128  # held-out problems for eval
  eval_samples: int = 4  # samples per problem for pass@k / maj@k at eval temperature
  log_every: int = 1  # metrics every N iterations
  checkpoint_every: int = 10  # save every N iterations (and at the end)
  keep_checkpoints: int = 2
  # A reward that could not score a completion (NaN, per the reward contract; counted in the
  # metrics as reward_nan_<name>): "zero" scores it 0; "mask" drops that completion from the loss
  # (its score is replaced by its group's mean so baselines are unaffected); "raise" stops the run.
  nan_reward: str = "zero"
  # The update's data parallelism: "jit" (GSPMD from the in/out shardings; data + fsdp + tensor) or
  # "shard_map" (explicit per-device gradients and psum over `data`; meant for a (N, 1, 1) mesh).
  update_variant: str = "jit"

  def __post_init__(self):
    if self.update_variant not in UPDATE_VARIANTS:
      raise ValueError(f"rl_loop.update_variant must be one of {UPDATE_VARIANTS}, "
                       f"got {self.update_variant!r}")
    if self.nan_reward not in NAN_REWARD_POLICIES:
      raise ValueError(f"rl_loop.nan_reward must be one of {NAN_REWARD_POLICIES}, "
                       f"got {self.nan_reward!r}")


NAN_REWARD_POLICIES = ("zero", "mask", "raise")


# A scorer maps (rollout texts, rollout examples, device rollout) -> (scores [B] np, metrics dict).
Scorer = Callable[[list[str], list[dict], dict], tuple[np.ndarray, dict]]


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  ok = ~np.isnan(x)
  return float(x[ok].mean()) if ok.any() else float("nan")


def verifier_scorer(spec: str, nan_reward: str = "zero") -> Scorer:
  """Weighted verifier rewards from a spec like "math:1.0,format:0.1" (names from the registry).

  Each reward is logged separately (`reward_<name>`: mean over the completions it could score,
  `reward_nan_<name>`: how many it could not). With `nan_reward="mask"` the total is NaN where any
  reward is, for `mask_unscored` to drop; "zero" counts an unscorable reward as 0.
  """
  from rlhfjax.rewards import combine_rewards
  weights = []
  for part in spec.split(","):
    name, _, w = part.strip().partition(":")
    weights.append((name, float(w or 1.0)))
  policy = {"zero": "zero", "mask": "propagate", "raise": "raise"}[nan_reward]

  def score(texts, examples, rollout):
    fields = {"answer": [e["answer"] for e in examples]}
    total, per_fn, nan_counts = combine_rewards(weights, [e["prompt"] for e in examples], texts,
                                                nan_policy=policy, **fields)
    metrics = {f"reward_{k}": _nanmean(v) for k, v in per_fn.items()}
    metrics.update({f"reward_nan_{k}": float(v) for k, v in nan_counts.items()})
    return np.asarray(total, np.float32), metrics
  return score


def mask_unscored(scores: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
  """NaN scores -> (scores with each NaN replaced by its group's scored mean (0 if none), valid [B]).

  Rows with `valid == 0` are then dropped from the loss (their response mask is zeroed), and the
  replacement keeps group baselines (GRPO / RLOO / best-of-N) what they would be without them.
  """
  scores = np.asarray(scores, np.float32)
  valid = ~np.isnan(scores)
  if valid.all():
    return scores, valid.astype(np.float32)
  groups = np.where(valid, scores, 0.0).reshape(-1, group_size)
  counts = valid.reshape(-1, group_size).sum(1, keepdims=True)
  means = np.where(counts > 0, groups.sum(1, keepdims=True) / np.maximum(counts, 1), 0.0)
  filled = np.where(valid, scores, np.broadcast_to(means, groups.shape).reshape(-1))
  return filled.astype(np.float32), valid.astype(np.float32)


def rollout_stats(texts: list[str]) -> dict:
  """Thinking / format metrics of sampled completions (`rewards.thinking_stats`), prefixed."""
  from rlhfjax.rewards import thinking_stats
  return {f"think_{k}": v for k, v in thinking_stats(texts).items()}


def policy_module(run: Run, cfg: RLConfig):
  """The policy's module: `PolicyValueModel` (LM + value head on one trunk) with `shared_trunk`."""
  return PolicyValueModel(run.model_cfg) if cfg.shared_trunk else PolicyModel(run.model_cfg)


def rl_state_shardings(run: Run, cfg: RLConfig, policy_tx, value_tx):
  p_abs, p_sh = state_shardings(policy_module(run, cfg), policy_tx, run.mesh, run.rules)
  v_abs, v_sh = (None, None)
  if cfg.separate_critic:
    v_abs, v_sh = state_shardings(ValueModel(run.model_cfg), value_tx, run.mesh, run.rules)
  kl = cfg.kl_controller().init()
  rep = replicated(run.mesh)
  abstract = RLState(policy=p_abs, value=v_abs, kl=jax.eval_shape(lambda: kl),
                     iteration=jax.ShapeDtypeStruct((), jnp.int32))
  shardings = RLState(policy=p_sh, value=v_sh, kl=jax.tree.map(lambda _: rep, kl), iteration=rep)
  return abstract, shardings


def init_rl_state(run: Run, cfg: RLConfig, policy_params, value_init_params, policy_tx, value_tx,
                  rng) -> RLState:
  """Policy from `policy_params` (SFT); critic trunk from `value_init_params` (RM or SFT), head 0.

  With `cfg.shared_trunk` the policy carries the value head (zero-initialized) on its own trunk and
  `value_init_params` is unused.
  """
  if cfg.shared_trunk:
    module = policy_module(run, cfg)
    fresh, _ = create_train_state(module, policy_tx, rng, run.mesh, run.rules)
    policy_params = {**policy_params, "value_head": fresh.params["value_head"]}
    policy, _ = create_train_state(module, policy_tx, rng, run.mesh, run.rules, params=policy_params)
  else:
    policy, _ = create_train_state(PolicyModel(run.model_cfg), policy_tx, rng, run.mesh, run.rules,
                                   params=policy_params)
  value = None
  if cfg.separate_critic:
    vmodel = ValueModel(run.model_cfg)
    fresh, _ = create_train_state(vmodel, value_tx, jax.random.fold_in(rng, 1), run.mesh, run.rules)
    vparams = transplant_trunk(fresh.params, value_init_params)
    value, _ = create_train_state(vmodel, value_tx, jax.random.fold_in(rng, 1), run.mesh, run.rules,
                                  params=vparams)
  # Scalars placed replicated on the mesh, as `rl_update` returns them: an uncommitted scalar
  # here would make the first and second iterations compile the update twice.
  rep = replicated(run.mesh)
  return RLState(policy=policy, value=value, kl=jax.device_put(cfg.kl_controller().init(), rep),
                 iteration=jax.device_put(jnp.zeros((), jnp.int32), rep))


def eval_examples(run: Run, n: int) -> list[dict]:
  return [run.test_examples[i] for i in range(min(n, len(run.test_examples)))]


def flaw_class_accuracy(examples: list[dict], correct: np.ndarray, flaw: str) -> dict:
  """Greedy accuracy inside / outside the flawed teacher's weak class (empty if no flaw)."""
  from rlhfjax.data.arithmetic import in_flaw_class
  if flaw == "none":
    return {}
  try:
    member = np.array([in_flaw_class(e, flaw) for e in examples])
  except ValueError:  # not arithmetic questions
    return {}
  correct = np.asarray(correct, np.float64)
  out = {"flaw_class_fraction": float(member.mean())}
  if member.any():
    out["accuracy_greedy_flaw_class"] = float(correct[member].mean())
  if (~member).any():
    out["accuracy_greedy_other"] = float(correct[~member].mean())
  return out


def teacher_eval(run: Run, loop: RLLoopConfig) -> dict:
  """The teacher's own accuracy on the same held-out problems the policy is evaluated on."""
  from rlhfjax.data.arithmetic import teacher_accuracy
  exs = eval_examples(run, loop.eval_examples)
  if not exs or "demonstration" not in exs[0]:
    return {}
  from rlhfjax.rewards import math_reward
  correct = math_reward([e["demonstration"] for e in exs], [e["answer"] for e in exs])
  out = {"teacher_accuracy": teacher_accuracy(exs)}
  by_class = flaw_class_accuracy(exs, correct, run.config.data.get("flaw", "none"))
  out.update({k.replace("accuracy_greedy", "teacher_accuracy"): v for k, v in by_class.items()
              if k != "flaw_class_fraction"})
  return out


def evaluate_rl(run: Run, params, loop: RLLoopConfig, cfg: RLConfig, rng) -> tuple[dict, list]:
  """Greedy accuracy, and pass@k / maj@k / mean reward over `eval_samples` samples per problem."""
  from rlhfjax.rewards import extract_answer, math_reward
  from rlhfjax.train.evaluate import generate_completions
  if loop.eval_examples <= 0:
    return {}, []
  d = run.config.data
  exs = eval_examples(run, loop.eval_examples)
  qs, golds = [e["prompt"] for e in exs], [e["answer"] for e in exs]
  kw = dict(max_prompt_len=d.max_prompt_len, max_new_tokens=cfg.max_new_tokens or d.max_response_len,
            batch_size=run.config.eval.batch_size, rng=rng)
  greedy = generate_completions(params, run.model_cfg, run.tokenizer, qs, greedy=True, **kw)
  correct_greedy = math_reward(greedy, golds)
  out = {"accuracy_greedy": float(np.mean(correct_greedy))}
  out.update(flaw_class_accuracy(exs, correct_greedy, run.config.data.get("flaw", "none")))
  out.update({f"greedy_{k}": v for k, v in rollout_stats(greedy).items()
              if k in ("think_frac_well_formed", "think_mean_thinking_words")})
  k = loop.eval_samples
  if k > 0:
    sampled = generate_completions(params, run.model_cfg, run.tokenizer,
                                   [q for q in qs for _ in range(k)], temperature=cfg.temperature,
                                   **kw)
    correct = math_reward(sampled, [g for g in golds for _ in range(k)]).reshape(len(qs), k)
    out["accuracy_sampled"] = float(correct.mean())
    out[f"pass@{k}"] = float(np.mean(rl.pass_at_k(np.full(len(qs), k), correct.sum(1), k)))
    answers = [[extract_answer(sampled[i * k + j]) for j in range(k)] for i in range(len(qs))]
    from rlhfjax.rewards import answers_match
    out[f"maj@{k}"] = float(np.mean(rl.maj_at_k(answers, golds, k, match=answers_match)))
  samples = [dict(prompt=q, completion=t, answer=a, correct=bool(c))
             for q, t, a, c in zip(qs[:16], greedy[:16], golds[:16], correct_greedy[:16])]
  return out, samples


def stage_params(run: Run, stage: str):
  """Final parameters of an earlier stage: from this process, or restored from its checkpoint."""
  if stage in run.params:
    return run.params[stage]
  raise ValueError(f"stage needs the '{stage}' stage's parameters: put '{stage}' before it in "
                   "config.stages (a finished stage is resumed from its checkpoint instantly)")


def run_rl_loop(run: Run, stage: str, cfg: RLConfig, loop: RLLoopConfig, scorer: Scorer,
                policy_init, ref_params, value_init=None, extra_eval: Callable | None = None) -> dict:
  d = run.config.data
  policy_tx = make_optimizer(cfg.optim(), cfg.iterations * cfg.epochs)
  value_tx = make_optimizer(cfg.optim(value=True), cfg.iterations * cfg.epochs)
  abstract, shardings = rl_state_shardings(run, cfg, policy_tx, value_tx)
  ckpt_dir = run.ckpt_dir(stage)
  ckpt = Checkpointer(ckpt_dir, max_to_keep=loop.keep_checkpoints)
  data = DataIterator(run.train_examples, cfg.prompts_per_iter // jax.process_count(),
                      seed=run.seed + 17, collate=None)
  rng = jax.random.key(run.seed + 3)
  eval_rng = jax.random.key(run.seed + 4)
  # the reference is a plain policy tree (no value head, even when the trainee shares its trunk)
  ref_params = jax.device_put(ref_params, {k: v for k, v in shardings.policy.params.items()
                                           if k in ref_params})

  meta: dict = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(abstract_like(abstract, shardings))
    data.set_state(meta["data"])
    log.info("%s: resumed at iteration %d", stage, int(state.iteration))
  else:
    state = init_rl_state(run, cfg, policy_init, value_init, policy_tx, value_tx, rng)
    before, _ = evaluate_rl(run, state.policy.params, loop, cfg, eval_rng)
    if extra_eval:
      before.update(extra_eval(state.policy.params))
    meta = {"before": before, "teacher": teacher_eval(run, loop)}
    run.writer.write(f"{stage}_eval", 0, {**before, **meta["teacher"]})

  sampling = SamplingConfig(model=run.model_cfg, max_new_tokens=cfg.max_new_tokens or d.max_response_len,
                            eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
  experience_fn = make_experience_fn(cfg, run.model_cfg, run.mesh, run.rules)
  if loop.update_variant == "shard_map":
    from rlhfjax.train.rl_shard_map import make_rl_update_shard_map as make_update
  else:
    make_update = make_rl_update
  update_fn = make_update(cfg, run.model_cfg, policy_tx, value_tx, shardings, run.mesh, run.rules)
  start = int(state.iteration)
  from rlhfjax.metrics import ProgressBar
  bar = ProgressBar(cfg.iterations, stage, initial=start)
  last_good = ckpt.latest_step()
  for it in range(start + 1, cfg.iterations + 1):
    t0 = time.perf_counter()
    examples = next(data)
    group = [e for e in examples for _ in range(cfg.group_size)]  # contiguous groups per prompt
    ids, mask = run.tokenizer.encode_prompts([e["prompt"] for e in group], d.max_prompt_len)
    ids, mask = shard_batch((ids, mask), run.mesh, run.rules)
    it_rng = jax.random.fold_in(rng, it)
    out = generate(state.policy.params, ids, mask, it_rng, sampling)
    tokens_host, mask_host = jax.device_get((out.tokens, out.mask))
    t_sample = time.perf_counter()
    texts = run.tokenizer.decode_batch(np.asarray(tokens_host), np.asarray(mask_host))
    rollout = {"prompt_ids": ids, "prompt_mask": mask, "response_ids": out.tokens,
               "response_mask": out.mask, "finished": out.finished}
    scores, score_metrics = scorer(texts, group, rollout)
    if loop.nan_reward == "mask":
      scores, valid = mask_unscored(scores, cfg.group_size)
      score_metrics["scored_fraction"] = float(valid.mean())
      if not valid.all():
        rollout["response_mask"] = out.mask * jnp.asarray(valid, out.mask.dtype)[:, None]
    elif np.isnan(scores).any():  # a custom scorer broke the contract for "zero"
      scores = np.nan_to_num(scores, nan=0.0)
    score_metrics.update(rollout_stats(texts))
    t_score = time.perf_counter()
    value_params = state.value.params if cfg.separate_critic else None
    exp, exp_metrics = experience_fn(state.policy.params, ref_params, value_params, rollout,
                                     jnp.asarray(scores), state.kl.value)
    state, upd_metrics = update_fn(state, exp, jax.random.fold_in(it_rng, 1))
    if it % loop.log_every == 0 or it % loop.checkpoint_every == 0 or it == cfg.iterations:
      host = jax.device_get({**exp_metrics, **upd_metrics})
      check_finite({"policy_loss": host["policy_loss"]}, stage, it, last_good, ckpt_dir)
      t_end = time.perf_counter()
      metrics = {k: float(v) for k, v in host.items()}
      metrics.update(score_metrics)
      metrics.update(time_sample_s=t_sample - t0, time_score_s=t_score - t_sample,
                     time_update_s=t_end - t_score, reward_mean=float(np.mean(scores)))
      run.writer.write(stage, it, metrics)
      bar.update(it, loss=metrics["policy_loss"], reward=metrics["reward_mean"],
                 kl=metrics["kl_seq_mean"])
    if loop.eval_every and it % loop.eval_every == 0 and it < cfg.iterations:
      ev, _ = evaluate_rl(run, state.policy.params, loop, cfg, eval_rng)
      if extra_eval:
        ev.update(extra_eval(state.policy.params))
      run.writer.write(f"{stage}_eval", it, ev)
    if it % loop.checkpoint_every == 0 or it == cfg.iterations:
      ckpt.save(it, state, {**meta, "data": data.get_state(), "stage": stage}, force=True)
      last_good = it
    if it % loop.log_every == 0:
      run.writer.write_samples(stage, it, [dict(prompt=group[0]["prompt"], completion=texts[0],
                                                score=float(scores[0]))])
  bar.close()

  after, samples = evaluate_rl(run, state.policy.params, loop, cfg, eval_rng)
  if extra_eval:
    after.update(extra_eval(state.policy.params))
  run.writer.write(f"{stage}_eval", cfg.iterations, after)
  run.writer.write_samples(f"{stage}_eval", cfg.iterations, samples)
  ckpt.close()
  run.params[stage] = state.policy.params
  result = {f"before_{k}": v for k, v in meta.get("before", {}).items()}
  result.update({f"after_{k}": v for k, v in after.items()})
  result.update(meta.get("teacher", {}))
  result["iterations"] = cfg.iterations
  result["algo"] = cfg.algo
  return result


@register_stage("rl")
def run_verifier_rl(run: Run) -> dict:
  """RL from verifiable rewards on the SFT policy (GRPO by default; any `rl.algo`)."""
  cfg = to_dataclass(RLConfig, run.config.rl)
  loop = to_dataclass(RLLoopConfig, run.config.rl_loop)
  sft = stage_params(run, "sft")
  return run_rl_loop(run, "rl", cfg, loop, verifier_scorer(run.config.rl_reward, loop.nan_reward),
                     policy_init=sft, ref_params=sft, value_init=sft)
