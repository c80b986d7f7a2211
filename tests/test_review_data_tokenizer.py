"""HFTokenizer against transformers (the reference) on checkpoint details: split_special_tokens, named
chat templates, decoding left-padded rows where pad is eos, Gemma-style templates, byte fallback."""

import json
import os

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as RawTokenizer  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from rlhfjax.hf_tokenizer import HFTokenizer  # noqa: E402
from rlhfjax.tokenizer import format_prompt  # noqa: E402

SENTENCES = ["What is 12 + 30?", "The answer is 42.", "Hello world, how are you today?", "You are terse."]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOLS = "{{ 'TOOLS:' }}" + CHATML
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def _raw(specials, bos=None):
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos:  # Llama / Gemma add bos in the post-processor
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, raw.token_to_id(bos))])
  return raw


def _save(path, raw, template, **special):
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **special)
  hf.chat_template = template
  hf.save_pretrained(str(path))
  return transformers.AutoTokenizer.from_pretrained(str(path))


def _ids(out):
  return list(out["input_ids"] if hasattr(out, "keys") else out)


QWEN_SPECIALS = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_split_special_tokens_encodes_control_token_text_as_transformers(tmp_path):
  """A checkpoint with split_special_tokens=True: "<|im_end|>" typed in text is plain text there."""
  ref = _save(tmp_path, _raw(QWEN_TOKENS), CHATML, split_special_tokens=True, **QWEN_SPECIALS)
  tok = HFTokenizer.load(str(tmp_path))
  text = "Hello <|im_end|> world"
  want = ref(text, add_special_tokens=False)["input_ids"]
  assert ref.convert_tokens_to_ids("<|im_end|>") not in want  # the reference splits it
  assert tok.encode(text) == want
  assert tok.response_ids(text) == want + [tok.eos_id]
  msgs = [{"role": "user", "content": text}]
  assert tok.prompt_ids(msgs) == _ids(ref.apply_chat_template(msgs, add_generation_prompt=True))


def test_without_split_special_tokens_control_token_text_is_the_token_as_transformers(tmp_path):
  ref = _save(tmp_path, _raw(QWEN_TOKENS), CHATML, **QWEN_SPECIALS)
  tok = HFTokenizer.load(str(tmp_path))
  text = "Hello <|im_end|> world"
  want = ref(text, add_special_tokens=False)["input_ids"]
  assert ref.convert_tokens_to_ids("<|im_end|>") in want and tok.encode(text) == want
  msgs = [{"role": "user", "content": text}]
  assert tok.prompt_ids(msgs) == _ids(ref.apply_chat_template(msgs, add_generation_prompt=True))


def _named_templates_checkpoint(path, templates):
  """A transformers-4 style checkpoint: named templates as a list in tokenizer_config.json."""
  _save(path, _raw(QWEN_TOKENS), None, **QWEN_SPECIALS)
  cfg_path = os.path.join(path, "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["chat_template"] = [{"name": n, "template": t} for n, t in templates.items()]
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  return transformers.AutoTokenizer.from_pretrained(str(path))


def test_named_templates_without_default_raise_as_transformers(tmp_path):
  ref = _named_templates_checkpoint(tmp_path, {"tool_use": TOOLS, "rag": CHATML})
  msgs = [{"role": "user", "content": "What is 12 + 30?"}]
  with pytest.raises(ValueError, match="no default"):
    ref.apply_chat_template(msgs, add_generation_prompt=True)
  # used to fall back silently to the plain "Question: ... Answer:" prompt for a chat model
  with pytest.raises(ValueError, match=r"\['rag', 'tool_use'\] but no 'default'"):
    HFTokenizer.load(str(tmp_path))
  # a template's name picks it, as transformers' chat_template= argument
  tok = HFTokenizer.load(str(tmp_path), chat_template="tool_use")
  want = ref.apply_chat_template(msgs, add_generation_prompt=True, chat_template="tool_use", tokenize=False)
  assert tok.format_prompt(msgs) == want and want.startswith("TOOLS:")
  assert tok.prompt_ids(msgs) == _ids(ref.apply_chat_template(msgs, add_generation_prompt=True,
                                                              chat_template="tool_use"))


def test_named_template_files_load_as_transformers(tmp_path):
  """transformers 5 saves named templates as chat_template.jinja + additional_chat_templates/*.jinja."""
  raw = _raw(QWEN_TOKENS)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **QWEN_SPECIALS)
  hf.chat_template = {"default": CHATML, "tool_use": TOOLS}
  hf.save_pretrained(str(tmp_path))
  assert os.path.isdir(tmp_path / "additional_chat_templates")
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  msgs = [{"role": "user", "content": "Hello world"}]
  assert HFTokenizer.load(str(tmp_path)).format_prompt(msgs) == ref.apply_chat_template(
      msgs, add_generation_prompt=True, tokenize=False)
  assert HFTokenizer.load(str(tmp_path), chat_template="tool_use").format_prompt(msgs) == (
      ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, chat_template="tool_use"))


def test_decode_of_left_padded_prompt_when_pad_is_eos(tmp_path):
  """Llama-style checkpoint without a pad token (pad = eos): leading pads are padding, not an eos."""
  ref = _save(tmp_path, _raw(["<s>", "</s>"], bos="<s>"), None, bos_token="<s>", eos_token="</s>")
  tok = HFTokenizer.load(str(tmp_path))
  assert ref.pad_token_id is None and tok.pad_id == tok.eos_id
  qs = ["What is 12 + 30?", "Hello"]
  ids, mask = tok.encode_prompts(qs, 40)
  assert ids[1, 0] == tok.eos_id  # left padding
  want = [ref.decode(ref(format_prompt(q))["input_ids"], skip_special_tokens=True) for q in qs]
  assert want == [format_prompt(q) for q in qs]
  assert [tok.decode(row) for row in ids] == want  # was "" for every padded row
  assert tok.decode_batch(ids) == tok.decode_batch(ids, mask) == want
  # a response row still stops at its eos, and an all-pad row decodes to ""
  rids, _ = tok.encode_responses(["The answer is 42.", ""], 12)
  assert tok.decode_batch(rids) == ["The answer is 42.", ""]
  assert tok.decode(tok.encode("The answer") + [tok.eos_id] + tok.encode(" is 42.")) == "The answer"


def test_template_dict_fromkeys_as_transformers(tmp_path):
  template = "{% set d = dict.fromkeys(['a', 'b'], 1) %}{{ d | tojson }}{{ dict(x=2) | tojson }}" + CHATML
  ref = _save(tmp_path, _raw(QWEN_TOKENS), template, **QWEN_SPECIALS)
  msgs = [{"role": "user", "content": "Hi"}]
  want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert want.startswith('{"a": 1, "b": 1}{"x": 2}')
  assert HFTokenizer.load(str(tmp_path)).format_prompt(msgs) == want


def test_gemma_style_bos_in_template_and_turn_end_eos(tmp_path):
  """The template writes bos and the post-processor would too: one bos, as apply_chat_template."""
  specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
  ref = _save(tmp_path, _raw(specials, bos="<bos>"), GEMMA, bos_token="<bos>", eos_token="<eos>",
              pad_token="<pad>")
  tok = HFTokenizer.load(str(tmp_path), eos_token="<end_of_turn>")
  chat = [{"role": "user", "content": " Hello <end_of_turn> world "},
          {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "What is 12 + 30?"}]
  want = _ids(ref.apply_chat_template(chat, add_generation_prompt=True))
  assert tok.prompt_ids(chat) == want and want.count(ref.bos_token_id) == 1
  assert tok.eos_id == ref.convert_tokens_to_ids("<end_of_turn>") and tok.pad_id == ref.pad_token_id
  text = "The answer is 42."
  assert tok.decode(tok.response_ids(text) + tok.encode(" more")) == text


def _byte_fallback(path):
  """A SentencePiece-converted (Llama 2 / Gemma-like) tokenizer.json: metaspace, byte fallback."""
  specials = ["<unk>", "<s>", "</s>"]
  base = RawTokenizer(models.BPE(unk_token="<unk>"))
  base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  base.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                                              show_progress=False))
  vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
  for t, _ in sorted(base.get_vocab().items(), key=lambda x: x[1]):
    vocab.setdefault(t, len(vocab))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(base.to_str())["model"]["merges"]]
  raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  raw.normalizer = base.normalizer
  raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  raw.add_special_tokens(specials)
  raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return _save(path, raw, None, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_round_trips_as_transformers(tmp_path):
  ref = _byte_fallback(tmp_path)
  tok = HFTokenizer.load(str(tmp_path))
  for text in ["héllo ☃ 日本 🙂", "", "  two spaces", "tab\there\nnewline", "What is 12 + 30?"]:
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
  cut = tok.encode("🙂")[:-1]  # a truncated byte sequence decodes as transformers does
  assert tok.decode(cut) == ref.decode(cut)
  assert tok.prompt_ids("Hi 🙂") == ref(format_prompt("Hi 🙂"))["input_ids"]
