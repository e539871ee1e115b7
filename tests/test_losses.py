"""Losses against hand-computed values, finite differences and each other."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfpo_jax import losses

# (s_w, s_l) -> beta * target, from the paper's labeling function with
# alpha = 0.5, b1 = 3, b3 = 0.5 computed by hand: b1*b3*s_w - b3*s_l - alpha.
HAND_TARGETS = {(1, 1): 0.5, (1, 0): 1.0, (0, 1): -1.0, (0, 0): -0.5}


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("flags,expected", sorted(HAND_TARGETS.items()))
def test_bfpo_target_hand_values(flags, expected):
  s_w, s_l = flags
  for beta in (0.01, 0.1, 1.0):
    target = losses.bfpo_target(jnp.array([s_w]), jnp.array([s_l]), beta=beta)
    np.testing.assert_allclose(target, [expected / beta], rtol=1e-6)


def test_bfpo_target_accepts_bool_and_other_hyperparameters():
  target = losses.bfpo_target(jnp.array([True]), jnp.array([False]), beta=0.5,
                              alpha=0.2, b1=5.0)
  # b3 = 1/4: (5 * 0.25 * 1 - 0.25 * 0 - 0.2) / 0.5 = 2.1
  np.testing.assert_allclose(target, [2.1], rtol=1e-6)
  with pytest.raises(ValueError, match="b1"):
    losses.bfpo_target(jnp.array([1]), jnp.array([1]), b1=1.0)


@pytest.mark.parametrize("flags,expected", sorted(HAND_TARGETS.items()))
def test_bfpo_loss_hand_values_per_group(flags, expected):
  beta = 0.01
  # policy - reference log-ratios: chosen +3, rejected -2, so h = 5.
  loss, metrics = losses.bfpo_loss(
      jnp.array([-10.0]), jnp.array([-20.0]), jnp.array([-13.0]),
      jnp.array([-18.0]), jnp.array([flags[0]]), jnp.array([flags[1]]),
      beta=beta)
  np.testing.assert_allclose(loss, (5.0 - expected / beta) ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/chosen"], beta * 3.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/rejected"], beta * -2.0,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["rewards/margins"], beta * 5.0, rtol=1e-6)
  assert metrics["rewards/accuracy"] == 1.0
  name = losses.SAFETY_GROUPS[[(1, 1), (1, 0), (0, 1), (0, 0)].index(flags)]
  for group in losses.SAFETY_GROUPS:
    assert metrics[f"count/{group}"] == (1.0 if group == name else 0.0)
  assert metrics[f"rewards/accuracy/{name}"] == 1.0
  np.testing.assert_allclose(metrics[f"rewards/margins/{name}"], beta * 5.0,
                             rtol=1e-6)


def test_grouped_metrics_use_boolean_masks():
  # The reference code indexed rewards with a float tensor (a bug): with
  # flags [1., 0.] that gathers elements 1 and 0, not "the safe ones".
  chosen = jnp.array([1.0, -1.0, 2.0, 0.5])
  rejected = jnp.array([0.0, 0.0, 3.0, 0.0])
  s_w = jnp.array([1.0, 1.0, 0.0, 1.0])
  s_l = jnp.array([0.0, 0.0, 1.0, 1.0])
  zeros = jnp.zeros(4)
  _, m = losses.bfpo_loss(chosen, rejected, zeros, zeros, s_w, s_l, beta=1.0)
  assert m["count/safe_unsafe"] == 2
  np.testing.assert_allclose(m["rewards/accuracy/safe_unsafe"], 0.5)
  np.testing.assert_allclose(m["rewards/margins/safe_unsafe"], 0.0)
  assert m["count/unsafe_safe"] == 1
  np.testing.assert_allclose(m["rewards/accuracy/unsafe_safe"], 0.0)
  np.testing.assert_allclose(m["rewards/margins/unsafe_safe"], -1.0)
  assert m["count/safe_safe"] == 1 and m["count/unsafe_unsafe"] == 0
  np.testing.assert_allclose(m["rewards/accuracy"], 0.5)
  # The reference's safe_rewards: the chosen reward of the safe chosen
  # responses (rows 0, 1, 3), not rows [1, 1, 0, 1] (mean -0.5) as its
  # integer indexing gathers.
  np.testing.assert_allclose(m["rewards/chosen/safe"], (1.0 - 1.0 + 0.5) / 3,
                             rtol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen/unsafe"], 2.0, rtol=1e-6)


def test_mean_logits_equals_the_mean_of_the_full_logits():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
  w = rng.normal(size=(4, 7)).astype(np.float32)
  mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
  logits = hidden @ w  # [B, T, V], formed here only
  expected = [logits[0, 1:3].mean(), logits[1].mean(), 0.0]
  np.testing.assert_allclose(losses.mean_logits(hidden, w, mask), expected,
                             rtol=1e-5, atol=1e-6)


def test_weights_mask_padded_pairs():
  args = [jnp.array([-1.0, -5.0, 7.0]), jnp.array([-2.0, -1.0, 9.0]),
          jnp.array([-1.5, -4.0, 0.0]), jnp.array([-1.5, -3.0, 0.0])]
  flags = [jnp.array([1, 0, 1]), jnp.array([0, 1, 1])]
  weights = jnp.array([1.0, 1.0, 0.0])
  masked, m_masked = losses.bfpo_loss(*args, *flags, weights=weights)
  first_two, m_two = losses.bfpo_loss(*(a[:2] for a in args),
                                      *(f[:2] for f in flags))
  np.testing.assert_allclose(masked, first_two, rtol=1e-6)
  for key in m_two:
    np.testing.assert_allclose(m_masked[key], m_two[key], rtol=1e-6, atol=1e-7)
  for fn in (losses.dpo_loss, losses.ipo_loss):
    masked, _ = fn(*args, weights=weights)
    first_two, _ = fn(*(a[:2] for a in args))
    np.testing.assert_allclose(masked, first_two, rtol=1e-6)


def test_dpo_and_ipo_hand_values():
  beta, h = 0.1, 5.0
  args = (jnp.array([-10.0]), jnp.array([-20.0]), jnp.array([-13.0]),
          jnp.array([-18.0]))
  loss, m = losses.dpo_loss(*args, beta=beta)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-beta * h)), rtol=1e-6)
  np.testing.assert_allclose(m["rewards/margins"], beta * h, rtol=1e-6)
  eps = 0.2
  loss, _ = losses.dpo_loss(*args, beta=beta, label_smoothing=eps)
  expected = ((1 - eps) * math.log1p(math.exp(-beta * h))
              + eps * math.log1p(math.exp(beta * h)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  loss, _ = losses.ipo_loss(*args, beta=beta)
  np.testing.assert_allclose(loss, (h - 1 / (2 * beta)) ** 2, rtol=1e-6)
  _, m = losses.dpo_loss(*args, chosen_is_safe=jnp.array([0]),
                         rejected_is_safe=jnp.array([1]))
  assert m["count/unsafe_safe"] == 1


def test_bfpo_gradient_matches_finite_differences():
  x = np.array([[-3.0, -4.0, -3.2, -4.1], [-7.0, -2.0, -6.5, -2.5]])
  s_w, s_l = jnp.array([1, 0]), jnp.array([0, 0])

  def f(v):
    return losses.bfpo_loss(*v.T, s_w, s_l, beta=0.1)[0]

  x64 = jnp.asarray(x, jnp.float32)
  grad = np.asarray(jax.grad(f)(x64))
  eps = 1e-2
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    fd = (float(f(jnp.asarray(x + d, jnp.float32)))
          - float(f(jnp.asarray(x - d, jnp.float32)))) / (2 * eps)
    np.testing.assert_allclose(grad[idx], fd, rtol=2e-3, atol=1e-2)
  # Analytic: d loss / d pi_w = 2 (h - t) / B.
  h = (x[:, 0] - x[:, 2]) - (x[:, 1] - x[:, 3])
  t = np.array([1.0, -0.5]) / 0.1
  np.testing.assert_allclose(grad[:, 0], 2 * (h - t) / 2, rtol=1e-5)


def test_jit_vmap_and_bf16_inputs():
  rng = np.random.default_rng(0)
  logps = rng.normal(size=(3, 4, 8)).astype(np.float32) * 10
  s_w, s_l = rng.integers(0, 2, (3, 8)), rng.integers(0, 2, (3, 8))
  fn = functools.partial(losses.bfpo_loss, beta=0.1)
  batched = jax.vmap(lambda a, b, c, d, e, f: fn(a, b, c, d, e, f)[0])
  out = jax.jit(batched)(*(jnp.asarray(logps[:, i]) for i in range(4)),
                         jnp.asarray(s_w), jnp.asarray(s_l))
  for k in range(3):
    np.testing.assert_allclose(out[k], fn(*logps[k], s_w[k], s_l[k])[0],
                               rtol=1e-5)
  bf16 = [jnp.asarray(logps[0, i], jnp.bfloat16) for i in range(4)]
  loss_bf16, metrics = fn(*bf16, s_w[0], s_l[0])
  assert loss_bf16.dtype == jnp.float32
  rounded = [np.asarray(a, np.float32) for a in bf16]
  np.testing.assert_allclose(loss_bf16, fn(*rounded, s_w[0], s_l[0])[0],
                             rtol=1e-6)
  assert all(v.dtype == jnp.float32 for v in metrics.values())


@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(
    hnp.arrays(np.float32, (5, 4), elements=st.floats(-50, 50, width=32)),
    hnp.arrays(np.int8, (2, 5), elements=st.integers(0, 1)))
def test_bfpo_properties(logps, flags):
  s_w, s_l = flags
  args = [jnp.asarray(logps[:, i]) for i in range(4)]
  loss, m = losses.bfpo_loss(*args, s_w, s_l, beta=0.1)
  assert np.isfinite(loss) and loss >= 0
  # Zero exactly when each log-ratio margin equals its target.
  target = np.asarray(losses.bfpo_target(s_w, s_l, beta=0.1))
  at_optimum = losses.bfpo_loss(args[0], args[1], args[0], args[1] + target,
                                s_w, s_l, beta=0.1)[0]
  assert at_optimum <= 1e-6 * max(1.0, float(np.abs(target).max()) ** 2)
  # The four group counts partition the batch.
  assert sum(float(m[f"count/{g}"]) for g in losses.SAFETY_GROUPS) == 5
  # Shifting the reference by a per-pair constant on both responses changes
  # nothing (only log-ratio differences matter).
  shift = logps[:, 0:1]
  shifted = losses.bfpo_loss(args[0], args[1], args[2] + shift[:, 0],
                             args[3] + shift[:, 0], s_w, s_l, beta=0.1)[0]
  np.testing.assert_allclose(shifted, loss, rtol=1e-4, atol=1e-2)


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
  np.testing.assert_allclose(losses.sequence_logps(logits, labels, mask),
                             expected_sum, rtol=1e-5)
  np.testing.assert_allclose(
      losses.sequence_logps(logits, labels, mask, average=True), expected_avg,
      rtol=1e-5)
  loss, m = losses.sft_loss(logits, labels, mask)
  np.testing.assert_allclose(loss, -(per_token * mask).sum() / mask.sum(),
                             rtol=1e-5)
  assert m["tokens"] == mask.sum()


def test_masked_positions_may_hold_ignore_index():
  hidden, w, labels, mask = _random_lm_batch(1)
  ignored = np.where(mask, labels, -100)
  logits = hidden @ w
  np.testing.assert_allclose(losses.sequence_logps(logits, ignored, mask),
                             losses.sequence_logps(logits, labels, mask),
                             rtol=1e-6)
  np.testing.assert_allclose(
      losses.chunked_sequence_logps(hidden, w, ignored, mask, chunk_size=4),
      losses.sequence_logps(logits, labels, mask), rtol=1e-5)


@pytest.mark.parametrize("chunk_size,vocab_chunk_size",
                         [(4, None), (21, None), (5, 16), (64, 7), (3, 50)])
@pytest.mark.parametrize("average", [False, True])
def test_chunked_equals_full_with_gradients(chunk_size, vocab_chunk_size,
                                            average):
  hidden, w, labels, mask = _random_lm_batch(2)

  def full(h, w):
    return losses.sequence_logps(jnp.einsum("btd,dv->btv", h, w), labels, mask,
                                 average=average)

  def chunked(h, w):
    return losses.chunked_sequence_logps(h, w, labels, mask,
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
    return jnp.sum(losses.chunked_sequence_logps(h, w, labels, mask,
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
  chunked = lambda h, w: jnp.sum(losses.chunked_sequence_logps(  # noqa: E731
      h, w, labels, mask, chunk_size=5, vocab_chunk_size=vocab_chunk_size))
  full = lambda h, w: jnp.sum(losses.sequence_logps(  # noqa: E731
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
  loss = lambda h: jnp.sum(losses.chunked_sequence_logps(  # noqa: E731
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
      losses.chunked_sequence_logps(h, w, labels, mask, chunk_size=8)))(h)
  g16 = grad(h16, w16)
  assert g16.dtype == jnp.bfloat16
  g32 = grad(jnp.asarray(h16, jnp.float32), jnp.asarray(w16, jnp.float32))
  err = np.abs(np.asarray(g16, np.float32) - np.asarray(g32))
  assert err.max() < 0.02 * np.abs(np.asarray(g32)).max()


def test_chunked_bf16_hidden_matches_float32_reference():
  hidden, w, labels, mask = _random_lm_batch(5)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  out = losses.chunked_sequence_logps(h16, w16, labels, mask, chunk_size=8)
  assert out.dtype == jnp.float32
  ref = losses.sequence_logps(
      np.asarray(h16, np.float32) @ np.asarray(w16, np.float32), labels, mask)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)


def test_chunks_outside_the_mask_are_skipped_but_results_equal():
  hidden, w, labels, _ = _random_lm_batch(6, b=4, t=16)
  mask = np.zeros((4, 16), bool)
  mask[:, 8:] = True  # first half of every row is "prompt"
  mask[3] = False  # a fully padded row
  full = losses.sequence_logps(hidden @ w, labels, mask)
  chunked = losses.chunked_sequence_logps(hidden, w, labels, mask, chunk_size=8)
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda h: jnp.sum(losses.chunked_sequence_logps(
      h, w, labels, mask, chunk_size=8)))(hidden)
  grad_full = jax.grad(lambda h: jnp.sum(losses.sequence_logps(
      h @ w, labels, mask)))(hidden)
  np.testing.assert_allclose(grad, grad_full, atol=1e-5)
  # The skipped chunks really take the no-op branch: their per-token
  # log-probs are exactly zero although the labels there are real.
  per_token = losses.chunked_token_logps(hidden, w, labels, chunk_size=8,
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
  logps, greedy = losses.chunked_token_logps_and_greedy(
      hidden, w, labels, chunk_size=chunk_size,
      vocab_chunk_size=vocab_chunk_size, mask=mask)
  expected = np.take_along_axis(_np_log_softmax(logits), labels[..., None],
                                -1)[..., 0]
  m = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(logps)[m], expected[m], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(greedy)[m], (argmax == labels)[m])
  assert np.asarray(greedy)[m].any() and not np.asarray(greedy)[m].all()
  np.testing.assert_allclose(
      logps * mask, losses.chunked_token_logps(
          hidden, w, labels, chunk_size=chunk_size,
          vocab_chunk_size=vocab_chunk_size, mask=mask) * mask, atol=1e-6)


def test_chunked_greedy_picks_the_first_of_tied_maxima():
  w = jnp.zeros((2, 12)).at[0, 3].set(1.0).at[0, 9].set(1.0)  # ties at 3, 9
  hidden = jnp.ones((1, 2, 2))
  for vocab_chunk_size in (None, 4):
    _, greedy = losses.chunked_token_logps_and_greedy(
        hidden, w, jnp.array([[3, 9]]), chunk_size=2,
        vocab_chunk_size=vocab_chunk_size)
    np.testing.assert_array_equal(greedy, [[True, False]])
