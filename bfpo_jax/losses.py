"""Pure losses for SFT and preference optimisation: BFPO, DPO and IPO.

Nothing here knows about models, meshes or data: arrays in, ``(loss, metrics)``
out. Every function is jit- and vmap-able and keeps no state.

Dimension names used in suffixes: B batch (pairs or sequences), T tokens,
V vocabulary, D model width, C a chunk of tokens, Vc a chunk of the vocabulary.

BFPO is Bi-Factorial Preference Optimization (Zhang, Torr, Elhoseiny, Bibi,
ICLR 2025, arXiv:2408.15313). Log-probabilities are summed over response tokens
by default, as in the paper's code; averaging is an option of the log-prob
functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bfpo_jax import metrics as metrics_lib

SAFETY_GROUPS = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")
"""Names of the four (chosen_is_safe, rejected_is_safe) groups, in metric keys."""


# --------------------------------------------------------------------------- #
# Log-probabilities
# --------------------------------------------------------------------------- #


def token_logps(logits, labels):
  """Log-probability of each label under its logits, in float32.

  Args:
    logits: [B, T, V] logits, already aligned with ``labels``.
    labels: [B, T] integer token ids. Values outside [0, V) (e.g. -100) give
      garbage at that position and must be masked by the caller.

  Returns:
    [B, T] float32 log-probabilities.
  """
  logits_BxTxV = logits.astype(jnp.float32)
  labels_BxT = jnp.clip(labels, 0, logits.shape[-1] - 1)
  label_logits_BxT = jnp.take_along_axis(
      logits_BxTxV, labels_BxT[..., None], axis=-1)[..., 0]
  return label_logits_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def _reduce_sequence(token_logps_BxT, loss_mask, average):
  mask_BxT = loss_mask.astype(jnp.float32)
  summed_B = jnp.sum(token_logps_BxT * mask_BxT, axis=-1)
  if average:
    return summed_B / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0)
  return summed_B


def sequence_logps(logits, labels, loss_mask, *, average=False):
  """Per-sequence log-probability of ``labels`` under ``logits``.

  ``log p(y|x) = sum_t mask_t * log softmax(logits_t)[labels_t]``, or that sum
  divided by the number of unmasked tokens when ``average`` is True.

  Args:
    logits: [B, T, V] logits aligned with labels (position t predicts
      ``labels[:, t]``).
    labels: [B, T] token ids.
    loss_mask: [B, T] bool or 0/1; True on response tokens.
    average: divide by the number of response tokens instead of summing.

  Returns:
    [B] float32 log-probabilities.
  """
  return _reduce_sequence(token_logps(logits, labels), loss_mask, average)


def _pad_axis(x, axis, multiple, value=0):
  size = x.shape[axis]
  pad = (-size) % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _chunk_token_logps(hidden_CxD, unembedding_DxV, labels_C, vocab_chunk_size,
                       with_greedy=False):
  """Log-probs of C tokens, with a streaming logsumexp over vocabulary chunks.

  With ``with_greedy``, also [C] bool: whether each label is the argmax (the
  first maximal index, as ``argmax`` picks).
  """
  vocab = unembedding_DxV.shape[1]

  def logits_of(w_DxVc):
    return jnp.dot(hidden_CxD, w_DxVc, preferred_element_type=jnp.float32)

  if vocab_chunk_size is None or vocab_chunk_size >= vocab:
    logits_CxV = logits_of(unembedding_DxV)
    label_logit_C = jnp.take_along_axis(
        logits_CxV, labels_C[:, None], axis=-1)[:, 0]
    logps_C = label_logit_C - jax.nn.logsumexp(logits_CxV, axis=-1)
    if with_greedy:
      return logps_C, jnp.argmax(logits_CxV, axis=-1) == labels_C
    return logps_C

  w_DxVp = _pad_axis(unembedding_DxV, 1, vocab_chunk_size)
  n_chunks = w_DxVp.shape[1] // vocab_chunk_size
  w_NxDxVc = w_DxVp.reshape(
      w_DxVp.shape[0], n_chunks, vocab_chunk_size).transpose(1, 0, 2)

  def body(carry, inputs):
    running_max_C, running_sum_C, label_logit_C, argmax_C = carry
    index, w_DxVc = inputs
    logits_CxVc = logits_of(w_DxVc)
    column_Vc = index * vocab_chunk_size + jnp.arange(vocab_chunk_size)
    logits_CxVc = jnp.where(column_Vc[None, :] < vocab, logits_CxVc, -jnp.inf)
    chunk_max_C = jnp.max(logits_CxVc, axis=-1)
    if with_greedy:  # strictly greater: an earlier chunk wins ties
      argmax_C = jnp.where(chunk_max_C > running_max_C,
                           index * vocab_chunk_size
                           + jnp.argmax(logits_CxVc, axis=-1), argmax_C)
    # The running max only stabilises the sum; its gradient cancels exactly.
    new_max_C = jax.lax.stop_gradient(jnp.maximum(running_max_C, chunk_max_C))
    running_sum_C = (running_sum_C * jnp.exp(running_max_C - new_max_C)
                     + jnp.sum(jnp.exp(logits_CxVc - new_max_C[:, None]), -1))
    local_C = labels_C - index * vocab_chunk_size
    in_chunk_C = (local_C >= 0) & (local_C < vocab_chunk_size)
    picked_C = jnp.take_along_axis(
        logits_CxVc, jnp.clip(local_C, 0, vocab_chunk_size - 1)[:, None],
        axis=-1)[:, 0]
    label_logit_C = label_logit_C + jnp.where(in_chunk_C, picked_C, 0.0)
    return (new_max_C, running_sum_C, label_logit_C, argmax_C), None

  c = hidden_CxD.shape[0]
  init = (jnp.full((c,), -jnp.inf, jnp.float32), jnp.zeros((c,), jnp.float32),
          jnp.zeros((c,), jnp.float32), jnp.zeros((c,), labels_C.dtype))
  (max_C, sum_C, label_logit_C, argmax_C), _ = jax.lax.scan(
      body, init, (jnp.arange(n_chunks), w_NxDxVc))
  logps_C = label_logit_C - (max_C + jnp.log(sum_C))
  if with_greedy:
    return logps_C, argmax_C == labels_C
  return logps_C


def _chunk_logps_or_zeros(hidden_CxD, unembedding_DxV, labels_C, needed,
                          vocab_chunk_size):
  """:func:`_chunk_token_logps`, or zeros without any work when not needed."""
  return jax.lax.cond(
      needed,
      lambda: _chunk_token_logps(hidden_CxD, unembedding_DxV, labels_C,
                                 vocab_chunk_size),
      lambda: jnp.zeros_like(labels_C, jnp.float32))


def _map_chunks(fn, *xs):
  """``fn`` over the leading (chunk) axis of ``xs`` in a ``lax.scan``."""
  _, ys = jax.lax.scan(lambda _, x: (None, fn(*x)), None, xs)
  return ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_logps(unembedding_DxV, hidden_KxCxD, labels_KxC, needed_K,
                   vocab_chunk_size):
  """[K, C] log-probs of K chunks of C tokens; chunks not needed give 0."""
  return _map_chunks(
      lambda h, y, n: _chunk_logps_or_zeros(h, unembedding_DxV, y, n,
                                            vocab_chunk_size),
      hidden_KxCxD, labels_KxC, needed_K)


def _chunked_logps_fwd(unembedding, hidden, labels, needed, vocab_chunk_size):
  """Log-probs and, from the same logits, d logp_t / d hidden_t per token.

  Token t's log-prob depends on hidden state t alone, so its gradient is one
  [D] row, ``w[:, y_t] - w @ softmax(h_t w)``, whatever the cotangent. It is
  taken while the chunk's logits exist; the backward pass then only scales
  it, instead of recomputing the logits as rematerialisation would: two
  unembedding matmuls per chunk instead of three. The unembedding's own
  gradient (only when it is trained) does need the logits again, and
  recomputes them chunk by chunk in the backward pass.
  """
  w_DxV, labels_KxC, needed_K = unembedding.value, labels.value, needed.value

  def logps_and_grad(hidden_CxD, labels_C, needed):
    def both():
      logps_C, vjp = jax.vjp(
          lambda h: _chunk_token_logps(h, w_DxV, labels_C, vocab_chunk_size),
          hidden_CxD)
      return logps_C, vjp(jnp.ones_like(logps_C))[0]
    return jax.lax.cond(
        needed, both,
        lambda: (jnp.zeros_like(labels_C, jnp.float32),
                 jnp.zeros_like(hidden_CxD)))

  if hidden.perturbed:
    logps_KxC, grad_KxCxD = _map_chunks(logps_and_grad, hidden.value,
                                        labels_KxC, needed_K)
  else:
    logps_KxC = _chunked_logps(w_DxV, hidden.value, labels_KxC, needed_K,
                               vocab_chunk_size)
    grad_KxCxD = None
  # The unembedding's gradient needs the hidden states back.
  for_w = ((w_DxV, hidden.value, labels_KxC, needed_K)
           if unembedding.perturbed else None)
  return logps_KxC, (grad_KxCxD, for_w)


def _chunked_logps_bwd(vocab_chunk_size, residuals, g_KxC):
  grad_KxCxD, for_w = residuals
  if isinstance(g_KxC, jax.custom_derivatives.SymbolicZero):
    g_KxC = jnp.zeros(g_KxC.shape, jnp.float32)
  d_hidden = None
  if grad_KxCxD is not None:
    d_hidden = (g_KxC[..., None] * grad_KxCxD).astype(grad_KxCxD.dtype)
  d_w = None
  if for_w is not None:
    w_DxV, hidden_KxCxD, labels_KxC, needed_K = for_w

    def accumulate(total_DxV, inputs):
      hidden_CxD, labels_C, needed, g_C = inputs
      _, vjp = jax.vjp(
          lambda w: _chunk_logps_or_zeros(hidden_CxD, w, labels_C, needed,
                                          vocab_chunk_size), w_DxV)
      return total_DxV + vjp(g_C)[0].astype(jnp.float32), None

    d_w, _ = jax.lax.scan(accumulate, jnp.zeros(w_DxV.shape, jnp.float32),
                          (hidden_KxCxD, labels_KxC, needed_K, g_KxC))
    d_w = d_w.astype(w_DxV.dtype)
  return d_w, d_hidden, None, None


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd,
                      symbolic_zeros=True)


def _to_chunks(hidden, labels, mask, chunk_size, vocab):
  """[B, T] rows flattened into K chunks of C tokens (padded up), and which
  chunks hold a masked-in token."""
  b, t, d = hidden.shape
  hidden_NxD = _pad_axis(hidden.reshape(b * t, d), 0, chunk_size)
  labels_N = _pad_axis(jnp.clip(labels.reshape(b * t), 0, vocab - 1), 0,
                       chunk_size)
  n_chunks = hidden_NxD.shape[0] // chunk_size
  if mask is None:
    needed_K = jnp.ones((n_chunks,), bool)
  else:
    needed_K = _pad_axis(mask.reshape(b * t).astype(bool), 0, chunk_size
                         ).reshape(n_chunks, chunk_size).any(axis=1)
  return (hidden_NxD.reshape(n_chunks, chunk_size, d),
          labels_N.reshape(n_chunks, chunk_size), needed_K)


def chunked_token_logps(hidden, unembedding, labels, *, chunk_size,
                        vocab_chunk_size=None, mask=None):
  """Per-token log-probs from final hidden states, never forming [B, T, V].

  Tokens are processed ``chunk_size`` at a time in a ``lax.scan``, so no pass
  holds more than one chunk's logits: [chunk_size, V], or
  [chunk_size, vocab_chunk_size] in the forward pass when the vocabulary is
  streamed too. The gradient with respect to ``hidden`` is formed in the
  forward pass from the same logits (one [D] row per token, kept until the
  backward pass), so differentiating costs one extra matmul per chunk rather
  than a recomputation plus a matmul. With ``mask``, a chunk holding no
  masked-in token (all prompt or padding) skips the unembedding altogether,
  forward and backward, and reports 0 there.

  Args:
    hidden: [B, T, D] final hidden states (after the last norm).
    unembedding: [D, V] output matrix (``lm_head`` or the tied embedding^T).
    labels: [B, T] token ids aligned with ``hidden``.
    chunk_size: tokens per chunk; B*T is padded up to a multiple of it.
    vocab_chunk_size: if set, stream the logsumexp over vocabulary chunks of
      this size as well.
    mask: optional [B, T]; positions outside it may be left at 0.

  Returns:
    [B, T] float32 log-probabilities.
  """
  b, t, _ = hidden.shape
  hidden_KxCxD, labels_KxC, needed_K = _to_chunks(
      hidden, labels, mask, chunk_size, unembedding.shape[1])
  with jax.named_scope("logps"):
    logps_KxC = _chunked_logps(unembedding, hidden_KxCxD, labels_KxC, needed_K,
                               vocab_chunk_size)
  return logps_KxC.reshape(-1)[: b * t].reshape(b, t)


def chunked_token_logps_and_greedy(hidden, unembedding, labels, *, chunk_size,
                                   vocab_chunk_size=None, mask=None):
  """:func:`chunked_token_logps`, plus whether each label is the argmax.

  For scoring (the lm-evaluation-harness's ``is_greedy``): the same chunks
  and the same skipping of chunks outside ``mask``, without the custom
  gradient of the training path.

  Args:
    hidden: [B, T, D] final hidden states.
    unembedding: [D, V] output matrix.
    labels: [B, T] token ids aligned with ``hidden``.
    chunk_size: tokens per chunk.
    vocab_chunk_size: optional vocabulary chunk for a streaming logsumexp.
    mask: optional [B, T]; positions outside it may read 0 / False.

  Returns:
    ``(logps [B, T] float32, greedy [B, T] bool)``; ``greedy`` is True where
    ``labels`` is the first index of the maximal logit.
  """
  b, t, _ = hidden.shape
  chunks = _to_chunks(hidden, labels, mask, chunk_size, unembedding.shape[1])

  def one_chunk(hidden_CxD, labels_C, needed):
    return jax.lax.cond(
        needed,
        lambda: _chunk_token_logps(hidden_CxD, unembedding, labels_C,
                                   vocab_chunk_size, with_greedy=True),
        lambda: (jnp.zeros_like(labels_C, jnp.float32),
                 jnp.zeros_like(labels_C, bool)))

  with jax.named_scope("logps"):
    logps_KxC, greedy_KxC = _map_chunks(one_chunk, *chunks)
  flat = lambda x: x.reshape(-1)[: b * t].reshape(b, t)  # noqa: E731
  return flat(logps_KxC), flat(greedy_KxC)


def chunked_sequence_logps(hidden, unembedding, labels, loss_mask, *,
                           chunk_size, average=False, vocab_chunk_size=None):
  """``sequence_logps(hidden @ unembedding, ...)`` without the [B, T, V] logits.

  Equal to :func:`sequence_logps` on the full logits within float32 rounding,
  gradients included; see :func:`chunked_token_logps` for the memory bound.

  Args:
    hidden: [B, T, D] final hidden states.
    unembedding: [D, V] output matrix.
    labels: [B, T] token ids aligned with ``hidden``.
    loss_mask: [B, T] True on response tokens.
    chunk_size: tokens per chunk.
    average: divide by the number of response tokens instead of summing.
    vocab_chunk_size: optional vocabulary chunk for a streaming logsumexp.

  Returns:
    [B] float32 log-probabilities.
  """
  logps_BxT = chunked_token_logps(hidden, unembedding, labels,
                                  chunk_size=chunk_size,
                                  vocab_chunk_size=vocab_chunk_size,
                                  mask=loss_mask)
  return _reduce_sequence(logps_BxT, loss_mask, average)


def mean_logits(hidden, unembedding, mask):
  """Per-sequence mean of the logits over the vocabulary and masked positions.

  The mean over the vocabulary of ``hidden @ unembedding`` is ``hidden``
  times the vocabulary-mean of the output matrix, so this costs one [D]
  product per token and never forms the logits. The reference logs the mean
  of all [B, T, V] logits of a side, padding and prompt included; this one
  covers the response positions only.

  Args:
    hidden: [B, T, D] final hidden states.
    unembedding: [D, V] output matrix.
    mask: [B, T] positions to average (the response's predicting positions).

  Returns:
    [B] float32 mean logits (0 for a row with no masked position).
  """
  logits_BxT = _token_mean_logits(hidden, unembedding)
  mask_BxT = mask.astype(jnp.float32)
  return (jnp.sum(logits_BxT * mask_BxT, axis=-1)
          / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0))


def _token_mean_logits(hidden, unembedding):
  mean_column_D = jnp.mean(unembedding.astype(jnp.float32), axis=1)
  return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), mean_column_D)


def packed_pair_logps(hidden, unembedding, labels, loss_mask, segment_ids,
                      branch_ids, *, num_slots, chunk_size, average=False,
                      vocab_chunk_size=None, with_logits=False):
  """Chosen and rejected log-probs of the pairs packed in rows.

  Rows hold several pairs (``data.packing``): a token belongs to pair slot
  ``segment_ids - 1`` of its row and to its chosen (``branch_ids == 1``) or
  rejected (2) response. The response tokens of all rows are gathered to
  the front before the chunked log-probs (:func:`chunked_token_logps`), so
  chunks of prompt and padding are skipped whatever their place in the rows;
  each pair's tokens are then summed (or averaged) per side.

  Args:
    hidden: [B, T, D] final hidden states; ``hidden[:, t]`` predicts
      ``labels[:, t]``.
    unembedding: [D, V] output matrix.
    labels: [B, T] token ids.
    loss_mask: [B, T] True on response tokens.
    segment_ids: [B, T] pair slot + 1 of each label token (0 = padding).
    branch_ids: [B, T] 1 chosen, 2 rejected (0 prompt) of each label token.
    num_slots: M, pair slots per row.
    chunk_size: tokens per log-prob chunk.
    average: divide by each response's token count instead of summing.
    vocab_chunk_size: optional vocabulary chunk for a streaming logsumexp.
    with_logits: also return each response's mean logit (see
      :func:`mean_logits`).

  Returns:
    ``(chosen, rejected)`` [B, M] float32 (0 in empty slots), and with
    ``with_logits`` ``((chosen, rejected), (chosen_logits,
    rejected_logits))``.
  """
  b, t, d = hidden.shape
  mask_N = loss_mask.reshape(b * t).astype(bool)
  order_N = jnp.argsort(~mask_N, stable=True)  # response tokens first
  hidden_NxD = hidden.reshape(b * t, d)[order_N]
  mask_N = mask_N[order_N]
  logps_N = chunked_token_logps(
      hidden_NxD[None], unembedding, labels.reshape(b * t)[order_N][None],
      chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
      mask=mask_N[None])[0]
  # Each response token's (row, slot, side) as one id; others add zeros.
  row_N = jnp.arange(b * t)[order_N] // t
  slot_N = jnp.clip(segment_ids.reshape(b * t)[order_N] - 1, 0, num_slots - 1)
  side_N = jnp.clip(branch_ids.reshape(b * t)[order_N] - 1, 0, 1)
  ids_N = (row_N * num_slots + slot_N) * 2 + side_N
  weight_N = mask_N.astype(jnp.float32)

  def per_pair(values_N):
    sums = jax.ops.segment_sum(values_N * weight_N, ids_N,
                               num_segments=b * num_slots * 2)
    return sums.reshape(b, num_slots, 2)

  counts_BxMx2 = jnp.maximum(per_pair(jnp.ones_like(weight_N)), 1.0)
  logps_BxMx2 = per_pair(logps_N)
  if average:
    logps_BxMx2 = logps_BxMx2 / counts_BxMx2
  out = (logps_BxMx2[..., 0], logps_BxMx2[..., 1])
  if not with_logits:
    return out
  logits_BxMx2 = per_pair(_token_mean_logits(
      jax.lax.stop_gradient(hidden_NxD), unembedding)) / counts_BxMx2
  return out, (logits_BxMx2[..., 0], logits_BxMx2[..., 1])


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
