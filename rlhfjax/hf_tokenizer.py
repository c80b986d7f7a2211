"""Hugging Face tokenizers (`tokenizer.json`) and chat templates, behind the `Tokenizer` interface.

`HFTokenizer` drops in wherever `rlhfjax.tokenizer.Tokenizer` is used; special tokens come from the
checkpoint's files, never fixed ids:

    prompt ids   = encode(chat template of [{"role": "user", "content": q}], add_generation_prompt)
                   # no chat template: encode(format_prompt(q)) through the tokenizer's post-processor
    response ids = encode(response) + [eos_id]

`eos_id` is the checkpoint's `eos_token`, for chat models the token ending an assistant turn
(`<|im_end|>` Qwen, `<|eot_id|>` Llama 3); `eos_token=` overrides it. Without a pad token, pad = eos.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from typing import Literal, Sequence

import numpy as np
import tokenizers

from rlhfjax.tokenizer import Tokenizer, _fill, format_prompt as _plain_prompt

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # aliases, as transformers fills


@functools.lru_cache(maxsize=16)
def _compile(template: str):
  """Compiles a chat template in the environment transformers renders it in."""
  import jinja2
  from jinja2 import ext, nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(ext.Extension):  # `{% generation %}...{% endgeneration %}`: renders its body
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.Scope(body).set_lineno(lineno)

  def check(*names):
    if bad := [k for k in names if isinstance(k, str) and k.startswith("_")]:
      raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {bad[0]!r} is not allowed")

  class Namespace(jinja2.utils.Namespace):  # no underscore attributes (CPython internals)
    def __init__(*args, **kwargs):
      attrs = dict(*args[1:], **kwargs)
      check(*attrs)
      jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, k, v):
      check(k)
      jinja2.utils.Namespace.__setitem__(self, k, v)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  class TemplateDict:  # `dict(...)` and `dict.fromkeys(...)`, as transformers gives templates
    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  # json.dumps with transformers' defaults: no HTML escaping, non-ASCII kept
  env.filters["tojson"] = lambda x, ensure_ascii=False, **kw: json.dumps(x, ensure_ascii=ensure_ascii, **kw)
  env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
                     dict=TemplateDict())
  return env.from_string(template)


def render_chat(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                bos_token: str | None = None, eos_token: str | None = None, **kw) -> str:
  """Renders `messages` (dicts with "role", "content", ...) with a jinja chat template, as
  transformers' `apply_chat_template(..., tokenize=False)` does: None-valued message keys dropped,
  reasoning aliased under `reasoning_content`/`thinking`, None keyword values left undefined.

  Raises:
    jinja2.exceptions.TemplateError: the template called `raise_exception(message)`.
  """
  chat = []
  for m in messages:
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
    chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
  kw = {k: v for k, v in dict(kw, bos_token=bos_token, eos_token=eos_token).items() if v is not None}
  return _compile(template).render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **kw)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_str(v) -> str | None:  # tokenizer_config stores a token as "str" or {"content": "str", ...}
  return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` plus its checkpoint's special tokens and chat template."""

  def __init__(self, tok: tokenizers.Tokenizer, config: dict, *, chat_template: str | None = None,
               thinking: tuple[str, str] = ("<think>", "</think>"), eos_token: str | None = None,
               template_kwargs: dict | None = None):
    self._tok, self._config = tok, dict(config)
    if "split_special_tokens" in config:  # as transformers: special tokens in text encode as text
      tok.encode_special_tokens = bool(config["split_special_tokens"])
    self.chat_template = chat_template
    self.thinking_start, self.thinking_end = thinking
    # Every `*_token` string in the config is visible to the template, as in transformers.
    self.special_tokens = {k: s for k, v in config.items() if k.endswith("_token") and (s := _token_str(v))}
    if eos_token is not None:
      self.special_tokens["eos_token"] = eos_token
    self._template_kwargs = {**self.special_tokens, **(template_kwargs or {})}
    ids = {}
    for name in ("bos", "eos", "pad"):
      if (s := self.special_tokens.get(f"{name}_token")) is not None:
        if (i := tok.token_to_id(s)) is None:
          raise ValueError(f"{name}_token {s!r} of the tokenizer config is not in the vocabulary")
        ids[name] = i
    if "eos" not in ids:
      raise ValueError("the tokenizer config has no eos_token; pass eos_token= (the end-of-turn token)")
    self.eos_id, self.bos_id, self.pad_id = ids["eos"], ids.get("bos"), ids.get("pad", ids["eos"])
    self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    # decode skips pad, bos and special added tokens, but keeps the thinking tags (rewards read them)
    keep = {tok.token_to_id(t) for t in thinking}
    skip = {i for i, t in tok.get_added_tokens_decoder().items() if t.special and i not in keep}
    self._skip = np.array(sorted(skip | {self.pad_id} | ({self.bos_id} - {None})), np.int64)

  @classmethod
  def load(cls, path: str, *, chat_template: str | None = None,
           thinking: tuple[str, str] = ("<think>", "</think>"), eos_token: str | None = None,
           template_kwargs: dict | None = None) -> "HFTokenizer":
    """Loads a directory with `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`,
    `chat_template.jinja`), or a `tokenizer.json` file. `chat_template` (a template, or the name of one
    of the checkpoint's named templates) overrides the checkpoint's default template;
    `template_kwargs` (e.g. `{"enable_thinking": False}`) are passed to every rendering."""
    d, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (
        os.path.dirname(path), path)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file}: Hugging Face tokenizer.json not found")
    config = _read_json(os.path.join(d, "tokenizer_config.json"))
    if "added_tokens_decoder" not in config:  # legacy special_tokens_map.json, as transformers reads it
      config.update(_read_json(os.path.join(d, "special_tokens_map.json")))
    # transformers 5 saves the template to chat_template.jinja and named ones to
    # additional_chat_templates/NAME.jinja (these files win); older checkpoints keep it under
    # "chat_template" in tokenizer_config.json: a string or a list of {"name", "template"}.
    template = config.get("chat_template")
    if isinstance(template, list):
      template = {t["name"]: t["template"] for t in template}
    files = {}
    if os.path.isfile(jinja := os.path.join(d, "chat_template.jinja")):
      files["default"] = jinja
    if os.path.isdir(extra := os.path.join(d, "additional_chat_templates")):
      files.update({n[:-len(".jinja")]: os.path.join(extra, n) for n in sorted(os.listdir(extra))
                    if n.endswith(".jinja")})
    if files:
      template = {}
      for name, f_path in files.items():
        with open(f_path, encoding="utf-8") as f:
          template[name] = f.read()
    if isinstance(template, dict):  # as transformers' get_chat_template: a name picks one, else "default"
      if chat_template in template:
        chat_template = template[chat_template]
      elif chat_template is None and "default" not in template:
        raise ValueError(f"{d}: the tokenizer has chat templates {sorted(template)} but no 'default'; "
                         "pass chat_template= (a template or one of these names)")
      template = template.get("default")
    return cls(tokenizers.Tokenizer.from_file(file), config, chat_template=chat_template or template,
               thinking=thinking, eos_token=eos_token, template_kwargs=template_kwargs)

  def save(self, path: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja,
    which `transformers.AutoTokenizer.from_pretrained(path)` loads."""
    os.makedirs(path, exist_ok=True)
    self._tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._config, **self.special_tokens}
    config.pop("chat_template", None)
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
      with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(self.chat_template)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  save_pretrained = save  # what `rlhfjax.models.save_hf(..., tokenizer=)` calls

  def encode(self, text: str) -> list[int]:
    """Plain encoding: no special tokens added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to (not including) the first eos; pad, bos, out-of-vocabulary ids and special
    tokens other than the thinking tags are skipped. Where pad is eos, leading ones are left padding."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if self.pad_id == self.eos_id:
      ids = ids[np.argmax(np.append(ids, -1) != self.pad_id):]
    eos = np.flatnonzero(ids == self.eos_id)
    ids = ids[:eos[0]] if eos.size else ids
    ids = ids[~np.isin(ids, self._skip) & (ids >= 0) & (ids < self.vocab_size)]
    return self._tok.decode(ids.tolist(), skip_special_tokens=False)

  def decode_batch(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
    """Decodes each row of `ids` [batch, length]; tokens with mask 0 are dropped."""
    ids = np.asarray(ids)
    keep = np.ones(ids.shape, bool) if mask is None else np.asarray(mask) > 0
    return [self.decode(row[k]) for row, k in zip(ids, keep)]

  # --- the template -------------------------------------------------------------------------

  def format_prompt(self, question: str | Sequence[dict]) -> str:
    """The prompt text: the chat template with a generation prompt, else `Question: ... Answer:`."""
    if self.chat_template is None:
      if not isinstance(question, str):
        raise ValueError("this tokenizer has no chat template, so prompts must be strings")
      return _plain_prompt(question)
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return render_chat(self.chat_template, messages, add_generation_prompt=True, **self._template_kwargs)

  def _encode_prompts(self, questions) -> list[list[int]]:
    texts = [self.format_prompt(q) for q in questions]
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=self.chat_template is None)]

  def prompt_ids(self, question: str | Sequence[dict]) -> list[int]:
    """The prompt's ids (see the module docstring)."""
    return self._encode_prompts([question])[0]

  def response_ids(self, response: str) -> list[int]:
    """encode(response) + [eos_id]."""
    return self.encode(response) + [self.eos_id]

  # --- batches ------------------------------------------------------------------------------

  def encode_prompts(self, questions: Sequence, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts LEFT-padded to exactly `max_len`: (ids, mask), int32 [batch, max_len].

    Raises:
      ValueError: if a prompt is longer than `max_len` (prompts are never truncated).
    """
    seqs = self._encode_prompts(questions)
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    if len(seqs) and lengths.max() > max_len:
      raise ValueError(
          f"prompt of {int(lengths.max())} tokens exceeds max_prompt_len={max_len}; raise "
          f"config.data.max_prompt_len or shorten the prompt: {questions[int(lengths.argmax())]!r}")
    return self._fill(seqs, lengths, max_len, left=True)

  def encode_responses(self, responses: Sequence[str], max_len: int, *,
                       overflow: Literal["truncate", "error"] = "truncate"):
    """Responses + eos, RIGHT-padded to `max_len`; overlong ones cut (eos dropped), as `Tokenizer`."""
    ids, mask, _ = self.encode_responses_with_stats(responses, max_len, overflow=overflow)
    return ids, mask

  def encode_responses_with_stats(self, responses, max_len, *, overflow="truncate"):
    """As `encode_responses`, plus a bool [batch] array marking truncated rows."""
    if overflow not in ("truncate", "error"):
      raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
    encs = self._tok.encode_batch(list(responses), add_special_tokens=False)
    seqs = [e.ids + [self.eos_id] for e in encs]
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    truncated = lengths > max_len
    if truncated.any() and overflow == "error":
      raise ValueError(f"{int(truncated.sum())} response(s) exceed max_response_len={max_len} (longest "
                       f"{int(lengths.max())} tokens incl. eos); raise config.data.max_response_len")
    if truncated.any():
      logging.warning("%d of %d responses truncated to max_response_len=%d (eos dropped)",
                      int(truncated.sum()), len(seqs), max_len)
    ids, mask = self._fill(seqs, np.minimum(lengths, max_len), max_len, left=False)
    return ids, mask, truncated

  def _fill(self, seqs, lengths, width, *, left):
    ids, mask = _fill(seqs, lengths, width, left=left)
    return np.where(mask > 0, ids, np.int32(self.pad_id)).astype(np.int32), mask


def load_tokenizer(path: str, **kwargs) -> Tokenizer | HFTokenizer:
  """`Tokenizer.load` for a SentencePiece `.model` file; `HFTokenizer.load` (with `kwargs`) for a
  Hugging Face directory or `tokenizer.json`."""
  if path.endswith(".model") and not os.path.isdir(path):
    return Tokenizer.load(path)
  return HFTokenizer.load(path, **kwargs)
