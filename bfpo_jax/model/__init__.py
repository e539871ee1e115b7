"""Flax Mistral/Llama: architecture, Hugging Face I/O, decoding, tokenizer.

The one import place for using a model::

    from bfpo_jax.model import generate, load_hf, load_tokenizer, save_hf

``generate`` here is the function; the decoding module's other pieces
(``prefill``, ``decode``) import from ``bfpo_jax.model.generate``.
"""

from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.generate import generate
from bfpo_jax.model.hf_io import load_hf, save_hf
from bfpo_jax.model.mistral import (
  abstract_params,
  apply,
  apply_hidden,
  init_params,
  logical_axes,
  match_params,
  param_path,
  unembedding,
)
from bfpo_jax.tokenizer import load_tokenizer

__all__ = ["MistralConfig", "abstract_params", "apply", "apply_hidden",
           "generate", "init_params", "load_hf", "load_tokenizer",
           "logical_axes", "match_params", "param_path", "save_hf",
           "unembedding"]
