"""The paper's Sec. 3.4 experiment reproduces the global ranking with BFPO;
SACPO and P-SACPO on the same two sources do not."""

import json

import jax
import numpy as np

from bfpo_jax import synthetic

GLOBAL_RANKING = ["helpful_safe", "unhelpful_safe", "unhelpful_unsafe",
                  "helpful_unsafe"]


def test_preference_set_is_built_like_the_real_mix():
  data = synthetic.preference_set(0.5)
  np.testing.assert_allclose(data["probs"].sum(), 1.0, rtol=1e-6)
  safe = np.array([True, True, False, False])
  np.testing.assert_array_equal(data["chosen_is_safe"], safe[data["chosen"]])
  np.testing.assert_array_equal(data["rejected_is_safe"],
                                safe[data["rejected"]])
  # Safety pairs always prefer the safe response; helpfulness pairs may not.
  n_help = len(synthetic.HELPFULNESS_PAIRS)
  assert data["chosen_is_safe"][n_help:].all()
  assert not data["rejected_is_safe"][n_help:].any()
  assert not data["chosen_is_safe"][:n_help].all()


def test_cli_bfpo_recovers_global_ranking_and_dpo_does_not(tmp_path):
  synthetic.main(["--out", str(tmp_path), "--seeds", "3"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "synthetic.png").stat().st_size > 10_000
  assert set(results) == {"bfpo", "dpo", "ipo", "sacpo", "sacpo_safety_first",
                          "p_sacpo_0.25", "p_sacpo_0.5", "p_sacpo_0.75"}
  assert results["bfpo"]["ranking"] == GLOBAL_RANKING
  assert all(r == GLOBAL_RANKING for r in results["bfpo"]["ranking_per_seed"])
  assert results["dpo"]["ranking"] != GLOBAL_RANKING
  assert results["ipo"]["ranking"] != GLOBAL_RANKING
  # Neither source has a pair where unhelpful-unsafe beats helpful-unsafe, so
  # SACPO's two DPO stages, in either order, keep the helpful-unsafe answer
  # above it; so do its merges.
  for method in ("sacpo", "sacpo_safety_first", "p_sacpo_0.25", "p_sacpo_0.5",
                 "p_sacpo_0.75"):
    for seed_ranking in results[method]["ranking_per_seed"]:
      assert seed_ranking[0] == "helpful_safe"
      assert (seed_ranking.index("helpful_unsafe")
              < seed_ranking.index("unhelpful_unsafe")), (method, seed_ranking)
  for method in results:
    probs = results[method]["final_probs"]
    assert list(probs) == GLOBAL_RANKING
    np.testing.assert_allclose(sum(probs.values()), 1.0, rtol=1e-5)


def test_history_starts_uniform():
  history = np.asarray(synthetic.train("bfpo", 0, synthetic.preference_set(),
                                       steps=10))
  assert history.shape == (11, 4)
  np.testing.assert_allclose(history[0], 0.25)


def test_source_sets_hold_one_source_each():
  data = synthetic.preference_set(0.5)
  helpful = synthetic.source_set(data, "helpfulness")
  safety = synthetic.source_set(data, "safety")
  assert [(int(c), int(r)) for c, r in zip(helpful["chosen"],
                                           helpful["rejected"])] == [
      (c, r) for c, r, _ in synthetic.HELPFULNESS_PAIRS]
  assert safety["chosen_is_safe"].all() and not safety["rejected_is_safe"].any()
  np.testing.assert_allclose(helpful["probs"], [0.7, 0.1, 0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(safety["probs"], [0.25] * 4, rtol=1e-6)


def test_stepwise_second_stage_starts_from_and_is_anchored_to_the_first():
  data = synthetic.preference_set(0.5)
  first, final, history = synthetic.train_stepwise(0, data, steps=40)
  assert history.shape == (81, 4)
  np.testing.assert_allclose(history[0], 0.25)
  np.testing.assert_allclose(history[40], jax.nn.softmax(first), rtol=1e-6)
  np.testing.assert_allclose(history[-1], jax.nn.softmax(final), rtol=1e-6)
  # The second stage's loss, written out in numpy from the DPO formula: its
  # reference is the first stage's policy (at the start the margin is 0 and
  # the loss log 2), not the uniform one.
  batch = synthetic.source_set(data, "safety")

  def dpo(logits, reference, beta=0.1):
    logp = logits - np.log(np.exp(logits).sum())
    ref_logp = reference - np.log(np.exp(reference).sum())
    ratio = logp - ref_logp
    h = ratio[batch["chosen"]] - ratio[batch["rejected"]]
    return np.mean(np.log1p(np.exp(-beta * h)))

  first = np.asarray(first)
  np.testing.assert_allclose(dpo(first, first), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(
      synthetic._loss("dpo", first, batch, 0.1, 0.5, jax.nn.log_softmax(first)),
      dpo(first, first), rtol=1e-6)
  np.testing.assert_allclose(synthetic._loss("dpo", first, batch, 0.1, 0.5),
                             dpo(first, np.zeros(4)), rtol=1e-5)


def test_merge_weights_end_at_the_parents():
  data = synthetic.preference_set(0.5)
  first, final, _ = synthetic.train_stepwise(1, data, steps=20)
  np.testing.assert_allclose(synthetic.merged_probs(first, final, 0.0),
                             jax.nn.softmax(first), rtol=1e-6)
  np.testing.assert_allclose(synthetic.merged_probs(first, final, 1.0),
                             jax.nn.softmax(final), rtol=1e-6)
  half = np.exp(0.5 * np.asarray(first) + 0.5 * np.asarray(final))
  np.testing.assert_allclose(synthetic.merged_probs(first, final, 0.5),
                             half / half.sum(), rtol=1e-5)
