"""Decoder hyper-parameters (Mistral and Llama), and conversion to/from HF."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bfpo_jax.model.rope import ROPE_TYPES

ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""``model_type`` -> the ``transformers`` class this package reads and writes."""
ATTENTION_IMPLS = ("xla", "cudnn")
QWEN = ("qwen2", "qwen3")
REMAT_POLICIES = ("full", "dots")
"""What a rematerialised block keeps for the backward pass: ``full`` only its
input (everything recomputed), ``dots`` also the outputs of its weight
matmuls (q, k, v, o, gate, up, down; attention scores and elementwise ops
recomputed): about 10x the residual stream per block, but the backward pass
then recomputes almost no FLOPs."""


@dataclasses.dataclass(frozen=True)
class MistralConfig:
  """Architecture of a Mistral, Llama or Qwen2/Qwen3 decoder, plus how to run it.

  They differ only in what their configs may set: Llama has no sliding
  window and may put biases on the attention (``attention_bias``) and MLP
  (``mlp_bias``) projections; Qwen2 has biases on q, k and v only
  (``qkv_bias``); Qwen3 normalises each head of q and k with an RMSNorm
  before RoPE (``qk_norm``); all may scale RoPE (``rope_type`` with its
  ``rope_scaling`` parameters). Field names follow ``transformers`` where one
  exists. The config is hashable, so jitted functions can take it as a static
  argument.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 8
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  max_position_embeddings: int = 32768
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = 4096  # tokens a query sees, itself included
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int = 1
  eos_token_id: int = 2
  pad_token_id: int | None = None
  model_type: str = "mistral"  # a key of ARCHITECTURES
  attention_bias: bool = False  # biases on q, k, v and o (Llama option)
  mlp_bias: bool = False  # biases on gate, up and down (Llama option)
  qkv_bias: bool = False  # biases on q, k and v, not o (Qwen2)
  qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
  rope_type: str = "default"  # one of rope.ROPE_TYPES
  rope_scaling: tuple = ()  # sorted (name, value) pairs of that rope type
  # How to run it (not part of the checkpoint):
  dtype: Any = jnp.float32  # compute dtype of activations and matmuls
  param_dtype: Any = jnp.float32  # dtype of freshly initialised parameters
  remat: bool = False  # rematerialise each block in the backward pass
  remat_policy: str = "full"  # with remat: full | dots (see REMAT_POLICIES)
  attention_impl: str = "xla"  # "xla" (any mask) or "cudnn" (GPU, right pad)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a "
          f"multiple of num_key_value_heads ({self.num_key_value_heads})")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got "
                       f"{self.remat_policy!r}")
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"model_type must be one of {tuple(ARCHITECTURES)}, "
                       f"got {self.model_type!r}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got "
                       f"{self.rope_type!r}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be >= 1 or None, got "
                       f"{self.sliding_window}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def replace(self, **changes) -> MistralConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def mistral_7b(cls, **overrides) -> MistralConfig:
    """Mistral-7B-v0.1 (and Zephyr-7B, which shares its architecture)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> MistralConfig:
    """A few-hundred-thousand-parameter model with the real 32k vocabulary."""
    fields = dict(vocab_size=32000, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048,
                  sliding_window=None, tie_word_embeddings=True)
    fields.update(overrides)
    return cls(**fields)

  @classmethod
  def from_hf(cls, hf_config, **overrides) -> MistralConfig:
    """From a ``transformers`` Mistral/Llama/Qwen config (or its ``to_dict()``).

    Raises:
      ValueError: in one line, for another architecture or a setting this
        model does not implement (activation, RoPE variant).
    """
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    check_supported(d)
    rope = dict(_rope_dict(d))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    fields = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in ("dtype", "param_dtype",
                                                "rope_scaling")}
    if fields.get("num_key_value_heads") is None:  # Llama: None means MHA
      fields["num_key_value_heads"] = d["num_attention_heads"]
    if "sliding_window" not in d or d["model_type"] in QWEN:
      fields["sliding_window"] = None  # Llama has none; Qwen's is off (checked)
    if d["model_type"] == "qwen2":  # biases on q, k, v; never on o
      fields.update(qkv_bias=True, attention_bias=False)
    if d["model_type"] == "qwen3":
      fields["qk_norm"] = True
    fields.update(rope_theta=float(theta), rope_type=rope_type,
                  rope_scaling=tuple(sorted(rope.items())))
    if fields.get("head_dim") == d["hidden_size"] // d["num_attention_heads"]:
      fields["head_dim"] = None  # the default, however the config spells it
    eos = fields.get("eos_token_id")
    if isinstance(eos, list | tuple):
      fields["eos_token_id"] = eos[0]
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self):
    """A ``transformers`` config describing the same architecture."""
    import transformers

    common = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.dim_per_head,
        max_position_embeddings=self.max_position_embeddings,
        rope_theta=self.rope_theta,
        # The name transformers 4 reads; transformers 5 turns it into
        # rope_parameters.
        rope_scaling=(None if self.rope_type == "default" else
                      {"rope_type": self.rope_type, **dict(self.rope_scaling)}),
        rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        initializer_range=self.initializer_range,
        bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id,
        architectures=[ARCHITECTURES[self.model_type]])
    if self.model_type == "llama":
      return transformers.LlamaConfig(attention_bias=self.attention_bias,
                                      mlp_bias=self.mlp_bias, **common)
    if self.model_type == "qwen2":
      return transformers.Qwen2Config(use_sliding_window=False, **common)
    if self.model_type == "qwen3":
      return transformers.Qwen3Config(attention_bias=self.attention_bias,
                                      use_sliding_window=False, **common)
    return transformers.MistralConfig(sliding_window=self.sliding_window,
                                      **common)


def _rope_dict(d: dict) -> dict:
  """RoPE settings of an HF config dict: transformers 5 or 4 layout."""
  return d.get("rope_parameters") or d.get("rope_scaling") or {}


def check_supported(d: dict) -> None:
  """Raises a one-line ValueError unless ``d`` (an HF config dict) is ours."""
  supported = ", ".join(ARCHITECTURES.values())
  model_type = d.get("model_type")
  names = d.get("architectures") or []
  if model_type not in ARCHITECTURES or any(
      n != ARCHITECTURES[model_type] for n in names):
    what = ", ".join(names) or f"model_type {model_type!r}"
    raise ValueError(f"unsupported architecture {what}: supported are "
                     f"{supported}")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}: only silu")
  rope = _rope_dict(d)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported rope_type {rope_type!r}: supported are "
                     f"{', '.join(ROPE_TYPES)}")
  layers = d.get("layer_types") or ()
  if model_type in QWEN and (d.get("use_sliding_window") or any(
      t != "full_attention" for t in layers)):
    raise ValueError("unsupported per-layer sliding-window attention "
                     "(use_sliding_window / layer_types): only full attention")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("unsupported partial_rotary_factor "
                     f"{rope['partial_rotary_factor']}: only 1.0")
