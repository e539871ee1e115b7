"""Mistral architecture hyper-parameters, and conversion to/from Hugging Face."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = ("full", "dots")
"""What a rematerialised block keeps for the backward pass: ``full`` only its
input (everything recomputed), ``dots`` also the outputs of its weight
matmuls (q, k, v, o, gate, up, down; attention scores and elementwise ops
recomputed): about 10x the residual stream per block, but the backward pass
then recomputes almost no FLOPs."""


@dataclasses.dataclass(frozen=True)
class MistralConfig:
  """Architecture of a Mistral decoder, plus how to run it.

  Field names follow ``transformers.MistralConfig`` where one exists. The
  config is hashable, so jitted functions can take it as a static argument.
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
    """From a ``transformers.MistralConfig`` (or its ``to_dict()``)."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"unsupported rope scaling {rope!r}: only default RoPE")
    fields = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in ("dtype", "param_dtype")}
    fields["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta",
                                                                10000.0)))
    eos = fields.get("eos_token_id")
    if isinstance(eos, list | tuple):
      fields["eos_token_id"] = eos[0]
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self):
    """A ``transformers.MistralConfig`` describing the same architecture."""
    import transformers

    return transformers.MistralConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.dim_per_head,
        max_position_embeddings=self.max_position_embeddings,
        rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
        sliding_window=self.sliding_window,
        tie_word_embeddings=self.tie_word_embeddings,
        initializer_range=self.initializer_range,
        bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        pad_token_id=self.pad_token_id, architectures=["MistralForCausalLM"])
