"""Which parameters train: one regex mask for full, selective and LoRA modes.

The mask (a bool pytree over the params, from :func:`trainable_mask`) splits
the params into a *trainable* tree and a *frozen* tree, each holding ``None``
where the other holds the leaf. Gradients are taken only with respect to the
trainable tree, so frozen weights cost neither gradient nor optimizer memory,
and the reference policy needs no second model:

* ``full``: every leaf trains; the reference is a copy of the initial params.
* ``selective``: leaves whose path matches a regex train (the paper: every
  block's ``mlp/down_proj``); the reference is the frozen tree plus a copy of
  the initial trainable leaves.
* ``lora``: low-rank adapters ``W + (alpha / r) A @ B`` on the kernels the regex
  matches; B starts at zero so the initial model is the base, and the
  reference is the base with adapters off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bfpo_jax.model.mistral import match_params

MODES = ("full", "selective", "lora")
PAPER_SELECTIVE_PATTERN = r"layers/\d+/mlp/down_proj/kernel$"
DEFAULT_LORA_PATTERN = r"self_attn/[qkvo]_proj/kernel$"
LORA_KEYS = ("lora_a", "lora_b")


def trainable_mask(params, mode: str, pattern: str | None = None):
  """Bool pytree: True on the leaves that train (or get LoRA adapters).

  Args:
    params: model params (arrays or ShapeDtypeStructs).
    mode: ``"full"``, ``"selective"`` or ``"lora"``.
    pattern: regex over paths like ``layers/3/mlp/down_proj/kernel``. Default
      for selective: every ``down_proj``; for lora: q/k/v/o projections.

  Returns:
    A pytree of Python bools shaped like ``params``.
  """
  if mode not in MODES:
    raise ValueError(f"trainable mode must be one of {MODES}, got {mode!r}")
  if mode == "full":
    return jax.tree.map(lambda _: True, params)
  if pattern is None:
    pattern = (PAPER_SELECTIVE_PATTERN if mode == "selective"
               else DEFAULT_LORA_PATTERN)
  mask = match_params(params, pattern)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"trainable pattern {pattern!r} matches no parameter")
  if mode == "lora":
    bad = [leaf.ndim for leaf, m in zip(jax.tree.leaves(params),
                                        jax.tree.leaves(mask)) if m and leaf.ndim != 2]
    if bad:
      raise ValueError(f"lora pattern {pattern!r} matches non-matrix leaves")
  return mask


def split(params, mask):
  """``(trainable, frozen)``: two trees shaped like params, None elsewhere."""
  trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
  frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
  return trainable, frozen


def combine(trainable, frozen):
  """Inverse of :func:`split`: the leaf from whichever tree holds one."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def init_lora(params, mask, rank: int, rng, dtype=jnp.float32):
  """Adapters for the masked kernels: ``{..., 'kernel': {'lora_a', 'lora_b'}}``.

  A [in, r] ~ N(0, 1/in) (Kaiming-like, as in PEFT) and B [r, out] = 0, so the
  adapted model starts equal to the base. Unmasked leaves are None.
  """
  leaves = jax.tree.leaves(params)
  keys = iter(jax.random.split(rng, len(leaves)))

  def adapter(m, w):
    if not m:
      return None
    d_in, d_out = w.shape
    a = jax.random.normal(next(keys), (d_in, rank), dtype) / jnp.sqrt(d_in)
    return {"lora_a": a, "lora_b": jnp.zeros((rank, d_out), dtype)}

  return jax.tree.map(adapter, mask, params)


def _is_adapter(x):
  return x is None or (isinstance(x, dict) and set(x) == set(LORA_KEYS))


def lora_merge(params, lora, scale: float):
  """Params with ``W + scale * A @ B`` wherever ``lora`` holds an adapter."""
  def merge(adapter, w):
    if adapter is None:
      return w
    delta = jnp.dot(adapter["lora_a"], adapter["lora_b"],
                    preferred_element_type=jnp.float32)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

  return jax.tree.map(merge, lora, params, is_leaf=_is_adapter)


def masked_optimizer(optimizer, mask):
  """``optimizer`` on the masked leaves of a full tree, zero updates elsewhere.

  For users who keep one full params tree in their own loop: frozen leaves get
  ``optax.set_to_zero`` and carry no optimizer state. (The step builders in
  :mod:`bfpo_jax.train_step` split the tree instead, which also saves the
  gradient memory.)
  """
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": optimizer,
                                "freeze": optax.set_to_zero()}, labels)


def tree_bytes(tree) -> int:
  """Bytes held by the array leaves of a pytree."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))
