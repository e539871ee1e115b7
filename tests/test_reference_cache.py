"""loss.reference_cache: what the fingerprint sees, and what a run reads,
recomputes and says (the runs that log losses are in test_sacpo.py)."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfpo_jax import build, reference_cache, sharding
from bfpo_jax.config import ConfigError, validate
from bfpo_jax.model import init_params
from bfpo_jax.tokenizer import load_tokenizer
from configs import tiny
from tests.helpers import tiny_config


def test_weights_checksum_sees_every_value_and_nothing_else():
  params = init_params(tiny_config(), jax.random.key(0))
  base = reference_cache.weights_checksum(params)
  assert reference_cache.weights_checksum(jax.tree.map(jnp.copy, params)) == base
  kernel = params["layers"][1]["mlp"]["down_proj"]["kernel"]
  for index in ((0, 0), (5, 3), (-1, -1)):
    nudged = copy.deepcopy(params)
    nudged["layers"][1]["mlp"]["down_proj"]["kernel"] = kernel.at[index].set(
        jnp.nextafter(kernel[index], jnp.inf))  # one bit of one value
    assert reference_cache.weights_checksum(nudged) != base, index
  swapped = copy.deepcopy(params)
  swapped["layers"][1]["mlp"]["down_proj"]["kernel"] = kernel[::-1]
  assert reference_cache.weights_checksum(swapped) != base
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert reference_cache.weights_checksum(as_bf16) != base
  # On a mesh (the leaves sharded over fsdp) it is the same number.
  mesh = sharding.make_mesh(1, -1, 1)
  assert reference_cache.weights_checksum(params, mesh) == base


def test_tokens_digest_sees_ids_and_order_not_safety_flags():
  pairs = [{"prompt_length": 2, "chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7],
            "chosen_is_safe": True, "rejected_is_safe": False},
           {"prompt_length": 1, "chosen_ids": [1, 9], "rejected_ids": [1, 8],
            "chosen_is_safe": False, "rejected_is_safe": True}]
  base = reference_cache.tokens_digest(pairs)
  flipped = [dict(p, chosen_is_safe=not p["chosen_is_safe"],
                  reference_chosen_logps=-3.0) for p in pairs]
  assert reference_cache.tokens_digest(flipped) == base
  assert reference_cache.tokens_digest(pairs[::-1]) != base
  assert reference_cache.tokens_digest(
      [dict(pairs[0], prompt_length=1), pairs[1]]) != base
  assert reference_cache.tokens_digest(
      [dict(pairs[0], chosen_ids=[1, 5, 6, 2]), pairs[1]]) != base


def _config(cache_dir):
  c = tiny.get_config("dpo")
  c.data.sources, c.data.buffer_sources = c.data.sources[:1], ()
  c.data.buffer_task, c.data.buffer_weight = "sft", 0.0
  c.data.max_prompt_length, c.data.max_length, c.data.buckets = 32, 64, (64,)
  c.loss.reference_cache = str(cache_dir)
  return c


def _attach(config, model_cfg, params, mesh, tokenizer, workdir):
  examples = build.load_examples(config, tokenizer)
  notes = []
  from_cache = build.attach_reference_logps(
      config, model_cfg, build.step_config(config), params, examples, mesh,
      os.path.join(workdir, "reference_logps.npz"), notes)
  pairs = [e for source in examples.train for e in source] + examples.held_out
  logps = np.array([(e["reference_chosen_logps"], e["reference_rejected_logps"])
                    for e in pairs])
  return from_cache, notes, logps


def test_a_run_reads_what_matches_and_says_why_it_recomputes(tmp_path):
  cache = tmp_path / "cache"
  config, mesh = _config(cache), sharding.make_mesh(1, -1, 1)
  tokenizer = load_tokenizer()
  model_cfg, params = build.load_model(config, mesh)
  attach = lambda c, p=params: _attach(c, model_cfg, p, mesh, tokenizer,  # noqa: E731
                                       str(tmp_path))
  hit, notes, first = attach(config)
  assert not hit and len(notes) == 1
  assert notes[0].startswith(f"reference cache: computed: {cache} holds no "
                             "entry yet; saved as ")
  (entry,) = cache.glob("*.npz")
  assert notes[0].endswith(str(entry))
  assert not (tmp_path / "reference_logps.npz").exists()  # not the workdir's

  hit, notes, again = attach(config)  # same fingerprint: read, not run
  assert hit and notes == [f"reference cache: read {entry}"]
  np.testing.assert_array_equal(again, first)

  averaged = copy.deepcopy(config)
  averaged.loss.average_logps = True
  hit, notes, other = attach(averaged)
  assert not hit and len(notes) == 1
  assert (f"no entry for this fingerprint in {cache}; the closest "
          f"({entry.name}) differs in loss.average_logps False -> True; "
          "saved as ") in notes[0]
  assert not np.allclose(other, first)

  # Other weights under the same names (e.g. an earlier stage's export).
  moved = jax.tree.map(lambda x: x * 1.01, params)
  hit, notes, _ = attach(config, moved)
  assert not hit and "differs in reference weights;" in notes[0]

  shorter = copy.deepcopy(config)
  shorter.data.max_length, shorter.data.buckets = 48, (48,)
  hit, notes, _ = attach(shorter)
  assert not hit
  assert "differs in data.max_length 64 -> 48, tokens;" in notes[0]

  # A truncated file (a full disk, a killed copy) is recomputed and rewritten.
  data = entry.read_bytes()
  entry.write_bytes(data[: len(data) // 2])
  hit, notes, fixed = attach(config)
  assert not hit and len(notes) == 1
  assert notes[0].startswith(f"reference cache: computed: {entry} is damaged "
                             "(BadZipFile: ")
  np.testing.assert_array_equal(fixed, first)
  assert attach(config)[0]  # rewritten whole


def test_an_entry_that_lies_about_its_fingerprint_is_not_used(tmp_path):
  fp = {"pairs": 2, "tokens": "abc"}
  path = reference_cache.write(str(tmp_path), fp, [-1.0, -2.0], [-3.0, -4.0])
  found, why = reference_cache.read(str(tmp_path), fp)
  np.testing.assert_array_equal(found[0], [-1.0, -2.0])
  assert why is None
  other = reference_cache.entry_path(str(tmp_path), {"pairs": 2, "tokens": "x"})
  os.replace(path, other)  # renamed by hand
  found, why = reference_cache.read(str(tmp_path), {"pairs": 2, "tokens": "x"})
  assert found is None and why == (f"{other} holds another fingerprint "
                                   "(differs in tokens)")
  short = reference_cache.write(str(tmp_path), {"pairs": 3}, [0.0, 1.0],
                                [0.0, 1.0])
  found, why = reference_cache.read(str(tmp_path), {"pairs": 3})
  assert found is None and why == (f"{short} is damaged (chosen: float32[2], "
                                   "expected float32[3])")
  with np.load(short) as f:
    assert json.loads(str(f["fingerprint"])) == {"pairs": 3}
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_the_cache_implies_precomputed_reference_and_not_sft(tmp_path):
  config = _config(tmp_path)
  assert not config.loss.precompute_reference
  assert build.step_config(config).precomputed_reference
  config.stage = "sft"
  config.data.sources = (f"ultrachat:{tiny.TINY}/ultrachat_200k.jsonl",)
  with pytest.raises(ConfigError, match=r"^loss.reference_cache: the sft stage"):
    validate(config, jax.device_count())
