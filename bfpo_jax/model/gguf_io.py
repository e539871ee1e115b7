"""GGUF files (llama.cpp's format) -> a Hugging Face config and our params.

Read with the ``gguf`` package (numpy, no torch): the metadata gives the
architecture, and every tensor is dequantized to float32 one at a time
(:data:`TENSOR_TYPES`: F32, F16, BF16, the legacy Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
and the K-quants Q2_K..Q6_K). llama.cpp's converter permutes the rows of
Llama-family q and k projections into its own RoPE layout (pairs of
dimensions interleaved instead of split in halves); :func:`unpermute` undoes
it, so the weights equal the original checkpoint's (up to quantization).
Qwen2/Qwen3 files are stored unpermuted.

Supported architectures (``general.architecture``): ``llama`` (Llama,
SmolLM, Mistral stored as llama), ``qwen2`` and ``qwen3``. Anything else --
another architecture, a tensor type, a tensor name this model has no place
for, RoPE scaling other than linear -- stops with one line naming it. The
tokenizer is rebuilt by :mod:`bfpo_jax.model.gguf_tokenizer`.
"""

from __future__ import annotations

import re

import numpy as np

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""``general.architecture`` -> our ``model_type``."""
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp permutes

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSOR = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>\w+)\.(?P<kind>weight|bias)")


class GGUFError(ValueError):
  """A GGUF file that cannot be read or converted (one line, names the file)."""


def open_gguf(path: str):
  """A ``gguf.GGUFReader`` over ``path``; a missing, truncated or foreign
  file raises :class:`GGUFError` in one line."""
  import gguf

  try:
    return gguf.GGUFReader(path)
  except FileNotFoundError:
    raise GGUFError(f"{path}: no such GGUF file") from None
  except Exception as e:  # the reader raises whatever numpy/struct do
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise GGUFError(f"{path}: not a readable GGUF file ({text})") from None


def metadata(reader, *, skip=("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                              "tokenizer.ggml.token_type",
                              "tokenizer.ggml.scores")) -> dict:
  """The key/value metadata as Python values (the big tokenizer arrays are
  left out unless ``skip`` is emptied)."""
  return {key: field.contents() for key, field in reader.fields.items()
          if key not in skip and not key.startswith("GGUF.")}


def hf_name(gguf_name: str) -> str:
  """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
  match = _TENSOR.fullmatch(gguf_name)
  table = _BLOCK_NAMES if match and match["layer"] else _GLOBAL_NAMES
  if match is None or match["base"] not in table:
    raise KeyError(gguf_name)
  if match["layer"] is None:
    return f"{table[match['base']]}.{match['kind']}"
  return (f"model.layers.{match['layer']}.{table[match['base']]}."
          f"{match['kind']}")


def unpermute(w, n_heads: int):
  """Inverse of llama.cpp's ``permute`` of q/k rows for ``n_heads`` heads.

  llama.cpp writes each head's rows as (pair, 2) where Hugging Face has
  (2, pair): ``reshape(n, 2, h/2, ...).swapaxes(1, 2)``. Works on [out, in]
  weights and [out] biases.
  """
  rows = w.shape[0]
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _get(meta, arch, key, default=None, required=True, path=""):
  value = meta.get(f"{arch}.{key}", default)
  if value is None and required:
    raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
  return value


def architecture(meta, path="") -> str:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{path}: unsupported GGUF architecture {arch!r}: "
                    f"supported are {', '.join(ARCHITECTURES)}")
  return arch


def hf_config(meta: dict, shapes: dict, path: str = "") -> dict:
  """The ``config.json`` of the model a GGUF file holds.

  Args:
    meta: :func:`metadata` of the file.
    shapes: each tensor's name -> shape in numpy order (:func:`shapes`); tied
      embeddings, biases and the vocabulary size are read from them.
    path: the file, for error messages.
  """
  arch = architecture(meta, path)
  model_type = ARCHITECTURES[arch]
  names = set(shapes)
  heads = int(_get(meta, arch, "attention.head_count", path=path))
  hidden = int(_get(meta, arch, "embedding_length", path=path))
  head_dim = (meta.get(f"{arch}.attention.key_length")
              or meta.get(f"{arch}.rope.dimension_count") or hidden // heads)
  if "token_embd.weight" not in shapes:
    raise GGUFError(f"{path}: no token_embd.weight tensor")
  vocab = shapes["token_embd.weight"][0]
  config = {
      "architectures": [{"llama": "LlamaForCausalLM",
                         "qwen2": "Qwen2ForCausalLM",
                         "qwen3": "Qwen3ForCausalLM"}[model_type]],
      "model_type": model_type,
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(_get(meta, arch, "feed_forward_length",
                                    path=path)),
      "num_hidden_layers": int(_get(meta, arch, "block_count", path=path)),
      "num_attention_heads": heads,
      "num_key_value_heads": int(_get(meta, arch, "attention.head_count_kv",
                                      heads, path=path)),
      "head_dim": int(head_dim),
      "max_position_embeddings": int(_get(meta, arch, "context_length", 2048,
                                          path=path)),
      "rope_theta": float(_get(meta, arch, "rope.freq_base", 10000.0,
                               path=path)),
      "rms_norm_eps": float(_get(meta, arch,
                                 "attention.layer_norm_rms_epsilon", 1e-6,
                                 path=path)),
      "tie_word_embeddings": "output.weight" not in names,
      "hidden_act": "silu",
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
  }
  if model_type == "llama":
    config["attention_bias"] = "blk.0.attn_q.bias" in names
    config["mlp_bias"] = "blk.0.ffn_gate.bias" in names
  if model_type == "qwen3":
    config["attention_bias"] = "blk.0.attn_output.bias" in names
  if "rope_freqs.weight" in names:
    raise GGUFError(f"{path}: tensor rope_freqs.weight (Llama-3.1-style RoPE "
                    "scaling) is not supported")
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling == "linear":
    config["rope_scaling"] = {"rope_type": "linear", "factor": float(
        _get(meta, arch, "rope.scaling.factor", path=path))}
  elif scaling != "none":
    raise GGUFError(f"{path}: unsupported RoPE scaling {scaling!r} "
                    "({arch}.rope.scaling.type): only linear")
  return config


def shapes(reader) -> dict[str, tuple]:
  """Each tensor's name -> shape in numpy order ([rows, ..., columns])."""
  return {t.name: tuple(int(d) for d in reversed(t.shape))
          for t in reader.tensors}


def dequantize(tensor, path: str = "") -> np.ndarray:
  """A GGUF tensor as float32, in numpy's [rows, ..., columns] order."""
  from gguf import GGMLQuantizationType, quants

  kind = tensor.tensor_type.name
  if kind not in TENSOR_TYPES:
    raise GGUFError(f"{path}: tensor {tensor.name} has type {kind}, not "
                    f"supported (supported: {', '.join(TENSOR_TYPES)})")
  shape = tuple(int(d) for d in reversed(tensor.shape))
  if kind in ("F32", "F16"):
    values = np.asarray(tensor.data, np.float32)
  else:
    values = quants.dequantize(np.asarray(tensor.data),
                               GGMLQuantizationType[kind])
  return values.reshape(shape)


class HFTensors:
  """The file's tensors under their Hugging Face names, dequantized on
  demand (one at a time: a 7B file never needs a float32 copy in memory).

  ``tensors[name]`` is a float32 array with q/k rows unpermuted where
  llama.cpp permuted them; ``names`` lists them all.
  """

  def __init__(self, reader, config: dict, path: str = ""):
    self.path, self.config = path, config
    self.by_name = {}
    for tensor in reader.tensors:
      try:
        self.by_name[hf_name(tensor.name)] = tensor
      except KeyError:
        raise GGUFError(f"{path}: tensor {tensor.name} has no place in a "
                        f"{config['architectures'][0]}") from None
    self.permuted = config["model_type"] in PERMUTED
    self.heads = {"self_attn.q_proj": config["num_attention_heads"],
                  "self_attn.k_proj": config["num_key_value_heads"]}

  @property
  def names(self):
    return list(self.by_name)

  def shape(self, name: str) -> tuple:
    return tuple(int(d) for d in reversed(self.by_name[name].shape))

  def __getitem__(self, name: str) -> np.ndarray:
    values = dequantize(self.by_name[name], self.path)
    module = name.rsplit(".", 1)[0].split(".", 3)[-1]
    if self.permuted and module in self.heads:
      values = unpermute(values, self.heads[module])
    return values


def quantization(reader) -> dict[str, int]:
  """How many tensors of each type the file holds (for the model card)."""
  counts: dict[str, int] = {}
  for tensor in reader.tensors:
    counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
