"""SACPO at toy scale as configs/sacpo.py runs it: the helpfulness stage, the
safety stage from its workdir, P-SACPO's merge; and the shared reference
cache on those runs (the same losses whether read or computed)."""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from bfpo_jax import merge, train
from bfpo_jax.config import validate
from bfpo_jax.data.sources import DataError, SourceSpec, load_records, to_record
from bfpo_jax.model import load_hf
from configs import sacpo, tiny

ROW = {"prompt": "Tell me how to pick a lock.", "response_0": "Sure: step one.",
       "response_1": "I cannot help with that.", "is_response_0_safe": False,
       "is_response_1_safe": True, "better_response_id": 0,
       "safer_response_id": 1}
FAST = dict(max_steps=2, eval_every_steps=0, checkpoint_every_steps=100)


def test_safety_pairs_choose_the_safer_response():
  helpful = to_record("pku_saferlhf", "preference", ROW)
  safety = to_record("pku_saferlhf", "preference", ROW, "safer")
  assert (helpful["chosen"], helpful["chosen_is_safe"]) == ("Sure: step one.",
                                                            False)
  assert (safety["chosen"], safety["rejected"]) == ("I cannot help with that.",
                                                    "Sure: step one.")
  assert (safety["chosen_is_safe"], safety["rejected_is_safe"]) == (True, False)
  # Every bundled row, read both ways: chosen = response_{safer_response_id}.
  path = f"{tiny.TINY}/pku_saferlhf.jsonl"
  rows = [json.loads(line) for line in open(path)]
  records, report = load_records(SourceSpec.parse(
      f"pku_saferlhf:{path}?chosen=safer", task="preference"))
  assert report.rows_used == len(rows) == len(records)
  for row, record in zip(rows, records):
    assert record["chosen"] == row[f"response_{row['safer_response_id']}"]
    assert record["chosen_is_safe"] == row[
        f"is_response_{row['safer_response_id']}_safe"]


def test_chosen_option_is_checked_by_name():
  with pytest.raises(DataError, match="chosen='safest' is not one of better, "
                     "safer"):
    SourceSpec.parse("pku_saferlhf:x.jsonl?chosen=safest", task="preference")
  with pytest.raises(DataError, match="chosen=safer needs a pku_saferlhf "
                     "preference source"):
    SourceSpec.parse("ultrafeedback:x.jsonl?chosen=safer", task="preference")


@pytest.mark.parametrize("variant", list(sacpo.VARIANTS))
def test_variants_validate_and_chain(variant):
  chosen, beta, batch, start = sacpo.VARIANTS[variant]
  full = sacpo.get_config(variant)
  validate(full, 4)
  assert (full.stage, full.loss.beta, full.batch.global_size) == ("dpo", beta,
                                                                  batch)
  assert all(("chosen=safer" in s) == (chosen == "safer")
             for s in (*full.data.sources, *full.data.eval_sources))
  assert full.init_from == (sacpo.workdir(start) if start
                            else "runs/sft_7b")
  small = sacpo.get_config(f"{variant},tiny")
  validate(small, 1)
  assert small.init_from == (sacpo.workdir(start, small=True) if start else "")
  with pytest.raises(ValueError, match="is not one of helpful, safety"):
    sacpo.get_config(f"{variant},huge")


def _run(workdir, variant, **overrides):
  config = sacpo.get_config(f"{variant},tiny")
  config.data.max_prompt_length, config.data.max_length = 32, 64
  config.data.buckets = (64,)
  for key, value in {**FAST, **overrides}.items():
    section = config
    *parents, leaf = key.split(".")
    for part in parents:
      section = section[part]
    section[leaf] = value
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train.run(config, str(workdir))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  return out.getvalue(), metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Helpfulness stage without the shared cache, with it (computed, then
  read), and the safety stage from the second's workdir."""
  root = tmp_path_factory.mktemp("sacpo")
  cache = str(root / "cache")
  out = {"plain": _run(root / "plain", "helpful", **{
      "loss.reference_cache": "", "export_hf": False})}
  out["computed"] = _run(root / "helpful", "helpful",
                         **{"loss.reference_cache": cache})
  out["read"] = _run(root / "read", "helpful", **{
      "loss.reference_cache": cache, "export_hf": False})
  out["safety"] = _run(root / "safety", "safety", **{
      "loss.reference_cache": cache, "init_from": str(root / "helpful")})
  return root, cache, out


@pytest.mark.slow
def test_cached_reference_log_probs_give_the_same_losses(runs):
  _, cache, out = runs
  assert "reference log-probs: precomputed" in out["plain"][0]
  assert "reference cache" not in out["plain"][0]
  assert f"reference cache: computed: {cache} holds no entry yet" in (
      out["computed"][0])
  read = [line for line in out["read"][0].splitlines()
          if line.startswith("reference ")]
  assert read[0].startswith(f"reference cache: read {cache}/")
  assert read[1] == "reference log-probs: from cache"
  logged = {name: {(m["step"], key): m[key] for m in out[name][1]
                   for key in ("loss", "eval/loss") if key in m}
            for name in ("plain", "computed", "read")}
  assert sorted(logged["plain"]) == [(1, "loss"), (2, "eval/loss"),
                                     (2, "loss")]
  for name in ("computed", "read"):
    assert logged[name].keys() == logged["plain"].keys()
    for key, value in logged[name].items():
      np.testing.assert_allclose(value, logged["plain"][key], rtol=0,
                                 atol=1e-6, err_msg=f"{name} {key}")


@pytest.mark.slow
def test_safety_stage_starts_from_the_helpful_model_and_recomputes(runs):
  root, cache, out = runs
  text, metrics = out["safety"]
  assert "loss: dpo, beta 0.01, label_smoothing 0; log-probs summed" in text
  assert "pku_saferlhf.jsonl?chosen=safer: 43 train" in text
  line = next(x for x in text.splitlines() if x.startswith("reference cache"))
  # Its reference is the first stage's model, its data the safety pairs.
  assert ("differs in data.sources[0] ...hf.jsonl -> ...hf.jsonl?chosen=safer, "
          "reference weights, tokens; saved as") in line
  assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
  assert len(os.listdir(cache)) == 2


@pytest.mark.slow
def test_p_sacpo_merges_the_two_stages_workdirs(runs):
  root, _, _ = runs
  helpful, safety = str(root / "helpful"), str(root / "safety")
  out = str(root / "p_sacpo")
  with contextlib.redirect_stdout(io.StringIO()):
    merge.main([helpful, safety, "--weight", "0.5", "--out", out])
  leaves = [jax.tree.leaves(load_hf(os.path.join(folder, "hf_export")
                                    if "p_sacpo" not in folder else folder)[1])
            for folder in (helpful, safety, out)]
  assert any(not np.array_equal(a, b) for a, b in zip(*leaves[:2]))
  for a, b, m in zip(*leaves):
    np.testing.assert_allclose(m, (np.asarray(a, np.float64) + b) / 2,
                               rtol=1e-6, atol=1e-7)
