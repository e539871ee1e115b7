"""The paper's Sec. 3.4 experiment reproduces the global ranking with BFPO."""

import json

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
  assert set(results) == {"bfpo", "dpo", "ipo"}
  assert results["bfpo"]["ranking"] == GLOBAL_RANKING
  assert all(r == GLOBAL_RANKING for r in results["bfpo"]["ranking_per_seed"])
  assert results["dpo"]["ranking"] != GLOBAL_RANKING
  assert results["ipo"]["ranking"] != GLOBAL_RANKING
  for method in results:
    probs = results[method]["final_probs"]
    assert list(probs) == GLOBAL_RANKING
    np.testing.assert_allclose(sum(probs.values()), 1.0, rtol=1e-5)


def test_history_starts_uniform():
  history = np.asarray(synthetic.train("bfpo", 0, synthetic.preference_set(),
                                       steps=10))
  assert history.shape == (11, 4)
  np.testing.assert_allclose(history[0], 0.25)
