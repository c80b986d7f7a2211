"""The summaries `rlhfjax.main` prints: every stage's key figures appear, formatted from the results."""

from rlhfjax import summary

RM = {"format": "pairs", "train_records": 5000, "steps": 313, "before_accuracy": 0.445,
      "after_accuracy": 0.81, "before_gold_accuracy": 0.42, "after_gold_accuracy": 0.9214,
      "after_labeler_gold_agreement": 0.8633, "after_gold_pairs_style": 714,
      "before_gold_accuracy_style": 0.2857, "after_gold_accuracy_style": 0.944,
      "after_gold_pairs_correctness": 85, "after_gold_accuracy_correctness": 0.6588}
PPO = {"iterations": 60, "before_gold_mean": 1.175, "after_gold_mean": 2.3016,
       "before_proxy_mean": 0.0725, "after_proxy_mean": 1.5422, "gold_gain_in_sft_std": 1.157,
       "kl_seq_mean": 2.1146, "kl_target": 2.0}


def test_rm_summary_reports_gold_agreement_and_its_split():
  text = "\n".join(summary.summarize_rm(RM))
  assert "5000 pairs" in text and "313 steps" in text
  assert "92.1%" in text and "81.0%" in text and "86.3%" in text
  assert "(714)" in text and "94.4%" in text and "(85)" in text and "65.9%" in text
  assert "answer given vs not" not in text  # a split with no pairs is left out


def test_ppo_summary_reports_gold_gain_and_kl():
  text = "\n".join(summary.summarize_ppo(PPO))
  assert "2.3016" in text and "1.1750" in text and "1.5422" in text
  assert "+1.16 SFT standard deviations" in text and "2.11 nats (target 2.0)" in text


def test_summary_names_the_preference_task_and_every_stage():
  out = summary.summary({"rm": RM, "ppo": PPO}, "/tmp/w", 60.0)
  assert "simulated human" in out and "Reward model" in out and "PPO against the reward model" in out
  assert set(summary.STAGES) == {"sft", "rm", "rl", "ppo"}
