"""Pure losses for SFT and preference optimisation: BFPO, DPO and IPO.

Nothing here knows about models, meshes or data: arrays in, ``(loss, metrics)``
out. Every function is jit- and vmap-able and keeps no state.

BFPO is Bi-Factorial Preference Optimization (Zhang, Torr, Elhoseiny, Bibi,
ICLR 2025, arXiv:2408.15313). Log-probabilities are summed over response tokens
by default, as in the paper's code; averaging is an option of the log-prob
functions.

The log-prob functions live in :mod:`bfpo_jax.logprobs`; they are imported
here too, so ``from bfpo_jax.losses import chunked_sequence_logps`` (and
``losses.token_logps``, ``losses.sequence_logps``, ...) keep working.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bfpo_jax import metrics as metrics_lib
from bfpo_jax.logprobs import (
    chunked_sequence_logps,
    chunked_token_logps,
    chunked_token_logps_and_greedy,
    mean_logits,
    packed_pair_logps,
    sequence_logps,
    token_logps,
)

# The log-prob functions are re-exported: this was their import path.
__all__ = [
    "SAFETY_GROUPS",
    "bfpo_loss",
    "bfpo_target",
    "chunked_sequence_logps",
    "chunked_token_logps",
    "chunked_token_logps_and_greedy",
    "dpo_loss",
    "ipo_loss",
    "mean_logits",
    "packed_pair_logps",
    "preference_metrics",
    "preference_stats",
    "sequence_logps",
    "sft_loss",
    "sft_loss_from_token_logps",
    "token_logps",
]

SAFETY_GROUPS = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")
"""Names of the four (chosen_is_safe, rejected_is_safe) groups, in metric keys."""


# --------------------------------------------------------------------------- #
# Preference losses
# --------------------------------------------------------------------------- #


def _weighted_mean(x, weights):
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def _as_weights(weights, like):
  if weights is None:
    return jnp.ones_like(like, dtype=jnp.float32)
  return jnp.asarray(weights, jnp.float32)


def preference_stats(chosen_rewards, rejected_rewards, weights,
                     chosen_is_safe=None, rejected_is_safe=None):
  """Reward metrics of a batch of pairs as summable ``(total, weight)`` pairs.

  Each mean is a :class:`bfpo_jax.metrics.Metric` over the pairs it covers,
  so batches combine by summing (:func:`bfpo_jax.metrics.merge`) and divide
  once (:func:`bfpo_jax.metrics.values`); ``count/<group>`` are plain totals.
  Arguments as :func:`preference_metrics`.
  """
  margins = chosen_rewards - rejected_rewards
  correct = (chosen_rewards > rejected_rewards).astype(jnp.float32)
  stats = {
      "rewards/chosen": metrics_lib.mean(chosen_rewards, weights),
      "rewards/rejected": metrics_lib.mean(rejected_rewards, weights),
      "rewards/margins": metrics_lib.mean(margins, weights),
      "rewards/accuracy": metrics_lib.mean(correct, weights),
  }
  if chosen_is_safe is None or rejected_is_safe is None:
    return stats
  chosen_safe = jnp.asarray(chosen_is_safe).astype(bool)
  rejected_safe = jnp.asarray(rejected_is_safe).astype(bool)
  for name, (want_chosen, want_rejected) in zip(
      SAFETY_GROUPS, ((True, True), (True, False), (False, True),
                      (False, False))):
    in_group = (chosen_safe == want_chosen) & (rejected_safe == want_rejected)
    group_weights = jnp.where(in_group, weights, 0.0)
    stats[f"count/{name}"] = metrics_lib.total(group_weights > 0)
    stats[f"rewards/accuracy/{name}"] = metrics_lib.mean(correct, group_weights)
    stats[f"rewards/margins/{name}"] = metrics_lib.mean(margins, group_weights)
  for name, want in (("safe", True), ("unsafe", False)):
    stats[f"rewards/chosen/{name}"] = metrics_lib.mean(
        chosen_rewards, jnp.where(chosen_safe == want, weights, 0.0))
  return stats


def preference_metrics(chosen_rewards, rejected_rewards, weights,
                       chosen_is_safe=None, rejected_is_safe=None):
  """Reward metrics of a batch of pairs, overall and per safety group.

  Per-group values are means over the pairs of that group (weighted); a group
  with no pairs reports 0 and ``count == 0``. To combine many batches, use
  :func:`preference_stats` (sums and weights) instead of averaging these.
  ``rewards/chosen/safe`` and ``rewards/chosen/unsafe`` split the chosen
  reward by the chosen response's safety: the reference's
  ``safe_rewards``/``unsafe_rewards``, which index rows with the 0/1 flags as
  integers (rows 0 and 1, not the safe ones) -- a bug not copied here.

  Args:
    chosen_rewards: [B] implicit rewards of the chosen responses.
    rejected_rewards: [B] implicit rewards of the rejected responses.
    weights: [B] float pair weights (0 for padding).
    chosen_is_safe: optional [B] safety flags of chosen responses.
    rejected_is_safe: optional [B] safety flags of rejected responses.

  Returns:
    dict of float32 scalars.
  """
  return metrics_lib.values(preference_stats(
      chosen_rewards, rejected_rewards, weights, chosen_is_safe,
      rejected_is_safe))


def _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                      reference_chosen_logps, reference_rejected_logps, beta):
  chosen_logratios = (policy_chosen_logps.astype(jnp.float32)
                      - reference_chosen_logps.astype(jnp.float32))
  rejected_logratios = (policy_rejected_logps.astype(jnp.float32)
                        - reference_rejected_logps.astype(jnp.float32))
  logits = chosen_logratios - rejected_logratios
  return logits, beta * chosen_logratios, beta * rejected_logratios


def _pair_loss(per_pair, chosen_rewards, rejected_rewards, weights,
               chosen_is_safe, rejected_is_safe, reduce):
  """Weighted mean of per-pair losses, with the reward metrics."""
  stats = preference_stats(chosen_rewards, rejected_rewards, weights,
                           chosen_is_safe, rejected_is_safe)
  stats["loss"] = metrics_lib.mean(per_pair, weights)
  return _weighted_mean(per_pair, weights), (
      metrics_lib.values(stats) if reduce else stats)


def bfpo_target(chosen_is_safe, rejected_is_safe, *, beta=0.01, alpha=0.5,
                b1=3.0):
  """BFPO labeling function divided by beta (paper eq. 9, Sec. 3.3).

  ``target = (b1 * b3 * s_w - b3 * s_l - alpha) / beta`` with
  ``b3 = 1 / (b1 - 1)``. With the defaults, ``beta * target`` is +0.5 for
  (safe, safe), +1.0 for (safe, unsafe), -1.0 for (unsafe, safe) and -0.5 for
  (unsafe, unsafe), which encodes the global ranking
  helpful-safe > unhelpful-safe > unhelpful-unsafe > helpful-unsafe.

  Args:
    chosen_is_safe: [B] flags s_w (bool or 0/1) of the more helpful response.
    rejected_is_safe: [B] flags s_l of the less helpful response.
    beta: KL strength (tau in the paper).
    alpha: shift of the labeling function.
    b1: scale of the chosen response's safety; must not be 1.

  Returns:
    [B] float32 targets for the log-ratio difference.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from bfpo_jax.losses import bfpo_target
    >>> # (s_w, s_l): (safe, safe), (safe, unsafe), (unsafe, safe), (unsafe, unsafe)
    >>> s_w, s_l = jnp.array([1, 1, 0, 0]), jnp.array([1, 0, 1, 0])
    >>> target = bfpo_target(s_w, s_l)  # beta 0.01, alpha 0.5, b1 3 (b3 0.5)
    >>> print(np.round(target, 2))
    [  50.  100. -100.  -50.]
    >>> print(np.round(0.01 * target, 4))  # beta * target
    [ 0.5  1.  -1.  -0.5]
  """
  if b1 == 1.0:
    raise ValueError("bfpo_target: b1 must differ from 1 (b3 = 1 / (b1 - 1)).")
  b3 = 1.0 / (b1 - 1.0)
  s_w = jnp.asarray(chosen_is_safe).astype(jnp.float32)
  s_l = jnp.asarray(rejected_is_safe).astype(jnp.float32)
  return (b1 * b3 * s_w - b3 * s_l - alpha) / beta


def bfpo_loss(policy_chosen_logps, policy_rejected_logps,
              reference_chosen_logps, reference_rejected_logps,
              chosen_is_safe, rejected_is_safe, *, beta=0.01, alpha=0.5,
              b1=3.0, weights=None, reduce=True):
  """Bi-Factorial Preference Optimization loss (arXiv:2408.15313, eq. 10).

  ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`` and
  ``loss = mean_pairs (h - bfpo_target(s_w, s_l))^2``: a supervised regression
  of the log-ratio margin onto a target set by the safety of both responses,
  whose optimum equals RLHF with the bi-factorial reward.

  Args:
    policy_chosen_logps: [B] summed log-probs of y_w under the policy.
    policy_rejected_logps: [B] summed log-probs of y_l under the policy.
    reference_chosen_logps: [B] the same under the frozen reference.
    reference_rejected_logps: [B] the same under the frozen reference.
    chosen_is_safe: [B] safety flag s_w of the chosen (more helpful) response.
    rejected_is_safe: [B] safety flag s_l of the rejected response.
    beta: KL strength (tau in the paper); default 0.01 as in the paper.
    alpha: labeling-function shift; default 0.5.
    b1: labeling-function scale; default 3 (b3 = 0.5).
    weights: optional [B] pair weights; 0 masks a padded pair. The loss is the
      weighted mean.
    reduce: False returns the metrics as summable
      :class:`bfpo_jax.metrics.Metric` ``(total, weight)`` pairs (see
      :mod:`bfpo_jax.metrics`), to combine over microbatches or batches.

  Returns:
    ``(loss, metrics)``: scalar float32 loss and a dict of reward metrics
    (overall and per (s_w, s_l) group, see :func:`preference_metrics`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from bfpo_jax.losses import bfpo_loss, bfpo_target
    >>> s_w, s_l = jnp.array([1, 1, 0, 0]), jnp.array([1, 0, 1, 0])
    >>> chosen, rejected = jnp.array([-12.0, -7.5, -30.0, -4.0]), jnp.full(4, -9.0)
    >>> # Policy == reference: h = 0, so the loss is mean(target^2).
    >>> loss, metrics = bfpo_loss(chosen, rejected, chosen, rejected, s_w, s_l)
    >>> print(f"{loss:.1f}")
    6250.0
    >>> print(f"{jnp.mean(bfpo_target(s_w, s_l) ** 2):.1f}")  # (50^2 + 100^2) / 2
    6250.0
    >>> # Each log-ratio margin at its target: the loss is 0.
    >>> target = bfpo_target(s_w, s_l)
    >>> loss, _ = bfpo_loss(chosen + target, rejected, chosen, rejected, s_w, s_l)
    >>> print(f"{loss:.4f}")
    0.0000
  """
  logits, chosen_rewards, rejected_rewards = _implicit_rewards(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps, beta)
  target = bfpo_target(chosen_is_safe, rejected_is_safe, beta=beta,
                       alpha=alpha, b1=b1)
  return _pair_loss(jnp.square(logits - target), chosen_rewards,
                    rejected_rewards, _as_weights(weights, logits),
                    chosen_is_safe, rejected_is_safe, reduce)


def dpo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps, *, beta=0.1,
             label_smoothing=0.0, weights=None, chosen_is_safe=None,
             rejected_is_safe=None, reduce=True):
  """Direct Preference Optimization, sigmoid form (Rafailov et al., 2023).

  ``loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` with
  ``h`` the log-ratio margin as in :func:`bfpo_loss` and ``eps`` the label
  smoothing (conservative DPO). Beta multiplies ``h`` exactly once.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps: [B] sequence log-probs.
    beta: KL strength; default 0.1 as in trl.
    label_smoothing: probability that a label is flipped, in [0, 0.5].
    weights: optional [B] pair weights; 0 masks padding.
    chosen_is_safe, rejected_is_safe: optional [B] flags, only used to split
      metrics by safety group.
    reduce: False returns the metrics as summable
      :class:`bfpo_jax.metrics.Metric` ``(total, weight)`` pairs (see
      :mod:`bfpo_jax.metrics`), to combine over microbatches or batches.

  Returns:
    ``(loss, metrics)``.
  """
  logits, chosen_rewards, rejected_rewards = _implicit_rewards(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps, beta)
  per_pair = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
  return _pair_loss(per_pair, chosen_rewards, rejected_rewards,
                    _as_weights(weights, logits), chosen_is_safe,
                    rejected_is_safe, reduce)


def ipo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps, *, beta=0.1,
             weights=None, chosen_is_safe=None, rejected_is_safe=None,
             reduce=True):
  """Identity Preference Optimization (Azar et al., 2023, eq. 17).

  ``loss = mean_pairs (h - 1 / (2 beta))^2``. The IPO paper uses
  length-averaged log-probs; pass them in (``average=True`` upstream) to match.

  Args:
    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps: [B] sequence log-probs.
    beta: regularisation strength (tau in the IPO paper).
    weights: optional [B] pair weights; 0 masks padding.
    chosen_is_safe, rejected_is_safe: optional flags for grouped metrics.
    reduce: False returns the metrics as summable
      :class:`bfpo_jax.metrics.Metric` ``(total, weight)`` pairs (see
      :mod:`bfpo_jax.metrics`), to combine over microbatches or batches.

  Returns:
    ``(loss, metrics)``.
  """
  logits, chosen_rewards, rejected_rewards = _implicit_rewards(
      policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps, beta)
  return _pair_loss(jnp.square(logits - 1.0 / (2.0 * beta)), chosen_rewards,
                    rejected_rewards, _as_weights(weights, logits),
                    chosen_is_safe, rejected_is_safe, reduce)


# --------------------------------------------------------------------------- #
# Supervised fine-tuning
# --------------------------------------------------------------------------- #


def sft_loss_from_token_logps(token_logps_BxT, loss_mask, *, reduce=True):
  """Mean negative log-likelihood over the unmasked tokens of a batch.

  Args:
    token_logps_BxT: [B, T] per-token log-probs (e.g. from
      :func:`chunked_token_logps`).
    loss_mask: [B, T] True on target tokens.
    reduce: False returns the metrics as summable ``(total, weight)`` pairs
      (see :mod:`bfpo_jax.metrics`).

  Returns:
    ``(loss, metrics)`` with ``loss`` = sum(-logp * mask) / sum(mask) and
    ``metrics['tokens']`` the number of target tokens.
  """
  mask_BxT = loss_mask.astype(jnp.float32)
  n_tokens = jnp.sum(mask_BxT)
  loss = -jnp.sum(token_logps_BxT * mask_BxT) / jnp.maximum(n_tokens, 1.0)
  stats = {"loss": metrics_lib.mean(-token_logps_BxT, mask_BxT),
           "tokens": metrics_lib.total(n_tokens)}
  return loss, metrics_lib.values(stats) if reduce else stats


def sft_loss(logits, labels, loss_mask):
  """Token-level negative log-likelihood of the target response.

  Args:
    logits: [B, T, V] logits aligned with labels.
    labels: [B, T] token ids.
    loss_mask: [B, T] True on target (response) tokens.

  Returns:
    ``(loss, metrics)``: the mean NLL per target token, and the token count.
  """
  return sft_loss_from_token_logps(token_logps(logits, labels), loss_mask)
