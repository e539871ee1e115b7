"""Evaluation on the JAX model through the lm-evaluation-harness.

``import bfpo_jax.evaluate`` registers the backend ``bfpo_jax``
(:class:`BfpoJaxLM`) with the harness's model registry;
``python -m bfpo_jax.evaluate`` runs harness tasks with it.
"""

# The harness fills its registry with its own backends only when it is empty;
# import them first, or registering ours would hide them (e.g. "hf").
import lm_eval.models  # noqa: F401

from bfpo_jax.evaluate.backend import BfpoJaxLM

__all__ = ["BfpoJaxLM"]
