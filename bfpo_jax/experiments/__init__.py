"""Experiments built on the bfpo_jax pipeline (SafeHelp-mini, SafeHelp-real)."""

import os


def quiet_and_cached(out: str) -> None:
  """An experiment CLI's process settings: orbax's per-save INFO lines off,
  and a JAX compilation cache in ``out`` (runs whose steps have the same
  shapes, such as one model's seeds or one stage's models, compile once)."""
  import jax
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(out), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
