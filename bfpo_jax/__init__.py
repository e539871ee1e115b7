"""Bi-Factorial Preference Optimization (BFPO) in JAX."""

import logging

# transformers announces at import that PyTorch is missing. This package uses
# it for configs and tokenizers only, which need no PyTorch: the line is noise
# a user cannot act on. Its other messages pass.
logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())
