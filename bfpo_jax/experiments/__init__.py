"""Experiments built on the bfpo_jax pipeline (SafeHelp-mini)."""
