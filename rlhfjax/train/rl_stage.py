"""The `rl` stage: RL from verifiable rewards (GRPO by default; any `rl.algo`) on the SFT policy.

One iteration (`RLStage.step`; `rlhfjax.train.stage` runs the loop around it):

    prompts -> sampling.generate -> experience forwards (jit, dispatched) -> decode -> scorer
            -> experience from the forwards and scores (jit) -> rl_update (jit)

The experience's forwards (old log-probs, reference, values) need no scores, so they run on the
devices while the host decodes and scores (`make_experience_fns`); `time_score_s` is the host's
decoding and scoring (a device scorer, the `ppo` stage's reward model, queues behind the forwards).

The only host round-trip is the decoded text for the `Scorer` (verifiers on text here,
`config.rl_reward`; the reward model in the `ppo` subclass). In a multi-process run every process
reads the same global batch of prompts, takes its block (`process_rows`), decodes and scores only
the rows it holds (`local_rows`) and assembles the scores with `shard_batch`; the host metrics are
averaged over the processes (`process_mean`), so `check` decides the same on all of them and the
run matches a one-process run over the same devices. Config sections: `rl` (`AlgoConfig`),
`rl_optim`, `rl_sampling` (`RolloutConfig`), `rl_loop` (`RLLoopConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from rlhfjax import rl
from rlhfjax.config import to_dataclass
from rlhfjax.data import DataIterator
from rlhfjax.models.heads import PolicyModel, PolicyValueModel, ValueModel
from rlhfjax.models.transformer import TransformerConfig
from rlhfjax.parallel import shard_batch
from rlhfjax.parallel.distributed import local_rows, process_mean, process_rows
from rlhfjax.sampling import Rollout, SamplingConfig, generate
from rlhfjax.train.rl import (AlgoConfig, RLModels, RLOptimConfig, init_rl_state, make_experience_fns,
                              make_rl_update, pack_rollout, rl_state_shardings)
from rlhfjax.train.stage import Run, Stage, StopRun, register_stage, stage_params

log = logging.getLogger("rlhfjax")

UPDATE_VARIANTS = ("jit", "shard_map")
NAN_REWARD_POLICIES = ("zero", "mask", "raise")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """The sampler during RL (`config.rl_sampling`); log-probs use the same temperature."""

  temperature: float = 1.0  # sampling temperature
  top_k: int = 0  # keep the k most likely tokens (0 = off)
  top_p: float = 1.0  # nucleus sampling (1 = off)
  max_new_tokens: int = 0  # response budget; 0 = config.data.max_response_len
  # The sampler's compute (and KV-cache) dtype for a built-in policy: "" = the policy's own;
  # "bfloat16" halves the cache and the decode's weight reads on accelerators (pair with rl.tis_cap)
  dtype: str = ""


def sampler_model(policy, dtype: str):
  """`policy` computing in `dtype` ("" = as it is): a built-in module with its config's `dtype` set."""
  if not dtype:
    return policy
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"rl_sampling.dtype must be '', 'float32' or 'bfloat16', got {dtype!r}")
  cfg = getattr(policy, "cfg", None)
  if not isinstance(cfg, TransformerConfig):
    raise ValueError(f"rl_sampling.dtype needs a built-in policy (a TransformerConfig `cfg`); got "
                     f"{type(policy).__name__}")
  return policy.clone(cfg=dataclasses.replace(cfg, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class RLLoopConfig:
  """The RL loop (`config.rl_loop`)."""

  iterations: int = 60  # sample -> update rounds
  prompts_per_iter: int = 16  # distinct prompts per iteration (x rl.group_size responses)
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
  # Failing rewards are loud: a console line when completions go unscored, and the run stops when
  # more than `max_unscored_share` of them are, `max_unscored_iters` iterations in a row (0 = never).
  max_unscored_share: float = 0.5
  max_unscored_iters: int = 3
  # An update with a non-finite loss or gradients is skipped (state unchanged) and logged; the run
  # stops after `max_skipped_iters` iterations in a row with a skipped update (0 = never).
  max_skipped_iters: int = 3
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


def rollout_stats(texts: list[str], answers: list | None = None) -> dict:
  """Thinking / format metrics of sampled completions (`rewards.thinking_stats`), prefixed; with
  gold `answers`, the verifier's accuracy of the completions that think and of those that don't."""
  from rlhfjax.rewards import thinking_stats
  return {f"think_{k}": v for k, v in thinking_stats(texts, answers=answers).items()}


def builtin_models(model_cfg, algo: AlgoConfig) -> RLModels:
  """The built-in transformer's modules for `algo` (the policy; PPO's critic or actor-critic)."""
  return RLModels(policy=PolicyModel(model_cfg),
                  critic=ValueModel(model_cfg) if algo.separate_critic else None,
                  actor_critic=PolicyValueModel(model_cfg) if algo.shared_trunk else None)


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
  from rlhfjax.rewards import math_reward
  from rlhfjax.rewards.verify import verify
  exs = eval_examples(run, loop.eval_examples)
  if exs and "tests" in exs[0] and "response" in exs[0]:  # code tasks: the teacher's solutions
    return {"teacher_accuracy": float(verify([e["response"] for e in exs], exs).mean())}
  if not exs or "demonstration" not in exs[0]:
    return {}
  correct = math_reward([e["demonstration"] for e in exs], [e["answer"] for e in exs])
  out = {"teacher_accuracy": teacher_accuracy(exs)}
  by_class = flaw_class_accuracy(exs, correct, run.config.data.get("flaw", "none"))
  out.update({k.replace("accuracy_greedy", "teacher_accuracy"): v for k, v in by_class.items()
              if k != "flaw_class_fraction"})
  return out


def evaluate_rl(run: Run, model, params, loop: RLLoopConfig, sampling: RolloutConfig,
                rng) -> tuple[dict, list]:
  """Greedy accuracy, and pass@k / maj@k over `eval_samples` samples per problem, of the policy
  `model` with `params`; the samples' thinking metrics (`sampled_think_*`: the share that thinks,
  the accuracy of thinking and of direct answers). The sample rows are every held-out completion,
  greedy and sampled (`mode`, `sample`), with its gold answer and correctness."""
  from rlhfjax.rewards import answers_match, extract_answer
  from rlhfjax.rewards.verify import verify
  from rlhfjax.sampling.completions import generate_completions
  if loop.eval_examples <= 0:
    return {}, []
  d = run.config.data
  exs = eval_examples(run, loop.eval_examples)
  qs, golds = [e["prompt"] for e in exs], [e.get("answer") for e in exs]
  kw = dict(max_prompt_len=d.max_prompt_len,
            max_new_tokens=sampling.max_new_tokens or d.max_response_len,
            batch_size=run.config.eval.batch_size, rng=rng)
  greedy = generate_completions(params, model, run.tokenizer, qs, greedy=True, **kw)
  correct_greedy = verify(greedy, exs)
  out = {"accuracy_greedy": float(np.mean(correct_greedy))}
  out.update(flaw_class_accuracy(exs, correct_greedy, run.config.data.get("flaw", "none")))
  out.update({f"greedy_{k}": v for k, v in rollout_stats(greedy).items()
              if k in ("think_frac_well_formed", "think_mean_thinking_words")})
  samples = [dict(prompt=q, completion=t, answer=a, correct=bool(c), mode="greedy")
             for q, t, a, c in zip(qs, greedy, golds, correct_greedy)]
  k = loop.eval_samples
  if k > 0:
    sampled = generate_completions(params, model, run.tokenizer, [q for q in qs for _ in range(k)],
                                   temperature=sampling.temperature, **kw)
    correct = verify(sampled, [e for e in exs for _ in range(k)]).reshape(len(qs), k)
    out["accuracy_sampled"] = float(correct.mean())
    out[f"pass@{k}"] = float(np.mean(rl.pass_at_k(np.full(len(qs), k), correct.sum(1), k)))
    out.update({f"sampled_{n}": v for n, v in rollout_stats(
        sampled, None if golds[0] is None else [a for a in golds for _ in range(k)]).items()})
    samples += [dict(prompt=qs[i], completion=sampled[i * k + j], answer=golds[i],
                     correct=bool(correct[i, j]), mode="sampled", sample=j)
                for i in range(len(qs)) for j in range(k)]
  if k > 0 and golds[0] is not None:
    answers = [[extract_answer(sampled[i * k + j]) for j in range(k)] for i in range(len(qs))]
    out[f"maj@{k}"] = float(np.mean(rl.maj_at_k(answers, golds, k, match=answers_match)))
  return out, samples


def rl_configs(config) -> tuple[AlgoConfig, RLOptimConfig, RolloutConfig, RLLoopConfig]:
  """The four RL sections of an experiment config as frozen dataclasses, cross-checked."""
  algo = to_dataclass(AlgoConfig, config.rl)
  optim = to_dataclass(RLOptimConfig, config.rl_optim)
  sampling = to_dataclass(RolloutConfig, config.rl_sampling)
  loop = to_dataclass(RLLoopConfig, config.rl_loop)
  batch = loop.prompts_per_iter * algo.group_size
  if batch % algo.minibatch_size:
    raise ValueError(f"rollout batch {batch} (rl_loop.prompts_per_iter x rl.group_size) is not a "
                     f"multiple of rl.minibatch_size={algo.minibatch_size}")
  if algo.packs and (algo.minibatch_size != batch or loop.update_variant != "jit"):
    raise ValueError(f"rl.{'pack' if algo.pack else 'share_prompt'} needs one minibatch per step (rl.minibatch_size={algo.minibatch_size}, "
                     f"rollout batch {batch}) and rl_loop.update_variant='jit' "
                     f"(got {loop.update_variant!r})")
  if algo.sampler_logprobs and sampling.dtype:
    log.warning("rl.sampler_logprobs with rl_sampling.dtype=%r: the old log-probs are the %s "
                "sampler's, not the policy's; the update's ratios carry the mismatch (rl.tis_cap "
                "corrects it, with rl.sampler_logprobs=False)", sampling.dtype, sampling.dtype)
  return algo, optim, sampling, loop


@register_stage("rl")
class RLStage(Stage):
  """RL on the SFT policy against verifiers; subclasses change the scorer, critic init and eval."""

  finite_keys = ()  # a non-finite update is skipped inside `rl_update` (`check` counts them)
  rate_name = "tokens_per_s"  # sampled response tokens
  progress_keys = ("reward_mean", "policy_loss", "kl_seq_mean", "tokens_per_s")

  @classmethod
  def check_config(cls, config):
    from rlhfjax.rewards.scorers import verifier_scorer
    verifier_scorer(config.rl_reward, rl_configs(config)[3].nan_reward)  # a reward typo fails here

  def __init__(self, run: Run):
    super().__init__(run)
    self.algo, self.optim, self.sampling, self.loop = rl_configs(run.config)
    loop = self.loop
    self.total_steps, self.log_every, self.eval_every = loop.iterations, loop.log_every, loop.eval_every
    self.checkpoint_every, self.keep_checkpoints = loop.checkpoint_every, loop.keep_checkpoints
    self.models = self.make_models()
    self.policy_tx, self.value_tx = self.optim.optimizers(loop.iterations * self.algo.epochs)
    # the global batch on every process (each takes its block): the same rows as with one process
    self.data = DataIterator(run.train_examples, loop.prompts_per_iter, seed=run.seed + 17,
                             collate=None, process_index=0, process_count=1)
    self.rng = jax.random.key(run.seed + 3)
    self.eval_rng = jax.random.key(run.seed + 4)
    self.kl_history: list = []  # KL(policy || reference) per iteration, nats per sequence
    self.streaks = {"unscored": 0, "skipped": 0, "warned": 0}  # iterations in a row (`check`)

  # -- hooks for subclasses
  def make_models(self) -> RLModels:
    return builtin_models(self.run.model_cfg, self.algo)

  def make_scorer(self):
    from rlhfjax.rewards.scorers import verifier_scorer
    return verifier_scorer(self.run.config.rl_reward, self.loop.nan_reward)

  def value_init(self):
    """Parameters whose `trunk` starts PPO's separate critic (None: fresh)."""
    return self.policy_init

  # -- the stage
  def prepare(self):
    self.policy_init = stage_params(self.run, "sft")
    self.scorer = self.make_scorer()

  def state_spec(self):
    return rl_state_shardings(self.models, self.algo, self.policy_tx, self.value_tx, self.run.mesh,
                              self.run.rules)

  def init_state(self):
    return init_rl_state(self.models, self.algo, self.policy_tx, self.value_tx, self.run.mesh,
                         self.run.rules, self.rng, self.policy_init,
                         self.value_init() if self.algo.separate_critic else None)

  def start(self, state):
    run, algo, s = self.run, self.algo, self.sampling
    _, shardings = self.state_spec()
    # the reference is a plain policy tree (no value head, even when the trainee shares its trunk)
    self.ref_params = jax.device_put(self.policy_init, {k: v for k, v in shardings.policy.params.items()
                                                        if k in self.policy_init})
    self.sampler = SamplingConfig(model=sampler_model(self.models.policy, s.dtype),
                                  max_new_tokens=s.max_new_tokens or run.config.data.max_response_len,
                                  eos_id=run.tokenizer.eos_id, pad_id=run.tokenizer.pad_id,
                                  temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                  layout=(run.mesh, run.rules),  # activations batch-split
                                  prompt_group=algo.group_size)  # one prefill per prompt
    self.forwards_fn, self.experience_fn = make_experience_fns(algo, self.models, run.mesh, run.rules,
                                                               temperature=s.temperature)
    if self.loop.update_variant == "shard_map":
      from rlhfjax.train.rl_shard_map import make_rl_update_shard_map as make_update
    else:
      make_update = make_rl_update
    self.update_fn = make_update(algo, self.models, self.policy_tx, self.value_tx, shardings, run.mesh,
                                 run.rules, temperature=s.temperature)

  def host_state(self):
    self.kl_history = [float(x) for x in jax.device_get(self.kl_history)]
    return {"data": self.data.get_state(), "kl_seq": self.kl_history}

  def set_host_state(self, host_state):
    self.data.set_state(host_state["data"])
    self.kl_history = list(host_state["kl_seq"])

  def params_of(self, state):
    return state.policy.params

  def step(self, state, it):
    run, g = self.run, self.algo.group_size
    t0 = time.perf_counter()
    examples = process_rows(next(self.data))
    group = [e for e in examples for _ in range(g)]  # contiguous groups per prompt
    ids, mask = run.tokenizer.encode_prompts([e["prompt"] for e in group],
                                             run.config.data.max_prompt_len)
    ids, mask = shard_batch((ids, mask), run.mesh, run.rules)
    it_rng = jax.random.fold_in(self.rng, it)
    out = generate(state.policy.params, ids, mask, it_rng, self.sampler)
    tokens_host, mask_host = local_rows(out.tokens), local_rows(out.mask)
    t_sample = time.perf_counter()
    rollout = Rollout.from_sample(ids, mask, out)
    value_params = state.value.params if self.algo.separate_critic else None
    # later forwards skip the responses' padding: trimmed, or packed with rl.pack
    packed = pack_rollout(rollout, self.algo, run.mesh, run.rules)
    # the experience's forwards need no scores: dispatched now, they run while the host scores
    forwards = self.forwards_fn(state.policy.params, self.ref_params, value_params, packed)
    texts = run.tokenizer.decode_batch(tokens_host, mask_host)
    scores, score_metrics = self.scorer(texts, group, rollout)
    scores = local_rows(scores) if isinstance(scores, jax.Array) else np.asarray(scores, np.float32)
    score_metrics["unscored_share"] = max([float(np.isnan(scores).mean())] + [
        v / len(texts) for k, v in score_metrics.items() if k.startswith("reward_nan_")])
    if self.loop.nan_reward == "mask":
      scores, valid = mask_unscored(scores, g)
      score_metrics["scored_fraction"] = float(valid.mean())
      valid = shard_batch(valid.astype(mask_host.dtype), run.mesh, run.rules)
      # the unscored rows leave the experience (on every process alike); the packing and the
      # trimmed width were made before the scores, so their tokens still ride in the forwards
      packed = packed.replace(response_mask=packed.response_mask * valid[:, None])
    elif np.isnan(scores).any():  # a custom scorer broke the contract for "zero"
      scores = np.nan_to_num(scores, nan=0.0)
    score_metrics.update(rollout_stats(texts, [e.get("answer") for e in group]),
                         reward_mean=float(np.mean(scores)))
    score_metrics = process_mean(score_metrics, sum_prefixes=("reward_nan_",))
    t_score = time.perf_counter()
    exp, exp_metrics = self.experience_fn(forwards, packed, shard_batch(scores, run.mesh, run.rules),
                                          state.kl.value)
    state, upd_metrics = self.update_fn(state, exp, jax.random.fold_in(it_rng, 1))
    metrics = {**exp_metrics, **upd_metrics}
    if it % self.log_every == 0:  # time the update on logged iterations only: no sync in between
      jax.block_until_ready(metrics)
    self.kl_history.append(metrics["kl_seq_mean"])  # a device scalar until a checkpoint reads it
    metrics.update(score_metrics)
    metrics.update(time_sample_s=t_sample - t0, time_score_s=t_score - t_sample,
                   time_update_s=time.perf_counter() - t_score)
    if it % self.log_every == 0:
      run.writer.write_samples(self.name, it, [dict(prompt=group[0]["prompt"], completion=texts[0],
                                                    score=float(scores[0]))])
    return state, metrics, float(mask_host.sum())

  def check(self, step, m):
    loop, streaks = self.loop, self.streaks
    unscored, skipped = m.get("unscored_share", 0.0), m.get("update_skipped", 0.0)
    streaks["unscored"] = streaks["unscored"] + 1 if unscored > loop.max_unscored_share else 0
    streaks["skipped"] = streaks["skipped"] + 1 if skipped > 0 else 0
    if unscored > 0 and (streaks["unscored"] or not streaks.get("warned")):
      names = [k[len("reward_nan_"):] for k, v in m.items() if k.startswith("reward_nan_") and v]
      log.warning("%s: iteration %d: %.0f%% of the completions could not be scored (NaN%s; "
                  "rl_loop.nan_reward=%s)", self.name, step, 100 * unscored,
                  f" from {', '.join(names)}" if names else "", loop.nan_reward)
      streaks["warned"] = True
    if skipped:
      log.warning("%s: iteration %d: %.0f%% of the optimizer steps skipped (non-finite loss or "
                  "gradients; parameters left as they were)", self.name, step, 100 * skipped)
    if loop.max_unscored_iters and streaks["unscored"] >= loop.max_unscored_iters:
      raise StopRun(f"{self.name}: more than {loop.max_unscored_share:.0%} of the completions "
                    f"unscored (NaN) for {streaks['unscored']} iterations in a row; the reward "
                    f"cannot score them: check config.rl_reward (rl_loop.max_unscored_iters=0 "
                    "to continue anyway)")
    if loop.max_skipped_iters and streaks["skipped"] >= loop.max_skipped_iters:
      raise StopRun(f"{self.name}: non-finite updates skipped for {streaks['skipped']} iterations "
                    "in a row; lower rl_optim.learning_rate or check the rewards' scale")

  def evaluate(self, state):
    return evaluate_rl(self.run, self.models.policy, state.policy.params, self.loop, self.sampling,
                       self.eval_rng)

  def initial_extras(self):
    return teacher_eval(self.run, self.loop)

  def result(self, state, result):
    result["iterations"] = self.loop.iterations
    result["algo"] = self.algo.algo
    return result
