"""A simulated human labeler for the arithmetic task: a hidden gold preference plus Bradley–Terry noise.

The gold preference is a person grading short math answers: right answers first, showing the work
is good, repeating or padding the answer is bad. For a response `y` to `x` with true answer `a`:

    gold(x, y, a) = 2.0 * correct       # the last "The answer is N." states N == a
                  + 0.5 * shows_work    # a <thinking> ... </thinking> scratchpad precedes that answer
                  - 1.0 * repeats       # sentences outside the scratchpad said again (each repeat)
                  - 0.1 * extra_words   # words outside the scratchpad beyond one "The answer is N."

(weights in `GoldPreference`). A reward model sees neither this function nor the answer.

A prompt's response pool is `policy_samples` SFT-policy samples plus `perturbations` variants of
them with one or two edits (`PERTURBATIONS`: `wrong_answer` changes the final answer, `repeat`
says it twice, `drop_thinking` removes the scratchpad, `filler` adds chatter, `no_answer` stops
before the answer; `wrong_answer` never with `drop_thinking`, so correctness stays checkable).

Labels follow Bradley–Terry at temperature τ, `P(A ≻ B) = σ((gold(A) − gold(B)) / τ)` (τ = 0:
noiseless); K-way rankings follow Plackett–Luce with the same utilities (the BT pair for K = 2).
One ranking costs K·(K−1)/2 comparisons of the label budget (as in InstructGPT). `gold_score`
and the `"gold_preference"` reward expose the gold function for evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from typing import Sequence

import numpy as np

from rlhfjax.data.arithmetic import FILLER
from rlhfjax.data.preferences import make_pair, make_ranking

log = logging.getLogger("rlhfjax")

THINK_OPEN, THINK_CLOSE = "<thinking>", "</thinking>"
ANSWER_RE = re.compile(r"The answer is (-?\d+)\.")  # a stated final answer
_QUESTION_RE = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_SENTENCE_RE = re.compile(r"[^.?!]+[.?!]?")

PERTURBATIONS = ("wrong_answer", "repeat", "drop_thinking", "filler", "no_answer")


@dataclasses.dataclass(frozen=True)
class GoldPreference:
  """Weights of the hidden gold preference (module docstring)."""

  correct: float = 2.0  # for stating the true answer last
  shows_work: float = 0.5  # for a scratchpad before the final answer
  repeat: float = -1.0  # per repeated sentence outside the scratchpad
  extra_word: float = -0.1  # per word outside the scratchpad beyond "The answer is N."


GOLD = GoldPreference()


@dataclasses.dataclass(frozen=True)
class LabelerConfig:
  """The simulated human's noise, budget and response pool (see the module docstring)."""

  temperature: float = 0.5  # Bradley–Terry noise τ: P(A≻B) = σ((g(A)−g(B))/τ); 0 = noiseless
  label_budget: int = 5000  # train comparisons; a K-way ranking costs K(K−1)/2
  test_comparisons: int = 1000  # held-out pairs (always pairs, so formats compare fairly)
  policy_samples: int = 2  # SFT-policy samples per prompt in the pool
  perturbations: int = 4  # programmatic variants per prompt in the pool
  sample_temperature: float = 1.0  # sampling temperature of the policy samples
  sample_batch_size: int = 256  # prompts per sampling call
  perturbation_kinds: str = ",".join(PERTURBATIONS)  # comma-separated edits the variants draw from

  def __post_init__(self):
    self.kinds()  # a bad perturbation list is an error at config time, not mid-labeling

  def kinds(self) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in self.perturbation_kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in PERTURBATIONS]
    if bad or (self.perturbations and not kinds):
      raise ValueError(f"labeler.perturbation_kinds: unknown {bad or 'empty'}; valid: {PERTURBATIONS}")
    return kinds


def split_response(response: str) -> tuple[str | None, str]:
  """(scratchpad text or None, the rest of the response with the scratchpad removed)."""
  i = response.find(THINK_OPEN)
  j = response.find(THINK_CLOSE, i + len(THINK_OPEN)) if i >= 0 else -1
  if i < 0 or j < 0:
    return None, response
  return response[i + len(THINK_OPEN):j], response[:i] + " " + response[j + len(THINK_CLOSE):]


def answer_from_prompt(prompt: str) -> str | None:
  """The true answer of an arithmetic question "What is a op b?" (None if it is not one)."""
  m = _QUESTION_RE.search(prompt)
  if not m:
    return None
  a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
  return str(a + b if op == "+" else a - b if op == "-" else a * b)


def gold_features(response: str, answer: str) -> dict:
  """The terms of the gold preference for one response (see the module docstring)."""
  work, rest = split_response(response)
  stated = ANSWER_RE.findall(response)
  last = stated[-1] if stated else None
  shows_work = work is not None and bool(work.strip()) and last is not None and \
      response.rfind(f"The answer is {last}.") > response.find(THINK_CLOSE)
  sentences = [s.strip() for s in _SENTENCE_RE.findall(rest) if s.strip()]
  repeats = len(sentences) - len(set(sentences))
  extra = max(0, len(rest.split()) - 4)
  return {"correct": float(last is not None and last == str(answer).strip()),
          "shows_work": float(shows_work), "repeats": float(repeats), "extra_words": float(extra)}


def gold_score(prompt: str, response: str, answer: str | None = None,
               weights: GoldPreference = GOLD) -> float:
  """The hidden gold utility of `response` to `prompt` (true answer parsed from the prompt if None)."""
  if answer is None or str(answer) == "":
    answer = answer_from_prompt(prompt)
  f = gold_features(response, "" if answer is None else answer)
  return (weights.correct * f["correct"] + weights.shows_work * f["shows_work"]
          + weights.repeat * f["repeats"] + weights.extra_word * f["extra_words"])


def gold_scores(prompts: Sequence[str], responses: Sequence[str],
                answers: Sequence[str | None] | None = None) -> np.ndarray:
  answers = answers if answers is not None else [None] * len(responses)
  return np.asarray([gold_score(p, r, a) for p, r, a in zip(prompts, responses, answers)], np.float32)


def gold_preference_reward(prompts: Sequence[str], completions: Sequence[str],
                           answer: Sequence[str | None] | None = None, **unused_fields) -> np.ndarray:
  """Reward-function contract: the gold utility per completion (the "true human" for RL)."""
  del unused_fields
  return gold_scores(prompts, completions, answer)


# -- The response pool


def perturb(response: str, kind: str, rng: random.Random) -> str:
  """One programmatic edit of a response (`PERTURBATIONS`)."""
  stated = ANSWER_RE.findall(response)
  if kind == "wrong_answer":
    if not stated:
      return response
    n = int(stated[-1])
    delta = rng.choice([1, -1, 10, -10, rng.randint(2, 30), -rng.randint(2, 30)])
    k = response.rfind(f"The answer is {stated[-1]}.")
    return response[:k] + f"The answer is {n + delta}." + response[k + len(f"The answer is {stated[-1]}."):]
  if kind == "repeat":
    last = f"The answer is {stated[-1]}." if stated else response.strip().split(".")[0] + "."
    return response.rstrip() + (" " + last) * rng.randint(1, 2)
  if kind == "drop_thinking":
    work, rest = split_response(response)
    return " ".join(rest.split()) if work is not None and rest.strip() else response
  if kind == "filler":
    words = rng.sample(FILLER, rng.randint(1, 3))
    work, _ = split_response(response)
    k = response.find(THINK_CLOSE) + len(THINK_CLOSE) if work is not None else 0
    before = [w for w in words if rng.random() < 0.5]
    after = [w for w in words if w not in before]
    head, tail = response[:k], response[k:].strip()
    parts = [head.strip()] + before + [tail] + after
    return " ".join(p for p in parts if p)
  if kind == "no_answer":  # stops without stating the answer (e.g. cut off after the scratchpad)
    work, _ = split_response(response)
    k = response.find(THINK_CLOSE) + len(THINK_CLOSE) if work is not None else 0
    tail = ANSWER_RE.sub("", response[k:])
    return " ".join((response[:k] + " " + tail).split())
  raise ValueError(f"unknown perturbation {kind!r}; valid: {PERTURBATIONS}")


def perturbed_variant(base: str, rng: random.Random,
                      allowed: Sequence[str] = PERTURBATIONS) -> str:
  """`base` with one or two distinct edits drawn from `allowed`."""
  kinds = rng.sample(list(allowed), rng.randint(1, min(2, len(allowed))))
  if "wrong_answer" in kinds and "drop_thinking" in kinds:
    kinds.remove("drop_thinking")
  if "no_answer" in kinds:  # alone, or after filler: there is no answer left to repeat or change
    kinds = [k for k in kinds if k == "filler"] + ["no_answer"]
  out = base
  for k in kinds:
    out = perturb(out, k, rng)
  return out


def response_pool(samples: Sequence[str], n_perturbed: int, rng: random.Random,
                  kinds: Sequence[str] = PERTURBATIONS) -> list[str]:
  """Distinct responses: the policy samples plus `n_perturbed` variants of them (edits from `kinds`)."""
  pool = list(dict.fromkeys(s for s in samples if s.strip()))
  bases = list(pool) or ["The answer is 0."]
  for _ in range(n_perturbed):
    pool.append(perturbed_variant(rng.choice(bases), rng, kinds))
  return list(dict.fromkeys(p for p in pool if p.strip()))


# -- Labels


def bt_prefers_first(g_a: float, g_b: float, temperature: float, rng: np.random.Generator) -> bool:
  """One noisy Bradley–Terry judgement: True with probability σ((g_a − g_b)/τ)."""
  if temperature <= 0:
    return g_a > g_b or (g_a == g_b and rng.random() < 0.5)
  p = 1.0 / (1.0 + np.exp(-(g_a - g_b) / temperature))
  return bool(rng.random() < p)


def plackett_luce_order(gold: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
  """Indices best to worst from Plackett–Luce with utilities gold/τ: sorting `gold/τ + Gumbel`
  samples it exactly (Gumbel-max trick)."""
  gold = np.asarray(gold, np.float64)
  if temperature <= 0:
    keys = gold + 1e-9 * rng.random(gold.shape)  # ties broken at random
  else:
    keys = gold / temperature + rng.gumbel(size=gold.shape)
  return np.argsort(-keys, kind="stable")


def label_pools(prompts: Sequence[str], answers: Sequence[str], pools: Sequence[Sequence[str]], *,
                kind: str, k: int, temperature: float, seed: int,
                n_records: int | None = None) -> list[dict]:
  """One pair (kind="pairs") or one K-way ranking per prompt from its pool, noisily labeled.

  Prompts whose pool has fewer than 2 (or K) distinct responses are skipped; stops after
  `n_records` records (None = one per usable prompt).
  """
  rng = np.random.default_rng(seed)
  out = []
  for prompt, answer, pool in zip(prompts, answers, pools):
    if n_records is not None and len(out) >= n_records:
      break
    want = 2 if kind == "pairs" else k
    if len(pool) < want:
      continue
    idx = rng.choice(len(pool), size=want, replace=False)
    cand = [pool[i] for i in idx]
    g = np.asarray([gold_score(prompt, c, answer) for c in cand])
    if kind == "pairs":
      a, b = (0, 1) if bt_prefers_first(g[0], g[1], temperature, rng) else (1, 0)
      out.append(make_pair(prompt, cand[a], cand[b], answer=answer))
    else:
      order = plackett_luce_order(g, temperature, rng)
      out.append(make_ranking(prompt, [cand[i] for i in order], answer=answer))
  return out


def sample_policy(params, model_cfg, tokenizer, prompts: Sequence[str], *, n: int, max_prompt_len: int,
                  max_new_tokens: int, temperature: float, batch_size: int, rng) -> list[list[str]]:
  """`n` policy samples per prompt: [len(prompts)][n] decoded responses."""
  import jax
  from rlhfjax.sampling.completions import generate_completions
  flat = [p for p in prompts for _ in range(n)]
  texts = generate_completions(params, model_cfg, tokenizer, flat, max_prompt_len=max_prompt_len,
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               rng=jax.random.fold_in(rng, 0), temperature=temperature)
  return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def simulate_labels(params, model_cfg, tokenizer, examples: Sequence[dict], *, n_records: int,
                    kind: str, k: int, config: LabelerConfig, max_prompt_len: int,
                    max_response_len: int, seed: int) -> list[dict]:
  """The offline "human evaluation": up to `n_records` pairs or `k`-rankings (`kind`), each with its
  gold `answer`, on prompts drawn (with replacement) from `examples` and responses of the SFT policy
  `params` and their variants. Responses over `max_response_len` are dropped from the pool (no
  labels on truncated text). A pure function of `seed`."""
  import jax
  rng = random.Random(f"rlhfjax-labeler/{seed}")
  # a few spare prompts: those whose pool is too small (too few distinct responses that fit) are skipped
  picks = [examples[rng.randrange(len(examples))] for _ in range(n_records + n_records // 10 + 8)]
  prompts = [e["prompt"] for e in picks]
  answers = [str(e["answer"]) for e in picks]
  samples = sample_policy(params, model_cfg, tokenizer, prompts, n=config.policy_samples,
                          max_prompt_len=max_prompt_len, max_new_tokens=max_response_len,
                          temperature=config.sample_temperature, batch_size=config.sample_batch_size,
                          rng=jax.random.key(seed))
  fits = lambda r: len(tokenizer.encode(r)) + 1 <= max_response_len  # noqa: E731
  kinds = config.kinds()
  pools = [[r for r in response_pool(s, config.perturbations, rng, kinds) if fits(r)] for s in samples]
  out = label_pools(prompts, answers, pools, kind=kind, k=k, temperature=config.temperature,
                    seed=seed, n_records=n_records)
  if len(out) < n_records:
    log.warning("labeler: only %d of %d %s could be formed (pools too small)", len(out), n_records, kind)
  return out
