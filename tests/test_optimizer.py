"""Schedules and optimizers from config, against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bfpo_jax.optimizer import make_optimizer, make_schedule


def test_warmup_then_cosine():
  lr = make_schedule(1e-3, total_steps=100, warmup_ratio=0.1)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(5), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)
  # Half-way through the decay: (1 + cos(pi/2)) / 2 = 0.5 of the peak.
  np.testing.assert_allclose(lr(55), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 0.0, atol=1e-9)
  constant = make_schedule(1e-3, 100, 0.1, "constant")
  np.testing.assert_allclose(constant(80), 1e-3, rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    make_schedule(1e-3, 100, 0.1, "exp")


def test_warmup_steps_are_rounded_up_as_the_reference_counts_them():
  # transformers' Trainer: ceil(0.1 * 94) = 10 warmup steps (rounding: 9).
  lr = make_schedule(1.0, total_steps=94, warmup_ratio=0.1)
  np.testing.assert_allclose([lr(9), lr(10)], [0.9, 1.0], rtol=1e-6)
  # Then cosine over the remaining 84 steps, as get_cosine_schedule_with_warmup.
  np.testing.assert_allclose(lr(52), 0.5 * (1 + math.cos(math.pi * 42 / 84)),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_clipped_first_update(name):
  tx = make_optimizer(1.0, 10, name=name, warmup_ratio=0.0, schedule="constant",
                      clip_norm=1.0)
  params = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5 -> clipped to 1
  updates, _ = tx.update(grads, tx.init(params), params)
  if name == "adamw":  # first Adam step: -lr * sign(g) where g != 0
    np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], rtol=1e-4)
  else:  # RMSprop: -g / sqrt(0.1 g^2) on the clipped gradient
    np.testing.assert_allclose(updates["w"][:2], [-math.sqrt(10)] * 2, rtol=1e-4)
  assert isinstance(tx, optax.GradientTransformation)
