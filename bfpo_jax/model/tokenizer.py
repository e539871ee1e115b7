"""Moved to :mod:`bfpo_jax.tokenizer`; this import path keeps working."""

from bfpo_jax.tokenizer import (  # noqa: F401
  MISTRAL_COMMON_TOKENIZER,
  load_tokenizer,
  mistral_tokenizer_dir,
)
