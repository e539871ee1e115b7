"""Log-probs (full and chunked) against hand-computed values and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfpo_jax import logprobs


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mean_logits_equals_the_mean_of_the_full_logits():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  w = rng.normal(size=(4, 7)).astype(np.float32)
  mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  logits = hidden @ w  # [B, T, V], formed here only
  expected = [logits[0, 1:3].mean(), logits[1].mean(), 0.0]
  np.testing.assert_allclose(logprobs.mean_logits(hidden, w, mask), expected,
                             rtol=1e-5, atol=1e-6)


def _random_lm_batch(seed, b=3, t=7, d=16, v=50, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(b, t, d)).astype(dtype)
  w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(dtype)
  labels = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = rng.random((b, t)) < 0.7
  return hidden, w, labels, mask


def test_sequence_logps_hand_computed():
  hidden, w, labels, mask = _random_lm_batch(0)
  logits = hidden @ w
  logp = _np_log_softmax(logits.astype(np.float64))
  per_token = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  expected_sum = (per_token * mask).sum(-1)
  expected_avg = expected_sum / mask.sum(-1)
  np.testing.assert_allclose(logprobs.sequence_logps(logits, labels, mask),
                             expected_sum, rtol=1e-5)
  np.testing.assert_allclose(
      logprobs.sequence_logps(logits, labels, mask, average=True), expected_avg,
      rtol=1e-5)


def test_masked_positions_may_hold_ignore_index():
  hidden, w, labels, mask = _random_lm_batch(1)
  ignored = np.where(mask, labels, -100)
  logits = hidden @ w
  np.testing.assert_allclose(logprobs.sequence_logps(logits, ignored, mask),
                             logprobs.sequence_logps(logits, labels, mask),
                             rtol=1e-6)
  np.testing.assert_allclose(
      logprobs.chunked_sequence_logps(hidden, w, ignored, mask, chunk_size=4),
      logprobs.sequence_logps(logits, labels, mask), rtol=1e-5)


@pytest.mark.parametrize("chunk_size,vocab_chunk_size",
                         [(4, None), (21, None), (5, 16), (64, 7), (3, 50)])
@pytest.mark.parametrize("average", [False, True])
def test_chunked_equals_full_with_gradients(chunk_size, vocab_chunk_size,
                                            average):
  hidden, w, labels, mask = _random_lm_batch(2)

  def full(h, w):
    return logprobs.sequence_logps(jnp.einsum("btd,dv->btv", h, w), labels, mask,
                                   average=average)

  def chunked(h, w):
    return logprobs.chunked_sequence_logps(h, w, labels, mask,
                                           chunk_size=chunk_size,
                                           vocab_chunk_size=vocab_chunk_size,
                                           average=average)

  np.testing.assert_allclose(chunked(hidden, w), full(hidden, w), atol=1e-5,
                             rtol=1e-5)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=hidden.shape[0]),
                    jnp.float32)
  g_full = jax.grad(lambda h, w: jnp.dot(full(h, w), cot), (0, 1))(hidden, w)
  g_chunk = jax.jit(jax.grad(lambda h, w: jnp.dot(chunked(h, w), cot),
                             (0, 1)))(hidden, w)
  for a, b in zip(g_chunk, g_full):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_never_forms_full_logits():
  b, t, d, v, chunk = 2, 64, 8, 1000, 16
  hidden, w, labels, mask = _random_lm_batch(4, b, t, d, v)

  def loss(h, w):
    return jnp.sum(logprobs.chunked_sequence_logps(h, w, labels, mask,
                                                   chunk_size=chunk))

  jaxpr = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(hidden, w))
  assert f"{b},{t},{v}]" not in jaxpr and f"{b * t},{v}]" not in jaxpr
  assert f"{chunk},{v}]" in jaxpr


@pytest.mark.parametrize("vocab_chunk_size", [None, 16])
def test_chunked_gradient_of_hidden_alone_and_of_unembedding_alone(
    vocab_chunk_size):
  # The custom VJP takes different paths when only one input is differentiated
  # (a frozen output matrix is the usual case); each must match autodiff.
  hidden, w, labels, mask = _random_lm_batch(7)
  chunked = lambda h, w: jnp.sum(logprobs.chunked_sequence_logps(  # noqa: E731
      h, w, labels, mask, chunk_size=5, vocab_chunk_size=vocab_chunk_size))
  full = lambda h, w: jnp.sum(logprobs.sequence_logps(  # noqa: E731
      jnp.einsum("btd,dv->btv", h, w), labels, mask))
  for argnum in (0, 1):
    np.testing.assert_allclose(jax.grad(chunked, argnum)(hidden, w),
                               jax.grad(full, argnum)(hidden, w), atol=1e-5)


def _count_logit_matmuls(jaxpr, vocab):
  """dot_generals producing [..., vocab] outputs, sub-jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1:] == (
        vocab,):
      count += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_logit_matmuls(inner, vocab)
  return count


def test_chunked_backward_does_not_recompute_logits():
  hidden, w, labels, mask = _random_lm_batch(8, v=97)
  loss = lambda h: jnp.sum(logprobs.chunked_sequence_logps(  # noqa: E731
      h, w, labels, mask, chunk_size=4))
  # Forward only: one logits matmul (in the scan body). With the gradient of
  # the hidden states: still one, since the gradient rows come from the same
  # logits; rematerialisation would make it two.
  assert _count_logit_matmuls(jax.make_jaxpr(loss)(hidden).jaxpr, 97) == 1
  assert _count_logit_matmuls(
      jax.make_jaxpr(jax.grad(loss))(hidden).jaxpr, 97) == 1


def test_chunked_gradient_in_bfloat16_tracks_float32():
  hidden, w, labels, mask = _random_lm_batch(9, d=32, v=200)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  grad = lambda h, w: jax.grad(lambda h: jnp.sum(  # noqa: E731
      logprobs.chunked_sequence_logps(h, w, labels, mask, chunk_size=8)))(h)
  g16 = grad(h16, w16)
  assert g16.dtype == jnp.bfloat16
  g32 = grad(jnp.asarray(h16, jnp.float32), jnp.asarray(w16, jnp.float32))
  err = np.abs(np.asarray(g16, np.float32) - np.asarray(g32))
  assert err.max() < 0.02 * np.abs(np.asarray(g32)).max()


def test_chunked_bf16_hidden_matches_float32_reference():
  hidden, w, labels, mask = _random_lm_batch(5)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  out = logprobs.chunked_sequence_logps(h16, w16, labels, mask, chunk_size=8)
  assert out.dtype == jnp.float32
  ref = logprobs.sequence_logps(
      np.asarray(h16, np.float32) @ np.asarray(w16, np.float32), labels, mask)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


def test_chunks_outside_the_mask_are_skipped_but_results_equal():
  hidden, w, labels, _ = _random_lm_batch(6, b=4, t=16)
  mask = np.zeros((4, 16), bool)
  mask[:, 8:] = True  # first half of every row is "prompt"
  mask[3] = False  # a fully padded row
  full = logprobs.sequence_logps(hidden @ w, labels, mask)
  chunked = logprobs.chunked_sequence_logps(hidden, w, labels, mask, chunk_size=8)
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda h: jnp.sum(logprobs.chunked_sequence_logps(
      h, w, labels, mask, chunk_size=8)))(hidden)
  grad_full = jax.grad(lambda h: jnp.sum(logprobs.sequence_logps(
      h @ w, labels, mask)))(hidden)
  np.testing.assert_allclose(grad, grad_full, atol=1e-5)
  # The skipped chunks really take the no-op branch: their per-token
  # log-probs are exactly zero although the labels there are real.
  per_token = logprobs.chunked_token_logps(hidden, w, labels, chunk_size=8,
                                           mask=mask)
  assert (np.asarray(per_token)[:, :8] == 0).all()
  assert (np.asarray(per_token)[:3, 8:] < 0).all()


@pytest.mark.parametrize("chunk_size,vocab_chunk_size",
                         [(4, None), (5, 16), (64, 7), (3, 50)])
def test_chunked_greedy_flags_equal_full_argmax(chunk_size, vocab_chunk_size):
  hidden, w, labels, mask = _random_lm_batch(5)
  logits = np.einsum("btd,dv->btv", hidden, w)
  argmax = logits.argmax(-1)
  # Half the labels are the argmax, so both flag values occur.
  labels = np.where(np.arange(labels.shape[1]) % 2 == 0, argmax, labels)
  logps, greedy = logprobs.chunked_token_logps_and_greedy(
      hidden, w, labels, chunk_size=chunk_size,
      vocab_chunk_size=vocab_chunk_size, mask=mask)
  expected = np.take_along_axis(_np_log_softmax(logits), labels[..., None],
                                -1)[..., 0]
  m = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(logps)[m], expected[m], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(greedy)[m], (argmax == labels)[m])
  assert np.asarray(greedy)[m].any() and not np.asarray(greedy)[m].all()
  np.testing.assert_allclose(
      logps * mask, logprobs.chunked_token_logps(
          hidden, w, labels, chunk_size=chunk_size,
          vocab_chunk_size=vocab_chunk_size, mask=mask) * mask, atol=1e-6)


def test_chunked_greedy_picks_the_first_of_tied_maxima():
  w = jnp.zeros((2, 12)).at[0, 3].set(1.0).at[0, 9].set(1.0)  # ties at 3, 9
  hidden = jnp.ones((1, 2, 2))
  for vocab_chunk_size in (None, 4):
    _, greedy = logprobs.chunked_token_logps_and_greedy(
        hidden, w, jnp.array([[3, 9]]), chunk_size=2,
        vocab_chunk_size=vocab_chunk_size)
    np.testing.assert_array_equal(greedy, [[True, False]])
