"""Losses against hand-computed values, finite differences and each other."""

import doctest
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


def test_sft_loss_hand_computed():
  # Two target tokens: p = 1/2 (equal logits) and p = 3/4 (log-odds log 3);
  # the third position is masked, with an ignore-index label.
  logits = jnp.array([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
  labels = jnp.array([[1, 0, -100]])
  mask = jnp.array([[True, True, False]])
  loss, m = losses.sft_loss(logits, labels, mask)
  np.testing.assert_allclose(loss, -(math.log(0.5) + math.log(0.75)) / 2,
                             rtol=1e-6)
  assert m["tokens"] == 2


def test_log_prob_functions_keep_their_losses_import_path():
  from bfpo_jax import logprobs
  for name in ("token_logps", "sequence_logps", "chunked_token_logps",
               "chunked_token_logps_and_greedy", "chunked_sequence_logps",
               "mean_logits", "packed_pair_logps"):
    assert getattr(losses, name) is getattr(logprobs, name)
    assert name in losses.__all__


def test_docstring_examples():
  """The ``Examples:`` blocks run and print what they claim (as optax's do);
  an example deleted from them fails the count."""
  finder = doctest.DocTestFinder()
  found = {test.name.rsplit(".", 1)[-1]: test for test in finder.find(losses)
           if test.examples}
  assert len(found["bfpo_target"].examples) >= 7
  assert len(found["bfpo_loss"].examples) >= 10
  runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
  for test in found.values():
    runner.run(test)
  failed, attempted = runner.summarize(verbose=False)
  assert failed == 0 and attempted >= 17
