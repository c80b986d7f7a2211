"""Bring your own model end to end: a tiny random Qwen3 made by transformers, its own byte-level BPE
tokenizer and chat template -> 2 GRPO iterations on the shipped GSM8K-format JSONL with a user reward
given by import path -> `python -m rlhfjax.export` -> transformers loads the export and its logits are
the trained policy's. Bad input of each kind (reward, checkpoint, architecture, data) fails in one line
before any training."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
HF_GRPO = os.path.join(ROOT, "experiments", "hf_grpo.py")

QWEN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")

USER_REWARD = '''import numpy as np

def brevity(prompts, completions, **unused_fields):
  return np.array([-len(c) / 100.0 for c in completions], np.float32)
'''


def _make_checkpoint(path):
  """A byte-level BPE trained on the shipped file + a random tiny Qwen3, saved as transformers does."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from rlhfjax.data.files import sample_path
  texts = [json.loads(l)["question"] + " " + json.loads(l)["answer"] for l in open(sample_path())]
  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                             pad_token="<|endoftext|>")
  tok.chat_template = QWEN_TEMPLATE
  tok.save_pretrained(path)
  torch.manual_seed(0)
  cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
  transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
  return tok


def _overrides(model_dir, prompt_len):
  return [f"--config.model.hf_path={model_dir}", f"--config.data.max_prompt_len={prompt_len}",
          "--config.data.max_response_len=8", "--config.rl_loop.iterations=2",
          "--config.rl_loop.prompts_per_iter=2", "--config.rl.group_size=2", "--config.rl.minibatch_size=4",
          "--config.rl_loop.eval_examples=2", "--config.rl_loop.eval_samples=1", "--config.eval.batch_size=2",
          "--config.rl_loop.checkpoint_every=2", "--config.rl_optim.learning_rate=1e-2",
          "--config.rl_reward=math:1.0,myrewards:brevity:0.5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from rlhfjax.data.files import read_examples, sample_path
  from rlhfjax.hf_tokenizer import HFTokenizer
  path = tmp_path_factory.mktemp("qwen3")
  _make_checkpoint(str(path))
  examples, _ = read_examples(sample_path(), {"prompt": "question", "answer": "answer"})
  tok = HFTokenizer.load(str(path))
  prompt_len = max(len(tok.prompt_ids(e["prompt"])) for e in examples)
  return str(path), prompt_len


def test_qwen3_grpo_export_reloads_in_transformers(tmp_path, cli, checkpoint):
  model_dir, prompt_len = checkpoint
  rewards = tmp_path / "user"
  rewards.mkdir()
  (rewards / "myrewards.py").write_text(USER_REWARD)
  work, out = tmp_path / "run", tmp_path / "export"
  # the optional SFT on the file's worked answers first, then GRPO from its weights
  cmd, env = cli(HF_GRPO, work, *_overrides(model_dir, prompt_len), "--config.stages=sft,rl",
                 "--config.sft.steps=2", "--config.sft.batch_size=4", "--config.sft.warmup_steps=1",
                 "--config.sft.checkpoint_every=2")
  env["PYTHONPATH"] = f"{rewards}{os.pathsep}{env.get('PYTHONPATH', '')}"
  subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  assert [json.loads(l)["step"] for l in open(work / "metrics.jsonl") if json.loads(l)["stage"] == "sft"]
  res = json.load(open(work / "results.json"))["rl"]
  assert res["algo"] == "grpo" and res["iterations"] == 2
  rl = [json.loads(l) for l in open(work / "metrics.jsonl") if json.loads(l)["stage"] == "rl"]
  assert [r["step"] for r in rl] == [1, 2] and all(np.isfinite(r["reward_mean"]) for r in rl)
  assert all(r["reward_mean"] < 0 for r in rl)  # the brevity term (no answer is right at random init)

  subprocess.run([sys.executable, "-m", "rlhfjax.export", f"--workdir={work}", "--stage=rl", f"--out={out}"],
                 env=env, check=True, capture_output=True, cwd=ROOT, timeout=300)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = hf_tok.apply_chat_template([{"role": "user", "content": "What is 7 times 6?"}],
                                   add_generation_prompt=True, return_dict=True)["input_ids"]
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits.numpy()[0]

  # rlhfjax's trained policy, restored from the run's rl checkpoint the way a later stage would
  import jax.numpy as jnp
  import ml_collections
  from rlhfjax.models import PolicyModel
  from rlhfjax.train.pipeline import import_stages, setup_run
  from rlhfjax.train.stage import stage_params
  config = ml_collections.ConfigDict(json.load(open(work / "config.json")))
  import_stages()
  run = setup_run(config, str(work))
  params = stage_params(run, "rl")
  tokens = jnp.asarray([ids], jnp.int32)
  got = PolicyModel(run.model_cfg).apply({"params": params}, tokens, jnp.arange(len(ids))[None],
                                         jnp.ones_like(tokens))
  got = np.asarray(got[0] if isinstance(got, tuple) else got)[0]
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  # and the policy did move away from the checkpoint it started from
  base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
  with torch.no_grad():
    assert np.abs(base(torch.tensor([ids])).logits.numpy()[0] - ref).max() > 1e-4


def _config(model_dir, prompt_len, workdir, **changes):
  sys.path.insert(0, ROOT)
  from experiments import hf_grpo
  c = hf_grpo.get_config()
  c.model.hf_path = model_dir
  c.data.max_prompt_len = prompt_len
  c.data.max_response_len = 8
  for k, v in changes.items():
    section, _, key = k.rpartition(".")
    (c[section] if section else c)[key] = v
  return c


@pytest.mark.parametrize("kind", ["reward", "weights", "architecture", "data"])
def test_bad_input_is_one_line_before_training(tmp_path, checkpoint, kind):
  import shutil
  from rlhfjax.train.pipeline import train_and_evaluate
  model_dir, prompt_len = checkpoint
  changes, match = {}, None
  if kind == "reward":
    changes, match = {"rl_reward": "math:1.0,maht:0.5"}, "maht"
  elif kind in ("weights", "architecture"):
    broken = tmp_path / "ckpt"
    shutil.copytree(model_dir, broken)
    if kind == "weights":
      os.remove(broken / "model.safetensors")
      match = "safetensors"
    else:
      cfg = json.load(open(broken / "config.json"))
      cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
      json.dump(cfg, open(broken / "config.json", "w"))
      match = "GPT2LMHeadModel"
    changes = {"model.hf_path": str(broken)}
  else:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\nnot json\n')
    changes, match = {"data.train_path": str(data)}, "line 2"
  config = _config(model_dir, prompt_len, str(tmp_path / "w"), **changes)
  with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
    train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value)
  metrics = tmp_path / "w" / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()  # not one step logged
