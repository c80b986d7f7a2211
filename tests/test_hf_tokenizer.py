"""HFTokenizer and chat templates against transformers (the reference), on tokenizers built here."""

import os

import jinja2
import numpy as np
import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from rlhfjax.hf_tokenizer import HFTokenizer, load_tokenizer, render_chat  # noqa: E402
from rlhfjax.tokenizer import Tokenizer, format_prompt  # noqa: E402

# Shaped like the published Llama 3 Instruct template (bos in the template, unknown role rejected).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Shaped like Qwen2.5 / Qwen3: default system message, namespace, optional empty thinking block.
QWEN = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- elif not (message.role == "system" and loop.first) %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# The rest of what transformers gives templates: tojson options, strftime_now, loop controls, generation.
EXTRAS = (
    "{{ bos_token }}{{ messages | tojson(indent=1, sort_keys=true) }}|{{ strftime_now('%Y') }}|"
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% generation %}{{ m['content'] }}{% endgeneration %};{% endfor %}{{ pad_token }}{{ eos_token }}")

SENTENCES = ["What is 12 + 30?", "The answer is 42.", "Hello world, how are you today?",
             "I think, therefore I am.", "Let me think step by step.", "You are a helpful assistant."]
CHATS = {
    "single": [{"role": "user", "content": "What is 12 + 30?"}],
    "multi": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "How are you today?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2?"},
               {"role": "assistant", "content": " 2 ", "reasoning_content": None},
               {"role": "user", "content": "I think so"}],
}
STYLES = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, template=LLAMA3),
    "qwen": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN),
}


def _build(path, style, template="default"):
  """Trains a tiny byte-level BPE with the style's special tokens and saves it with transformers."""
  from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers
  s = STYLES[style]
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
      vocab_size=320, special_tokens=s["specials"] + ["<think>", "</think>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if s["bos"]:  # Llama adds bos in its post-processor
    raw.post_processor = processors.TemplateProcessing(
        single=f"{s['bos']} $A", special_tokens=[(s["bos"], raw.token_to_id(s["bos"]))])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=s["bos"], eos_token=s["eos"],
                                            pad_token=s["pad"])
  hf.chat_template = s["template"] if template == "default" else template
  hf.save_pretrained(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def _ids(out):
  """apply_chat_template(tokenize=True) gives a BatchEncoding in transformers 5, a list before."""
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module", params=sorted(STYLES))
def pair(request, tmp_path_factory):
  """(transformers tokenizer, HFTokenizer, checkpoint dir) for one template style."""
  path = str(tmp_path_factory.mktemp(request.param))
  ref = _build(path, request.param)
  return ref, HFTokenizer.load(path), path


def test_transformers_5_stores_the_template_beside_the_config(pair):
  _, _, path = pair
  assert os.path.isfile(os.path.join(path, "chat_template.jinja"))


@pytest.mark.parametrize("chat", sorted(CHATS))
def test_prompt_text_and_ids_equal_apply_chat_template(pair, chat):
  ref, tok, _ = pair
  msgs = CHATS[chat]
  text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert tok.format_prompt(msgs) == text
  assert render_chat(tok.chat_template, msgs, add_generation_prompt=True, **ref.special_tokens_map) == text
  ids = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
  assert tok.prompt_ids(msgs) == _ids(ids)
  q = msgs[-1]["content"]  # a plain question is one user message
  want = _ids(ref.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
  assert tok.prompt_ids(q) == want


def test_special_tokens_come_from_the_checkpoint(pair):
  ref, tok, _ = pair
  assert tok.eos_id == ref.eos_token_id
  assert tok.bos_id == ref.bos_token_id
  assert tok.pad_id == (ref.eos_token_id if ref.pad_token_id is None else ref.pad_token_id)
  assert tok.vocab_size == len(ref)
  assert (tok.thinking_start, tok.thinking_end) == ("<think>", "</think>")


def test_encode_prompts_left_pads_and_rejects_overlong(pair):
  ref, tok, _ = pair
  qs = ["What is 12 + 30?", "Hello", CHATS["system"]]
  rows = [tok.prompt_ids(q) for q in qs]
  width = max(map(len, rows)) + 2
  ids, mask = tok.encode_prompts(qs, width)
  assert ids.shape == mask.shape == (3, width) and ids.dtype == mask.dtype == np.int32
  for r, row in enumerate(rows):
    n = len(row)
    assert ids[r, width - n:].tolist() == row and mask[r].tolist() == [0] * (width - n) + [1] * n
    assert (ids[r, :width - n] == tok.pad_id).all()
  with pytest.raises(ValueError, match=f"exceeds max_prompt_len={width - 3}"):
    tok.encode_prompts(qs, width - 3)


def test_responses_end_with_the_turn_end_and_decode_back(pair):
  ref, tok, _ = pair
  resp = "<think>12 + 30</think> The answer is 42."
  ids = tok.response_ids(resp)
  assert ids[-1] == ref.convert_tokens_to_ids(STYLES["llama3" if ref.bos_token else "qwen"]["eos"])
  assert ids[:-1] == ref(resp, add_special_tokens=False)["input_ids"] == tok.encode(resp)
  assert tok.decode(ids + tok.encode(" more")) == resp == ref.decode(ids[:-1])  # tags are kept
  rids, rmask = tok.encode_responses([resp, "Hi"], len(ids) + 1)
  assert rids[0].tolist() == ids + [tok.pad_id] and rmask[0].tolist() == [1] * len(ids) + [0]
  assert tok.decode_batch(rids, rmask) == [resp, "Hi"]
  _, _, truncated = tok.encode_responses_with_stats([resp, "Hi"], 3)
  assert truncated.tolist() == [True, False]
  with pytest.raises(ValueError, match="exceed max_response_len=3"):
    tok.encode_responses([resp], 3, overflow="error")


def test_save_reloads_in_transformers_with_the_same_ids(pair, tmp_path):
  ref, tok, _ = pair
  tok.save(str(tmp_path))
  again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert again.chat_template == tok.chat_template
  for msgs in CHATS.values():
    assert (again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    assert _ids(again.apply_chat_template(msgs, add_generation_prompt=True)) == tok.prompt_ids(msgs)
  text = "I think, therefore I am. <|im_end|> 42"
  assert again(text)["input_ids"] == ref(text)["input_ids"]
  assert (again.eos_token_id, again.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
  # The pre-jinja-file layout: the template only under "chat_template" in tokenizer_config.json.
  os.remove(tmp_path / "chat_template.jinja")
  assert HFTokenizer.load(str(tmp_path)).chat_template == tok.chat_template
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template == tok.chat_template


def test_template_kwargs_and_configurable_thinking_tags(pair):
  ref, _, path = pair
  tok = HFTokenizer.load(path, thinking=("<thinking>", "</thinking>"),
                         template_kwargs={"enable_thinking": False})
  assert (tok.thinking_start, tok.thinking_end) == ("<thinking>", "</thinking>")
  msgs = CHATS["single"]
  assert tok.prompt_ids(msgs) == _ids(ref.apply_chat_template(msgs, add_generation_prompt=True,
                                                              enable_thinking=False))


def test_template_extras_render_as_transformers(tmp_path):
  ref = _build(str(tmp_path), "qwen", template=EXTRAS)
  tok = HFTokenizer.load(str(tmp_path))
  msgs = CHATS["system"]
  want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert tok.format_prompt(msgs) == want


def test_without_template_the_framework_prompt_and_post_processor(tmp_path):
  ref = _build(str(tmp_path), "llama3", template=None)
  tok = HFTokenizer.load(str(tmp_path))
  assert tok.chat_template is None and tok.format_prompt("What is 2?") == format_prompt("What is 2?")
  want = ref(format_prompt("What is 2?"))["input_ids"]
  assert tok.prompt_ids("What is 2?") == want and want[0] == ref.bos_token_id
  with pytest.raises(ValueError, match="no chat template"):
    tok.prompt_ids(CHATS["single"])


def test_raise_exception_is_a_clear_template_error(pair):
  ref, tok, _ = pair
  bad = [{"role": "tool", "content": "42"}]
  with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: tool"):
    tok.prompt_ids(bad)
  with pytest.raises(jinja2.exceptions.TemplateError, match="Unknown role: tool"):
    ref.apply_chat_template(bad)


def test_missing_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
    HFTokenizer.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nope.model"):
    load_tokenizer(str(tmp_path / "nope.model"))  # a .model file goes to the SentencePiece Tokenizer


def test_load_tokenizer_picks_the_kind(pair):
  _, _, path = pair
  assert isinstance(load_tokenizer(path), HFTokenizer)
  assert isinstance(load_tokenizer(os.path.join(path, "tokenizer.json")), HFTokenizer)
  assert not isinstance(load_tokenizer(path), Tokenizer)
