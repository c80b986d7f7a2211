"""SentencePiece tokenizer: training, loading, and the one prompt/response template.

One template for the whole framework, so SFT targets and RL samples are the same token format:

    prompt ids   = [bos] + encode(format_prompt(question))      # left-padded in batches
    response ids = encode(response) + [eos]                      # right-padded in batches

Prompt and response are encoded separately (never as one string), so the tokens a policy samples
after the prompt are exactly those SFT trained it to produce.

Special ids are fixed: pad=0, unk=1, bos=2, eos=3; `<thinking>` and `</thinking>` are single
pieces; every digit is its own piece (`split_digits`) so arithmetic sees one token per digit.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
THINKING_START = "<thinking>"
THINKING_END = "</thinking>"

_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
  """The one prompt template. The response text is encoded on its own and appended after it."""
  return _PROMPT_TEMPLATE.format(question=question)


def template_texts(examples: Iterable[dict]) -> Iterator[str]:
  """Tokenizer training texts in the exact form they are encoded: each example's formatted "prompt",
  then its "response" (or "demonstration") if any."""
  for ex in examples:
    yield format_prompt(ex["prompt"])
    resp = ex.get("response", ex.get("demonstration"))
    if resp:
      yield resp


def train_tokenizer(
    texts: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
) -> str:
  """Trains a SentencePiece model in-process on `texts` (formatted the way they will be encoded) and
  writes it to `model_path` (parent directories created); returns `model_path`.

  Deterministic: the same texts in the same order give byte-identical files. `vocab_size` is an
  upper bound (`hard_vocab_limit=False`) including the 4 special ids and the 2 thinking tags (a tiny
  corpus may yield fewer pieces); below the corpus's character count it raises ValueError. "bpe" is
  the recommended `model_type`: with sentencepiece 0.2.3 "unigram" finds almost no multi-character
  seed pieces on small templated corpora and ends up near character level (valid, deterministic).
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=[THINKING_START, THINKING_END],
        split_digits=True,
        byte_fallback=False,
        hard_vocab_limit=False,
        character_coverage=1.0,
        # Identity normalization and no whitespace collapsing: decode(encode(s)) == s, and
        # newlines in the prompt template survive.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        input_sentence_size=0,  # use every sentence: no random sampling
        shuffle_input_sentence=False,
        num_threads=1,  # determinism
        minloglevel=2,
    )
  except RuntimeError as e:
    msg = str(e).splitlines()[0]
    if "Vocabulary size is smaller than required_chars" in msg:
      raise ValueError(
          f"vocab_size={vocab_size} is too small for the characters in the corpus "
          f"({msg.split('required_chars.')[-1].strip()}); raise vocab_size") from None
    raise
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = model_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(writer.getvalue())
  os.replace(tmp, model_path)
  return model_path


class Tokenizer:
  """A loaded SentencePiece model plus the framework's prompt/response conventions."""

  # Fixed for every model (checked in __init__); plain attributes, as on HFTokenizer.
  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor
    for name, want in (("pad", PAD_ID), ("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID)):
      got = getattr(processor, f"{name}_id")()
      if got != want:
        raise ValueError(f"tokenizer {name}_id is {got}, expected {want}; train it with "
                         "rlhfjax.tokenizer.train_tokenizer")
    self._thinking_start = processor.piece_to_id(THINKING_START)
    self._thinking_end = processor.piece_to_id(THINKING_END)
    if UNK_ID in (self._thinking_start, self._thinking_end):
      raise ValueError("tokenizer lacks the <thinking>/</thinking> pieces; train it with "
                       "rlhfjax.tokenizer.train_tokenizer")

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"tokenizer model {path!r} not found; create it with "
          "rlhfjax.tokenizer.train_tokenizer(texts, model_path, vocab_size=...)")
    return cls(spm.SentencePieceProcessor(model_file=path))

  @classmethod
  def from_proto(cls, model_proto: bytes) -> "Tokenizer":
    """Loads from serialized model bytes (e.g. stored beside a checkpoint)."""
    return cls(spm.SentencePieceProcessor(model_proto=model_proto))

  @property
  def model_proto(self) -> bytes:
    return self._sp.serialized_model_proto()

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def thinking_start_id(self) -> int:
    return self._thinking_start

  @property
  def thinking_end_id(self) -> int:
    return self._thinking_end

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def encode(self, text: str) -> list[int]:
    """Plain encoding: no bos/eos added."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to (not including) the first eos, skipping pad and bos; ids outside the vocabulary
    (a model's embedding table may be padded past `vocab_size`) decode as unk."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    eos = np.flatnonzero(ids == EOS_ID)
    if eos.size:
      ids = ids[:eos[0]]
    ids = ids[(ids != PAD_ID) & (ids != BOS_ID)]
    ids = np.where((ids < 0) | (ids >= self._sp.vocab_size()), UNK_ID, ids)
    return self._sp.decode(ids.tolist())

  # --- the template -------------------------------------------------------------------------

  def prompt_ids(self, question: str) -> list[int]:
    return [BOS_ID] + self._sp.encode(format_prompt(question))

  def response_ids(self, response: str) -> list[int]:
    return self._sp.encode(response) + [EOS_ID]

  # --- batches ------------------------------------------------------------------------------

  def encode_prompts(self, questions: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`prompt_ids` of each question, LEFT-padded to exactly `max_len`: `(ids, mask)`, int32
    [batch, max_len], mask 1 on real tokens. Prompts are never truncated: a longer one raises
    ValueError."""
    seqs = [[BOS_ID] + s for s in self._sp.encode([format_prompt(q) for q in questions])]
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    if len(seqs) and lengths.max() > max_len:
      raise ValueError(
          f"prompt of {int(lengths.max())} tokens exceeds max_prompt_len={max_len}; raise "
          f"config.data.max_prompt_len or shorten the prompt: {questions[int(lengths.argmax())]!r}")
    return _fill(seqs, lengths, max_len, left=True)

  def encode_responses(
      self,
      responses: Sequence[str],
      max_len: int,
      *,
      overflow: Literal["truncate", "error"] = "truncate",
  ) -> tuple[np.ndarray, np.ndarray]:
    """`response_ids` of each response, RIGHT-padded to exactly `max_len`: `(ids, mask)`, int32
    [batch, max_len], mask 1 on real tokens including eos. Overlong responses are cut to `max_len`
    tokens (eos dropped, so the model is not taught to stop there) and counted in a log line;
    `overflow="error"` raises ValueError instead."""
    ids, mask, _ = self.encode_responses_with_stats(responses, max_len, overflow=overflow)
    return ids, mask

  def encode_responses_with_stats(self, responses, max_len, *, overflow="truncate"):
    """As `encode_responses`, plus a bool [batch] array marking truncated rows."""
    if overflow not in ("truncate", "error"):
      raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
    seqs = [s + [EOS_ID] for s in self._sp.encode(list(responses))]
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    truncated = lengths > max_len
    if truncated.any():
      n = int(truncated.sum())
      if overflow == "error":
        raise ValueError(
            f"{n} response(s) exceed max_response_len={max_len} (longest {int(lengths.max())} "
            "tokens incl. eos); raise config.data.max_response_len")
      logging.warning("%d of %d responses truncated to max_response_len=%d (eos dropped)",
                      n, len(seqs), max_len)
    ids, mask = _fill(seqs, np.minimum(lengths, max_len), max_len, left=False)
    return ids, mask, truncated

  def decode_batch(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
    """Decodes each row of `ids` [batch, length]; tokens with mask 0 are skipped."""
    ids = np.asarray(ids)
    if mask is not None:
      ids = np.where(np.asarray(mask) > 0, ids, PAD_ID)
    return [self.decode(row) for row in ids.tolist()]


def _fill(seqs: list[list[int]], lengths: np.ndarray, width: int, *, left: bool):
  """Packs ragged `seqs` (each used up to `lengths[i]`) into [B, width] with one scatter."""
  b = len(seqs)
  ids = np.full((b, width), PAD_ID, np.int32)
  mask = np.zeros((b, width), np.int32)
  total = int(lengths.sum())
  if total == 0:
    return ids, mask
  flat = np.fromiter((t for s, n in zip(seqs, lengths) for t in s[:n]), np.int32, total)
  rows = np.repeat(np.arange(b), lengths)
  starts = np.cumsum(lengths) - lengths
  within = np.arange(total) - np.repeat(starts, lengths)
  cols = within + np.repeat(width - lengths, lengths) if left else within
  ids[rows, cols] = flat
  mask[rows, cols] = 1
  return ids, mask
