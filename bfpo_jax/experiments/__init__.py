"""Experiments built on the bfpo_jax pipeline (SafeHelp-mini, SafeHelp-real)."""

import json
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


def same_settings(out: str, wanted, other: str = "other settings") -> None:
  """Refuses an experiment's ``out`` folder whose ``settings.json`` holds
  anything but ``wanted`` (the run there was made with ``other``); writes
  ``wanted`` there otherwise, so each stage's cache belongs to one run."""
  from bfpo_jax.config import ConfigError

  path = os.path.join(out, "settings.json")
  wanted = json.loads(json.dumps(wanted))
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) != wanted:
        raise ConfigError(f"{out} holds a run with {other} (see {path}); use "
                          "another --out")
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(wanted, f, indent=2)
