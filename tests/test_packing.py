"""Packed preference pairs: layout, equal log-probs, losses and gradients."""

import functools
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bfpo_jax import build, sharding
from bfpo_jax import train_step as ts
from bfpo_jax.config import ConfigError, default_config, pack_length, validate
from bfpo_jax.data import packing, pipeline
from bfpo_jax.data.sources import DataError
from bfpo_jax.model import MistralConfig, init_params
from bfpo_jax.model.mistral import attention_mask, blockwise_attention
from bfpo_jax.model.tokenizer import load_tokenizer
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "bfpo_jax", "data", "tiny")


def _pair(prompt, chosen, rejected, safe=(True, False)):
  return {"prompt_length": len(prompt), "chosen_ids": prompt + chosen,
          "rejected_ids": prompt + rejected, "chosen_is_safe": safe[0],
          "rejected_is_safe": safe[1]}


def test_layout_of_one_pair_by_hand():
  batch = packing.pack_pairs([_pair([1, 5, 6], [7, 8], [9])], length=10,
                             pairs_per_row=2, pad_id=0)
  # shared prompt [1, 5] | chosen branch [6, 7, 8] | rejected branch [6, 9]
  np.testing.assert_array_equal(batch["input_ids"],
                                [[1, 5, 6, 7, 8, 6, 9, 0, 0, 0]])
  np.testing.assert_array_equal(batch["branch_ids"],
                                [[0, 0, 1, 1, 1, 2, 2, 0, 0, 0]])
  np.testing.assert_array_equal(batch["positions"],
                                [[0, 1, 2, 3, 4, 2, 3, 0, 0, 0]])
  np.testing.assert_array_equal(batch["segment_ids"],
                                [[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["loss_mask"],
                                [[0, 0, 0, 1, 1, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(batch["attention_mask"],
                                batch["segment_ids"] > 0)
  np.testing.assert_array_equal(batch["weight"], [[1, 0]])
  np.testing.assert_array_equal(batch["pair_index"], [[0, -1]])
  assert packing.pair_tokens(_pair([1, 5, 6], [7, 8], [9])) == 7
  # Rejected sees the prompt and itself, never chosen; windows in positions.
  mask = np.asarray(attention_mask(
      jnp.asarray(batch["attention_mask"]), jnp.arange(10), 3,
      jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["branch_ids"]),
      jnp.asarray(batch["positions"])))[0, 0]
  np.testing.assert_array_equal(np.nonzero(mask[6])[0], [1, 5, 6])  # "9"
  np.testing.assert_array_equal(np.nonzero(mask[4])[0], [2, 3, 4])  # "8"


def test_first_fit_rows_slots_and_rounding():
  sizes = [5, 9, 3, 4, 2]
  assert packing.first_fit(sizes, 10, 8) == [[1], [0, 3], [2, 4]]
  assert packing.first_fit(sizes, 10, 1) == [[1], [0], [3], [2], [4]]
  with pytest.raises(DataError, match="does not fit"):
    packing.first_fit(sizes, 8, 8)
  # Fewest token slots wins; rows rounded up to the multiple.
  assert packing.choose_rows(sizes, [10, 12, 24], 8, 1)[:2] == (12, 2)
  assert packing.choose_rows(sizes, [10, 24], 8, 2)[:2] == (10, 4)  # 40 < 48
  assert packing.choose_rows([3, 3], [4, 8], 8, 1)[:2] == (4, 2)  # tie: shorter
  pairs = [_pair([1] * p, [2] * c, [3] * r)
           for p, c, r in [(2, 1, 1), (1, 5, 1), (3, 1, 1)]]  # 5, 8, 6 tokens
  batch = packing.pack_pairs(pairs, length=8, pairs_per_row=2,
                             rows_multiple=4)
  assert batch["input_ids"].shape == (4, 8) and batch["weight"].shape == (4, 2)
  assert sorted(batch["pair_index"][batch["pair_index"] >= 0]) == [0, 1, 2]
  assert batch["weight"].sum() == 3 and not batch["segment_ids"][3:].any()


def test_processes_agree_on_shapes_and_split_rows():
  rng = np.random.default_rng(0)
  examples = [_pair(*(rng.integers(3, 60, n).tolist() for n in lens))
              for lens in rng.integers(1, 12, (40, 3))]
  kw = dict(task="preference", global_batch=8, layout="packed", pack_length=32,
            pairs_per_row=3, rows_multiple=2, buckets=(16,))
  whole = pipeline.batches([examples], **kw)
  shares = [pipeline.batches([examples], process_index=p, process_count=2, **kw)
            for p in range(2)]
  for k in range(6):
    a, b = shares[0][k], shares[1][k]
    assert a["input_ids"].shape == b["input_ids"].shape
    assert a["input_ids"].shape[0] * 2 == whole[k]["input_ids"].shape[0]
    for key in whole[k]:
      np.testing.assert_array_equal(
          np.stack([a[key], b[key]], 1).reshape(whole[k][key].shape),
          whole[k][key])
    assert whole[k]["weight"].sum() == 8


def test_blockwise_attention_equals_dense_with_gradients():
  rng = np.random.default_rng(1)
  tok = lambda n: rng.integers(3, 60, n).tolist()  # noqa: E731
  pairs = [_pair(tok(p), tok(c), tok(r)) for p, c, r in
           [(3, 10, 20), (5, 2, 2), (30, 1, 20), (2, 2, 2), (1, 40, 3)]]
  b = packing.pack_pairs(pairs, length=64, pairs_per_row=3, rows_multiple=3)
  rows, t, n, k, h = b["input_ids"].shape + (4, 2, 8)
  q, key, v = (jnp.asarray(rng.normal(size=(rows, t, heads, h)), jnp.float32)
               for heads in (n, k, k))
  mask = attention_mask(*(jnp.asarray(b[x]) for x in ("attention_mask",)),
                        jnp.arange(t), 7, *(jnp.asarray(b[x]) for x in (
                            "segment_ids", "branch_ids", "positions")))
  valid = b["attention_mask"][..., None, None]

  def loss(fn, *args):
    return jnp.sum(jnp.where(valid, fn(*args), 0.0) ** 2)

  dense = functools.partial(jax.nn.dot_product_attention, mask=mask,
                            implementation="xla")
  tiles = functools.partial(blockwise_attention, mask_Bx1xTxS=mask, block=16)
  np.testing.assert_allclose(jnp.where(valid, tiles(q, key, v), 0),
                             jnp.where(valid, dense(q, key, v), 0), atol=1e-5)
  assert np.isfinite(np.asarray(tiles(q, key, v))).all()  # padding included
  for want, got in zip(jax.grad(functools.partial(loss, dense), (0, 1, 2))(
      q, key, v), jax.grad(functools.partial(loss, tiles), (0, 1, 2))(q, key, v)):
    np.testing.assert_allclose(got, want, atol=1e-4)


CFG = helpers.tiny_config(sliding_window=6)


@functools.lru_cache
def _state(stage="bfpo", average=False, precomputed=False):
  """A state whose policy differs from its reference (one step taken)."""
  step_cfg = ts.StepConfig(stage=stage, beta=0.1, mode="full", chunk_size=8,
                           average_logps=average)
  optimizer = optax.sgd(0.05)
  params = init_params(CFG, jax.random.key(0))
  state, _ = ts.create_state(params, optimizer, step_cfg, CFG)
  state, _ = ts.build_train_step(CFG, step_cfg, optimizer)(
      state, helpers.preference_batch(7))
  if precomputed:
    step_cfg = ts.StepConfig(stage=stage, beta=0.1, mode="full", chunk_size=8,
                             average_logps=average, precomputed_reference=True)
  return state, step_cfg


def _cases():
  """Pairs of very different lengths, one that fills a row alone, rows with
  empty slots and an empty row."""
  rng = np.random.default_rng(3)
  tok = lambda n: rng.integers(3, helpers.VOCAB, n).tolist()  # noqa: E731
  lens = [(1, 1, 1), (9, 2, 14), (3, 20, 1), (5, 5, 5), (2, 1, 30), (4, 7, 3)]
  pairs = [_pair(tok(p), tok(c), tok(r), (bool(i % 2), bool(i % 3)))
           for i, (p, c, r) in enumerate(lens)]
  alone = _pair(tok(11), tok(13), tok(15))  # 11 + 13 + 15 + 1 = a full row
  return pairs + [alone]


def _padded_and_packed(pairs, **kw):
  padded = pipeline.collate_pairs(pairs, buckets=(48,), pad_id=0)
  packed = packing.pack_pairs(pairs, length=40, pairs_per_row=3, **kw)
  return padded, packed


def _by_pair(packed, values):
  out = np.zeros(int(packed["weight"].sum()), np.float32)
  held = packed["pair_index"] >= 0
  out[packed["pair_index"][held]] = np.asarray(values)[held]
  return out


@pytest.mark.parametrize("average", [False, True])
def test_packed_logps_equal_unpacked(average):
  state, step_cfg = _state(average=average)
  pairs = _cases()
  padded, packed = _padded_and_packed(pairs, rows_multiple=4)
  assert (packed["weight"] == 0).any() and not packed["weight"][-1].any()
  assert 40 in [int(r.sum()) for r in packed["attention_mask"]]  # a full row
  for params in (ts.policy_params(state, step_cfg),
                 ts.reference_params(state, step_cfg)):
    (want, want_logits) = ts.pair_logps(CFG, step_cfg, params, padded,
                                        with_logits=True)
    (got, got_logits) = ts.pair_logps(CFG, step_cfg, params, packed,
                                      with_logits=True)
    for w, g in zip(want + want_logits, got + got_logits):
      np.testing.assert_allclose(_by_pair(packed, g), w, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("stage", ["bfpo", "dpo", "ipo"])
def test_losses_and_gradients_equal_with_a_packed_buffer(stage):
  state, step_cfg = _state(stage)
  step_cfg = ts.StepConfig(**{**step_cfg.__dict__, "buffer_weight": 1.0,
                              "buffer_task": "preference"})
  pairs = _cases()
  padded, packed = _padded_and_packed(pairs[:4])
  padded["buffer"], packed["buffer"] = _padded_and_packed(pairs[3:])

  def loss_and_grads(batch):
    fn = functools.partial(ts.microbatch_loss, state=state, batch=batch,
                           denominators=ts._denominators(batch, step_cfg),
                           model_cfg=CFG, step_cfg=step_cfg)
    return jax.value_and_grad(lambda t: fn(t), has_aux=True)(state.trainable)

  (_, want), want_grads = loss_and_grads(padded)
  (_, got), got_grads = loss_and_grads(packed)
  assert set(want) == set(got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4,
                               err_msg=key)
  assert float(want["loss"]) > 0 and float(want["buffer_loss"]) > 0
  for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_accumulated_steps_and_precomputed_reference_equal():
  state, step_cfg = _state()
  pairs = _cases()
  padded, packed = _padded_and_packed(pairs[:6], rows_multiple=2)
  ref = ts.reference_logps_step(state, packed, model_cfg=CFG, step_cfg=step_cfg)
  want_ref = ts.reference_logps_step(state, padded, model_cfg=CFG,
                                     step_cfg=step_cfg)
  for side, w, g in zip(("chosen", "rejected"), want_ref, ref):
    np.testing.assert_allclose(_by_pair(packed, g), w, atol=1e-4)
    padded[f"reference_{side}_logps"] = np.asarray(w)
    packed[f"reference_{side}_logps"] = np.asarray(g)
  _, pre_cfg = _state(precomputed=True)
  results = []
  for cfg_, batch in ((step_cfg, padded), (step_cfg, packed),
                      (pre_cfg, packed)):
    cfg_ = ts.StepConfig(**{**cfg_.__dict__, "accumulation_steps": 2})
    step = ts.build_train_step(CFG, cfg_, optax.sgd(0.05))
    new, metrics = step(jax.tree.map(jnp.copy, state), batch)
    results.append((float(metrics["loss"]), new.trainable))
  for loss, trained in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
    for w, g in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(trained)):
      np.testing.assert_allclose(g, w, atol=1e-5)


def test_pair_mask_adds_no_float_mask_on_the_7b_shape():
  """XLA's temp memory for one 7B dense attention (the accelerators' path)
  over a packed row of 2048 tokens
  is the causal mask's plus at most a boolean [T, T]: no float [N, T, T]
  mask (32 x 2048 x 2048 x 4 bytes) appears."""
  cfg = MistralConfig.mistral_7b()
  t, n, k, h = 2048, cfg.num_attention_heads, cfg.num_key_value_heads, 128
  spec = jax.ShapeDtypeStruct

  def attend(q, key, v, ids, branch, positions, packed):
    mask = attention_mask(ids > 0, jnp.arange(t), cfg.sliding_window,
                          ids if packed else None, branch if packed else None,
                          positions)
    return jax.nn.dot_product_attention(q, key, v, mask=mask,
                                        implementation="xla")

  args = (spec((1, t, n, h), jnp.bfloat16), spec((1, t, k, h), jnp.bfloat16),
          spec((1, t, k, h), jnp.bfloat16), spec((1, t), jnp.int32),
          spec((1, t), jnp.int32), spec((1, t), jnp.int32))
  temp = {packed: jax.jit(functools.partial(attend, packed=packed)).lower(
      *args).compile().memory_analysis().temp_size_in_bytes
          for packed in (False, True)}
  assert temp[True] - temp[False] <= t * t, temp


def test_memory_report_counts_packed_rows():
  cfg = MistralConfig.mistral_7b()
  sizes = {"data": 1, "fsdp": 4, "tensor": 1}
  padded = sharding.memory_report(cfg, sizes, pairs_per_device=4)
  packed = sharding.memory_report(cfg, sizes, pairs_per_device=4,
                                  layout="packed")
  # Same tokens (4 rows of 2048 vs 8 of 1024); attention probabilities and
  # the boolean mask grow with the row length.
  attention = lambda b, t: b * cfg.num_attention_heads * t * t * 4 + b * t * t  # noqa: E731
  assert (packed["activations_estimate"] - padded["activations_estimate"]
          == attention(4, 2048) - attention(8, 1024))


def test_config_validates_the_layout():
  c = default_config()
  c.data.sources = ("pku_saferlhf:x.jsonl",)
  c.batch.global_size, c.batch.per_device, c.batch.accumulation = 2, 2, 1
  c.mesh.fsdp = 1
  for field, value, message in (("preference_layout", "zigzag", "preference"),
                                ("pairs_per_row", 0, "pairs_per_row"),
                                ("pack_length", -1, "pack_length")):
    bad = c.copy_and_resolve_references()
    bad.data[field] = value
    with pytest.raises(ConfigError, match=message):
      validate(bad, 1)
  c.data.preference_layout = "packed"
  validate(c, 1)


@pytest.mark.slow
def test_training_cli_packed_equals_padded(tmp_path):
  """The tiny recipe (safety pairs + a helpfulness buffer, 2 microbatches,
  precomputed reference, evaluation) gives the same losses packed."""
  runs = {}
  for layout in ("padded", "packed"):
    workdir = tmp_path / layout
    proc = subprocess.run(
        [sys.executable, "-m", "bfpo_jax.train", "--config=configs/tiny.py",
         f"--workdir={workdir}", "--config.max_steps=3",
         "--config.data.max_length=64", "--config.data.max_prompt_length=32",
         "--config.data.buckets=(64,)", "--config.eval_every_steps=3",
         "--config.export_hf=False", "--config.loss.precompute_reference=True",
         f"--config.data.preference_layout={layout}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
      runs[layout] = [json.loads(line) for line in f]
  for padded, packed in zip(runs["padded"], runs["packed"], strict=True):
    for key in ("loss", "buffer_loss", "eval/loss", "eval/rewards/accuracy"):
      if key in padded:
        np.testing.assert_allclose(packed[key], padded[key], rtol=1e-4,
                                   atol=1e-5, err_msg=key)


def test_recipe_data_packs_train_buffer_and_eval(tmp_path):
  c = default_config()
  c.tokenizer = "mistral"
  c.data.sources = (f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl",)
  c.data.buffer_sources = (f"ultrafeedback:{TINY}/ultrafeedback_binarized.jsonl",)
  c.data.buffer_task, c.data.buffer_weight = "preference", 1.0
  c.data.eval_fraction = 0.25
  c.data.max_prompt_length, c.data.max_length = 64, 128
  c.data.buckets, c.data.preference_layout = (64,), "packed"
  c.batch.global_size, c.batch.per_device, c.batch.accumulation = 8, 4, 2
  examples = build.load_examples(c, load_tokenizer())
  data = build.make_data(c, examples, 1)
  for batch in (data.train[0], data.train[0]["buffer"]):
    rows, length = batch["input_ids"].shape
    assert rows % 2 == 0 and length in (64, 256)  # rows per microbatch
    assert batch["weight"].sum() == 8
  assert sum(data.eval_shares) == len(examples.held_out)
  assert all(b["weight"].sum() == s for b, s in zip(data.eval_batches,
                                                      data.eval_shares))
  c.data.pack_length = 40  # shorter than the fixtures' longest pair
  with pytest.raises(ConfigError, match="data.pack_length: a pair takes"):
    build.load_examples(c, load_tokenizer())


def test_7b_configs_pack_rows_that_hold_any_pair():
  for name in ("a100x4", "tpu_v4_32", "tpu_v5e_64", "redteam"):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.data.preference_layout == "packed", name
    # prompt + longer response <= max_length under trl's rule, so a pair
    # (+1 for the rejected branch's prompt-token copy) is at most 2x.
    assert pack_length(c) >= 2 * c.data.max_length
