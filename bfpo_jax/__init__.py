"""Bi-Factorial Preference Optimization (BFPO) in JAX.

Dimension names. A tensor's name ends in its shape, one name per axis joined
by ``x`` (``hidden_BxTxD`` is [B, T, D]; docstrings write [B, T, D]). Each
name means one thing in every module:

  B   batch rows: sequences, preference pairs, or packed rows of several pairs
  T   tokens of a row (the queries, in attention)
  S   key/value tokens in attention (the KV cache's slots, when decoding)
  D   model width (``hidden_size``)
  V   vocabulary
  N   query heads
  K   key/value heads
  G   query heads per key/value head (N / K)
  H   head dim; H2 half of it (RoPE's frequencies)
  F   MLP width (``intermediate_size``)
  L   layers
  A   microbatches of one step (gradient accumulation)
  M   pair slots of a packed row
  U   the tokens of all rows on one flattened axis (B * T, padded up to a
      multiple of C where they are cut into chunks)
  C   tokens of one chunk: of the chunked log-probs, or a blockwise-attention
      tile
  Q   chunks of C tokens
  Vc  vocabulary entries of one vocabulary chunk; Qv vocabulary chunks
  R   rows of an evaluation batch (a line of one or more requests, a judged
      response, a request)
  P   prompt tokens (decoding)
  E   tokens generated after the prompt
  Y   scored tokens of an evaluation row (the continuation y of log p(y | x))
  J   candidates scored for one prompt: the synthetic experiment's four
      responses, SafeHelp-mini's answer and refusal templates, a judge's
      answer tokens
  1, 2  literal sizes: a broadcast axis; the chosen and rejected sides
"""

import logging

# transformers announces at import that PyTorch is missing. This package uses
# it for configs and tokenizers only, which need no PyTorch: the line is noise
# a user cannot act on. Its other messages pass.
logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in record.getMessage())
