"""``python -m bfpo_jax``: the ``bfpo-jax`` command (:mod:`bfpo_jax.cli`)."""

from bfpo_jax.cli import entry_point

if __name__ == "__main__":
  entry_point()
