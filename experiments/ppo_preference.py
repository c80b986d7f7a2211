"""RLHF end to end on the simulated human: SFT -> reward model from 5,000 noisy comparisons -> PPO.

Extends experiments/preference.py (SFT + simulated labels + reward model) with the `ppo` stage:
PPO from the SFT policy against the learned (normalized) reward model, a frozen SFT reference, the
critic initialized from the reward model's trunk, and the adaptive KL controller (Ziegler et al.
2019) holding KL(policy || reference) near `rl.kl_target`. The simulated human's gold score is
logged every iteration (`gold_reward_mean`) and on held-out prompts before/after (`gold_mean`),
never used for training.

    python -m rlhfjax.main --config=experiments/ppo_preference.py --workdir=/tmp/ppo_pref

Outputs: `plots/ppo_curves.png` (proxy, gold, KL), `results.json` (`ppo.before_gold_mean`,
`ppo.after_gold_mean`, `ppo.gold_gain_in_sft_std`), `samples.jsonl`, `report.md`.
"""

import ml_collections

try:
  from . import preference
except ImportError:  # loaded by path (config_flags): no package to be relative to
  from rlhfjax.config import import_sibling
  preference = import_sibling(__file__, "preference")


def ppo_stage_config() -> ml_collections.ConfigDict:
  p = ml_collections.ConfigDict()
  p.value_init = "rm"  # critic trunk from the reward model ("rm", lm-human-preferences) or "sft"
  p.gold_eval_prompts = 256  # held-out prompts for the gold / proxy eval (0 = off)
  p.samples_table = 16  # held-out rows (prompt, response, gold, proxy) in samples.jsonl
  p.rl_seed = 0  # re-seeds only the RL loop (prompt order, sampling, value head); 0 = config.seed
  p.eval_kl = False  # the held-out eval also logs KL(policy || SFT) of its samples (kl_seq_mean)
  # Early stopping on a gold-free signal: "" (off) | "rm_std" (RM-ensemble disagreement on the
  # rollout rising; needs rm.ensemble_size > 1) | "label_agreement" (the RM's agreement with fresh
  # labeler comparisons of policy vs SFT samples falling). Stop once `early_stop_patience` readings
  # in a row are past early_stop_factor x the mean of the first `early_stop_baseline` readings.
  p.early_stop = ""
  p.early_stop_factor = 2.0  # > 1 for rm_std (rises), in (0, 1) for label_agreement (falls)
  p.early_stop_baseline = 5  # readings averaged into the baseline
  p.early_stop_patience = 2  # readings in a row past the threshold before stopping
  p.early_stop_every = 1  # iterations between readings
  p.early_stop_labels = 32  # label_agreement: fresh comparisons asked per reading
  return p


def get_config():
  c = preference.get_config()
  c.unlock()
  c.stages = "sft,rm,ppo"  # SFT, simulated labels + reward model, then PPO against the RM
  # The SFT policy pads most answers the way its chatty teacher did (preference.py), so its samples
  # score well below the gold maximum and the gold std comes mostly from style, which the reward
  # model learns (README); PPO has a real preference to climb, at the usual temperature 1.0.
  r = c.rl
  r.algo = "ppo"  # PPO with a critic and GAE
  c.rl_loop.iterations = 60  # sample -> score -> update rounds
  c.rl_loop.prompts_per_iter = 64  # prompts per rollout batch
  r.group_size = 1  # one response per prompt (PPO needs no group baseline)
  r.epochs = 4  # PPO epochs over each batch (InstructGPT: 4)
  r.minibatch_size = 32  # responses per optimizer step -> 8 policy/critic steps per iteration
  c.rl_optim.learning_rate = 1e-4  # policy AdamW lr
  c.rl_optim.value_learning_rate = 1e-3  # critic AdamW lr
  c.rl_optim.warmup_steps = 8  # optimizer warmup steps
  r.lam = 0.95  # GAE lambda
  r.kl_coef = 0.1  # initial beta of the adaptive controller
  r.adaptive_kl = True  # Ziegler et al. 2019 proportional controller
  # The KL budget. Dropping the teacher's chatter is worth ~2 nats; past that the RM's remaining
  # preferences live where it cannot see (arithmetic) and gold falls while the proxy rises
  # (README: target 3 ends at +0.9 SFT std with greedy accuracy down to 88%, target 2 at +1.16).
  r.kl_target = 2.0  # target KL(policy || reference), nats per response
  r.kl_horizon = 640.0  # controller horizon in samples: beta moves up to 2% per iteration of 64
  c.rl_sampling.temperature = 1.0  # sampling temperature of rollouts and the gold eval (= the labeled samples)
  r.missing_eos_penalty = -1.0  # responses that never stop score 1 lower
  c.rl_loop.eval_every = 10  # held-out gold/proxy (+ accuracy) eval every N iterations
  c.rl_loop.eval_examples = 64  # held-out problems for the accuracy eval
  c.rl_loop.eval_samples = 0  # no pass@k sampling (the gold eval samples already)
  c.rl_loop.checkpoint_every = 10  # save every N iterations
  c.ppo = ppo_stage_config()
  c.lock()
  return c
