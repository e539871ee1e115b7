"""One metric rule: sums and weights add up, then divide once."""

import types

import jax
import numpy as np
import optax
import pytest

from bfpo_jax import losses, sharding, train
from bfpo_jax import metrics as metrics_lib
from bfpo_jax import train_step as ts
from bfpo_jax.model import init_params
from tests import helpers

CFG = helpers.tiny_config()


def test_merge_then_values_is_the_pooled_mean():
  # Part one: 3 pairs, values 1, 2, 3; part two: 1 pair, value 10.
  parts = [metrics_lib.mean(np.array([1.0, 2.0, 3.0]), np.ones(3)),
           metrics_lib.mean(np.array([10.0, 99.0]), np.array([1.0, 0.0]))]
  stacked = {"x": jax.tree.map(lambda *xs: np.stack(xs), *parts),
             "count": jax.tree.map(lambda *xs: np.stack(xs),
                                   metrics_lib.total(np.ones(3)),
                                   metrics_lib.total(np.ones(2))),
             "empty": jax.tree.map(lambda *xs: np.stack(xs),
                                   metrics_lib.mean(np.ones(2), np.zeros(2)),
                                   metrics_lib.mean(np.ones(1), np.zeros(1)))}
  out = metrics_lib.values(metrics_lib.merge(stacked))
  np.testing.assert_allclose(out["x"], 16.0 / 4)  # not (2 + 10) / 2
  np.testing.assert_allclose(out["count"], 5.0)
  assert float(out["empty"]) == 0.0


def test_group_metrics_of_two_batches_equal_those_of_one():
  rng = np.random.default_rng(0)
  chosen, rejected = rng.normal(size=12), rng.normal(size=12)
  chosen_safe = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1], bool)
  rejected_safe = np.array([1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0], bool)
  weights = np.ones(12, np.float32)
  weights[4] = 0.0

  def stats(s):
    return losses.preference_stats(chosen[s], rejected[s], weights[s],
                                   chosen_safe[s], rejected_safe[s])

  # Uneven halves: the first holds 1 real (safe, unsafe) pair, the second 2.
  halves = [stats(slice(0, 5)), stats(slice(5, 12))]
  pooled = metrics_lib.values(metrics_lib.merge(
      jax.tree.map(lambda *xs: np.stack(xs), *halves)))
  whole = losses.preference_metrics(chosen, rejected, weights, chosen_safe,
                                    rejected_safe)
  assert set(pooled) == set(whole)
  for key in whole:
    np.testing.assert_allclose(pooled[key], whole[key], rtol=1e-6, atol=1e-7,
                               err_msg=key)
  # Hand check of one group: the (safe, unsafe) pairs with weight: 1, 7, 11.
  margins = chosen - rejected
  np.testing.assert_allclose(whole["rewards/margins/safe_unsafe"],
                             (margins[1] + margins[7] + margins[11]) / 3,
                             rtol=1e-5)
  assert float(whole["count/safe_unsafe"]) == 3.0


@pytest.mark.parametrize("stage", ["bfpo", "sft"])
def test_evaluate_over_uneven_batches_equals_one_big_batch(stage):
  step_cfg = ts.StepConfig(stage=stage, beta=0.1, mode="full", chunk_size=8)
  state, _ = ts.create_state(init_params(CFG, jax.random.key(0)),
                             optax.sgd(0.0), step_cfg, CFG)
  # Policy != reference, so rewards and margins are not all zero.
  state = state._replace(trainable=jax.tree.map(lambda x: x * 1.05,
                                                state.trainable))
  batch = (helpers.sft_batch(4) if stage == "sft"
           else helpers.preference_batch(4))
  parts = [jax.tree.map(lambda x, s=s: x[s], batch)
           for s in (slice(0, 6), slice(6, 8))]
  data = types.SimpleNamespace(eval_batches=parts)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  got = train.evaluate(ts.build_eval_step(CFG, step_cfg, reduce=False), state,
                       data, mesh)
  want = jax.device_get(ts.build_eval_step(CFG, step_cfg)(state, batch))
  want.pop("tokens", None)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
