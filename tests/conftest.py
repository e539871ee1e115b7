"""Suite-wide JAX guard (nanodo's practice): rank promotion raises.

A silent ``[B] + [B, 1]`` broadcast is a bug, not a convenience. The training
loops the tests run also refuse implicit host/device transfers
(``helpers.no_implicit_transfers``, big_vision's ``jax_transfer_guard``).
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
