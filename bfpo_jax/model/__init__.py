"""Flax Mistral: architecture, Hugging Face I/O, decoding and tokenizer."""

from bfpo_jax.model.config import MistralConfig
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

__all__ = ["MistralConfig", "abstract_params", "apply", "apply_hidden",
           "init_params", "logical_axes", "match_params", "param_path",
           "unembedding"]
