"""Log-probabilities of labels under a language model's outputs.

From full logits (:func:`token_logps`, :func:`sequence_logps`) or, without
ever forming the [B, T, V] logits, from final hidden states and the output
matrix in chunks of tokens (:func:`chunked_token_logps` and its relatives,
with a custom VJP that takes the gradient rows from the forward logits).
Pure, jit- and vmap-able; nothing here knows about models, meshes or data.

Dimension names (``hidden_QxCxD``: Q chunks of C tokens) as listed in
:mod:`bfpo_jax`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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

  w_QvxDxVc = _pad_axis(unembedding_DxV, 1, vocab_chunk_size).reshape(
      unembedding_DxV.shape[0], -1, vocab_chunk_size).transpose(1, 0, 2)

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
      body, init, (jnp.arange(w_QvxDxVc.shape[0]), w_QvxDxVc))
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
def _chunked_logps(unembedding_DxV, hidden_QxCxD, labels_QxC, needed_Q,
                   vocab_chunk_size):
  """[Q, C] log-probs of Q chunks of C tokens; chunks not needed give 0."""
  return _map_chunks(
      lambda h, y, n: _chunk_logps_or_zeros(h, unembedding_DxV, y, n,
                                            vocab_chunk_size),
      hidden_QxCxD, labels_QxC, needed_Q)


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
  w_DxV, labels_QxC, needed_Q = unembedding.value, labels.value, needed.value

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
    logps_QxC, grad_QxCxD = _map_chunks(logps_and_grad, hidden.value,
                                        labels_QxC, needed_Q)
  else:
    logps_QxC = _chunked_logps(w_DxV, hidden.value, labels_QxC, needed_Q,
                               vocab_chunk_size)
    grad_QxCxD = None
  # The unembedding's gradient needs the hidden states back.
  for_w = ((w_DxV, hidden.value, labels_QxC, needed_Q)
           if unembedding.perturbed else None)
  return logps_QxC, (grad_QxCxD, for_w)


def _chunked_logps_bwd(vocab_chunk_size, residuals, g_QxC):
  grad_QxCxD, for_w = residuals
  if isinstance(g_QxC, jax.custom_derivatives.SymbolicZero):
    g_QxC = jnp.zeros(g_QxC.shape, jnp.float32)
  d_hidden = None
  if grad_QxCxD is not None:
    d_hidden = (g_QxC[..., None] * grad_QxCxD).astype(grad_QxCxD.dtype)
  d_w = None
  if for_w is not None:
    w_DxV, hidden_QxCxD, labels_QxC, needed_Q = for_w

    def accumulate(total_DxV, inputs):
      hidden_CxD, labels_C, needed, g_C = inputs
      _, vjp = jax.vjp(
          lambda w: _chunk_logps_or_zeros(hidden_CxD, w, labels_C, needed,
                                          vocab_chunk_size), w_DxV)
      return total_DxV + vjp(g_C)[0].astype(jnp.float32), None

    d_w, _ = jax.lax.scan(accumulate, jnp.zeros(w_DxV.shape, jnp.float32),
                          (hidden_QxCxD, labels_QxC, needed_Q, g_QxC))
    d_w = d_w.astype(w_DxV.dtype)
  return d_w, d_hidden, None, None


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd,
                      symbolic_zeros=True)


def _to_chunks(hidden, labels, mask, chunk_size, vocab):
  """[B, T] rows flattened into Q chunks of C tokens (padded up), and which
  chunks hold a masked-in token."""
  b, t, d = hidden.shape
  hidden_UxD = _pad_axis(hidden.reshape(b * t, d), 0, chunk_size)
  labels_U = _pad_axis(jnp.clip(labels.reshape(b * t), 0, vocab - 1), 0,
                       chunk_size)
  n_chunks = hidden_UxD.shape[0] // chunk_size
  if mask is None:
    needed_Q = jnp.ones((n_chunks,), bool)
  else:
    needed_Q = _pad_axis(mask.reshape(b * t).astype(bool), 0, chunk_size
                         ).reshape(n_chunks, chunk_size).any(axis=1)
  return (hidden_UxD.reshape(n_chunks, chunk_size, d),
          labels_U.reshape(n_chunks, chunk_size), needed_Q)


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
  hidden_QxCxD, labels_QxC, needed_Q = _to_chunks(
      hidden, labels, mask, chunk_size, unembedding.shape[1])
  with jax.named_scope("logps"):
    logps_QxC = _chunked_logps(unembedding, hidden_QxCxD, labels_QxC, needed_Q,
                               vocab_chunk_size)
  return logps_QxC.reshape(-1)[: b * t].reshape(b, t)


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
    logps_QxC, greedy_QxC = _map_chunks(one_chunk, *chunks)
  flat = lambda x: x.reshape(-1)[: b * t].reshape(b, t)  # noqa: E731
  return flat(logps_QxC), flat(greedy_QxC)


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
  mask_U = loss_mask.reshape(b * t).astype(bool)
  order_U = jnp.argsort(~mask_U, stable=True)  # response tokens first
  hidden_UxD = hidden.reshape(b * t, d)[order_U]
  mask_U = mask_U[order_U]
  logps_U = chunked_token_logps(
      hidden_UxD[None], unembedding, labels.reshape(b * t)[order_U][None],
      chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
      mask=mask_U[None])[0]
  # Each response token's (row, slot, side) as one id; others add zeros.
  row_U = jnp.arange(b * t)[order_U] // t
  slot_U = jnp.clip(segment_ids.reshape(b * t)[order_U] - 1, 0, num_slots - 1)
  side_U = jnp.clip(branch_ids.reshape(b * t)[order_U] - 1, 0, 1)
  ids_U = (row_U * num_slots + slot_U) * 2 + side_U
  weight_U = mask_U.astype(jnp.float32)

  def per_pair(values_U):
    sums = jax.ops.segment_sum(values_U * weight_U, ids_U,
                               num_segments=b * num_slots * 2)
    return sums.reshape(b, num_slots, 2)

  counts_BxMx2 = jnp.maximum(per_pair(jnp.ones_like(weight_U)), 1.0)
  logps_BxMx2 = per_pair(logps_U)
  if average:
    logps_BxMx2 = logps_BxMx2 / counts_BxMx2
  out = (logps_BxMx2[..., 0], logps_BxMx2[..., 1])
  if not with_logits:
    return out
  logits_BxMx2 = per_pair(_token_mean_logits(
      jax.lax.stop_gradient(hidden_UxD), unembedding)) / counts_BxMx2
  return out, (logits_BxMx2[..., 0], logits_BxMx2[..., 1])
