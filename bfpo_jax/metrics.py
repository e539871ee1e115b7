"""One rule for combining metrics: sum the totals, sum the weights, divide once.

A step computes its metrics per microbatch; the accumulation scan stacks them,
data parallelism splits each microbatch over devices, and evaluation runs many
held-out batches. A mean of per-part means weighs the parts wrongly (a
microbatch with 3 pairs of a safety group counts as much as one with 30), so
every metric travels as a :class:`Metric` ``(total, weight)``: the sum of a
quantity and the sum of the weights it is a mean over. Combining sums both
fields; :func:`values` divides once at the end (Tunix's ``WeightedMetric``).

A weight of 0 marks a plain total (pair counts, trained tokens): it is summed
and never divided. A mean over an empty group has total 0 and weight 0, so it
reads 0, as a count of 0 does.

Example::

  stats = {"rewards/accuracy": metrics.mean(correct_B, weights_B),
           "count/safe_safe": metrics.total(in_group_B)}
  stats_A = ...  # stacked over microbatches or batches
  metrics.values(metrics.merge(stats_A))
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Metric(NamedTuple):
  """A quantity summed over examples and the weight it is a mean over."""

  total: jax.Array  # sum of value x weight (a plain total when weight == 0)
  weight: jax.Array  # sum of the weights; 0 for a plain total


def mean(x, weights) -> Metric:
  """The weighted mean of ``x`` as a summable :class:`Metric`."""
  weights = jnp.asarray(weights, jnp.float32)
  return Metric(jnp.sum(jnp.asarray(x, jnp.float32) * weights),
                jnp.sum(weights))


def total(x) -> Metric:
  """A plain total (counts, tokens): summed when combined, never divided."""
  return Metric(jnp.sum(jnp.asarray(x, jnp.float32)), jnp.zeros((), jnp.float32))


def merge(metrics_A, axis: int = 0):
  """Sums ``{name: Metric}`` stacked along ``axis`` (microbatches, batches)."""
  return jax.tree.map(lambda x: jnp.sum(x, axis=axis), metrics_A)


@jax.jit  # one dispatch, and no implicit host->device copy of constants
def values(metrics) -> dict:
  """``{name: total / weight}``; totals of weight 0 pass through."""
  out = {}
  for name, m in metrics.items():
    has_weight = m.weight > 0
    out[name] = jnp.where(has_weight,
                          m.total / jnp.where(has_weight, m.weight, 1.0),
                          m.total)
  return out
