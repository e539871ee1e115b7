"""The tokenizer a GGUF file describes, rebuilt as a ``transformers`` one.

A GGUF carries no ``tokenizer.json``: its metadata holds the token list, the
BPE merges or SentencePiece scores, each token's type, the special token ids,
whether a BOS starts every text, the pre-tokenizer's name and the chat
template. Two kinds are rebuilt (``tokenizer.ggml.model``):

* ``gpt2`` -- byte-level BPE (SmolLM, Llama 3, Qwen): the vocabulary and
  merges as they are, text split first by the regexes llama.cpp uses for the
  file's ``tokenizer.ggml.pre`` (:data:`PRE_TOKENIZERS`), then mapped to
  byte characters. Control tokens (type 3) become special tokens and
  user-defined ones (type 4) added tokens, so ``<|im_start|>`` stays whole.
* ``llama`` -- SentencePiece BPE (Llama 2, Mistral): the pieces, scores and
  types are written into a SentencePiece model file (``tokenizer.model``),
  the format the original checkpoints ship, which ``LlamaTokenizer`` loads.

Anything else stops with one line naming it. The file's chat template and
special tokens go into the tokenizer, so ``apply_chat_template`` renders as
the original model's tokenizer does.
"""

from __future__ import annotations

import os
import tempfile

from bfpo_jax.model.gguf_io import GGUFError

_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
         r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
           r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
          r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": (_GPT2,), "gpt2": (_GPT2,), "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # every digit alone, then GPT-2's rule
    "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,), "llama-bpe": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,), "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
}
"""``tokenizer.ggml.pre`` -> the regexes llama.cpp splits text with, applied
one after another (llama.cpp ``llama-vocab.cpp``)."""
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # llama.cpp token types = SentencePiece's
_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
         "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _special_strings(reader, tokens) -> dict[str, str]:
  out = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"),
                    ("pad_token", "padding_token_id")):
    index = _field(reader, f"tokenizer.ggml.{key}")
    if index is not None and 0 <= index < len(tokens):
      out[name] = tokens[index]
  return out


def _byte_level_bpe(reader, path):
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
  from tokenizers import pre_tokenizers as pre

  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = _field(reader, "tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise GGUFError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens "
                    "and tokenizer.ggml.merges")
  kind = _field(reader, "tokenizer.ggml.pre", "default")
  if kind not in PRE_TOKENIZERS:
    raise GGUFError(f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre="
                    f"{kind!r} (supported: {', '.join(PRE_TOKENIZERS)}); "
                    "convert with --tokenizer DIR to take a tokenizer folder")
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                   fuse_unk=False)
  tokenizer = Tokenizer(bpe)
  tokenizer.pre_tokenizer = pre.Sequence(
      [pre.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[kind]]
      + [pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
  tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
  return tokenizer


def _sentencepiece_model(reader, path) -> bytes:
  """A SentencePiece BPE model file holding the GGUF's pieces."""
  from sentencepiece import sentencepiece_model_pb2 as spm

  tokens = _field(reader, "tokenizer.ggml.tokens")
  scores = _field(reader, "tokenizer.ggml.scores")
  types = _field(reader, "tokenizer.ggml.token_type")
  if not tokens or scores is None or types is None:
    raise GGUFError(f"{path}: a llama (SentencePiece) tokenizer needs tokens, "
                    "scores and token types")
  model = spm.ModelProto()
  for token, score, kind in zip(tokens, scores, types):
    piece = model.pieces.add()
    piece.piece, piece.score, piece.type = token, float(score), int(kind)
  trainer = model.trainer_spec
  trainer.model_type = spm.TrainerSpec.BPE
  trainer.byte_fallback = BYTE in types
  trainer.vocab_size = len(tokens)
  for name, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"),
                    ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
    setattr(trainer, name, int(_field(reader, f"tokenizer.ggml.{key}", -1)))
  normalizer = model.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = bool(_field(
      reader, "tokenizer.ggml.add_space_prefix", True))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return model.SerializeToString()


def load_gguf_tokenizer(path: str, reader=None):
  """The ``transformers`` tokenizer of the GGUF file at ``path``.

  Raises:
    GGUFError: one line, for a tokenizer kind or pre-tokenizer not rebuilt
      here, or missing tokenizer metadata.
  """
  import transformers

  from bfpo_jax.model.gguf_io import open_gguf

  reader = reader or open_gguf(path)
  kind = _field(reader, "tokenizer.ggml.model")
  tokens = _field(reader, "tokenizer.ggml.tokens") or []
  options = dict(_special_strings(reader, tokens),
                 chat_template=_field(reader, "tokenizer.chat_template"),
                 add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token",
                                           kind == "llama")),
                 add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token",
                                           False)))
  options = {k: v for k, v in options.items() if v is not None}
  if kind == "gpt2":
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(reader, path), **options)
  if kind == "llama":
    with tempfile.TemporaryDirectory() as folder:
      with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(_sentencepiece_model(reader, path))
      tokenizer = transformers.LlamaTokenizer.from_pretrained(
          folder, legacy=False, **options)
    return tokenizer
  raise GGUFError(f"{path}: unsupported tokenizer kind tokenizer.ggml.model="
                  f"{kind!r} (supported: gpt2, llama)")
