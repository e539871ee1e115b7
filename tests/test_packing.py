"""Packed preference pairs: layout, equal log-probs, losses and gradients."""

import dataclasses
import functools
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bfpo_jax import build, sharding, train
from bfpo_jax import metrics as metrics_lib
from bfpo_jax import train_step as ts
from bfpo_jax.config import ConfigError, default_config, pack_length, validate
from bfpo_jax.data import packing, pipeline
from bfpo_jax.data.sources import DataError
from bfpo_jax.model import MistralConfig, init_params
from bfpo_jax.model.attention import attention_mask, blockwise_attention
from bfpo_jax.tokenizer import load_tokenizer
from configs import tiny
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

  @jax.jit
  def outputs_and_grads(q, key, v):
    def loss(fn, *args):
      return jnp.sum(jnp.where(valid, fn(*args), 0.0) ** 2)
    dense = functools.partial(jax.nn.dot_product_attention, mask=mask,
                              implementation="xla")
    tiles = functools.partial(blockwise_attention, mask_Bx1xTxS=mask, block=16)
    return [(fn(q, key, v), jax.grad(functools.partial(loss, fn), (0, 1, 2))(
        q, key, v)) for fn in (dense, tiles)]

  (dense, dense_grads), (tiles, tiles_grads) = outputs_and_grads(q, key, v)
  np.testing.assert_allclose(jnp.where(valid, tiles, 0),
                             jnp.where(valid, dense, 0), atol=1e-5)
  assert np.isfinite(np.asarray(tiles)).all()  # padding included
  for want, got in zip(dense_grads, tiles_grads):
    np.testing.assert_allclose(got, want, atol=1e-4)


CFG = helpers.tiny_config(sliding_window=6, num_hidden_layers=1)


@functools.lru_cache
def _state():
  """A full-mode state whose policy differs from its reference."""
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="full", chunk_size=8)
  state, _ = ts.create_state(init_params(CFG, jax.random.key(0)),
                             optax.sgd(0.05), step_cfg, CFG)
  leaves, tree = jax.tree.flatten(state.trainable)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  moved = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return state._replace(trainable=jax.tree.unflatten(tree, moved)), step_cfg


def _step_cfg(**changes):
  return dataclasses.replace(_state()[1], **changes)


def _cases(rng, alone):
  """Pairs of very different lengths and one of ``alone`` tokens, which
  fills a packed row by itself."""
  tok = lambda n: rng.integers(3, helpers.VOCAB, n).tolist()  # noqa: E731
  lens = [(1, 1, 1), (9, 2, 14), (3, 20, 1), (5, 5, 5), (2, 1, 30), (4, 7, 3)]
  pairs = [_pair(tok(p), tok(c), tok(r), (bool(i % 2), bool(i % 3)))
           for i, (p, c, r) in enumerate(lens)]
  p = (alone - 1) // 3
  c = (alone - 1 - p) // 2
  return pairs + [_pair(tok(p), tok(c), tok(alone - 1 - p - c))]


def _padded_and_packed(pairs, length=40, **kw):
  padded = pipeline.collate_pairs(pairs, buckets=(length,), pad_id=0)
  packed = packing.pack_pairs(pairs, length=length, pairs_per_row=3, **kw)
  return padded, packed


def _by_pair(packed, values):
  out = np.zeros(int(packed["weight"].sum()), np.float32)
  held = packed["pair_index"] >= 0
  out[packed["pair_index"][held]] = np.asarray(values)[held]
  return out


def test_packed_logps_equal_unpacked():
  """Policy and reference, summed and averaged, with mean logits; rows of 256
  so the model runs the CPU's tiled attention (two tiles of 128)."""
  state, _ = _state()
  pairs = _cases(np.random.default_rng(3), alone=256)
  padded, packed = _padded_and_packed(pairs, length=256, rows_multiple=4)
  assert (packed["weight"] == 0).any() and not packed["weight"][-1].any()
  assert 256 in packed["attention_mask"].sum(1)  # a pair fills a row alone
  cfgs = (_step_cfg(), _step_cfg(average_logps=True))
  fn = jax.jit(lambda params, batch: [ts.pair_logps(CFG, c, params, batch,
                                                    with_logits=True)
                                      for c in cfgs])
  for params in (ts.policy_params(state, cfgs[0]),
                 ts.reference_params(state, cfgs[0])):
    for (want, want_logits), (got, got_logits) in zip(fn(params, padded),
                                                      fn(params, packed)):
      for w, g in zip(want + want_logits, got + got_logits):
        np.testing.assert_allclose(_by_pair(packed, g), w, atol=1e-4,
                                   rtol=1e-5)


def test_bfpo_dpo_ipo_losses_and_gradients_equal():
  """The recipe's BFPO step (safety pairs + a helpfulness buffer batch, both
  packed), DPO and IPO: losses, metrics and gradients equal the padded ones."""
  state, _ = _state()
  pairs = _cases(np.random.default_rng(4), alone=40)
  padded, packed = _padded_and_packed(pairs[:4])
  padded["buffer"], packed["buffer"] = _padded_and_packed(pairs[3:])
  cfgs = [_step_cfg(buffer_weight=1.0, buffer_task="preference"),
          _step_cfg(stage="dpo"), _step_cfg(stage="ipo")]

  @jax.jit
  def losses_and_grads(state, batch):
    out = []
    for step_cfg in cfgs:
      b = batch if step_cfg.buffer_weight else {
          k: v for k, v in batch.items() if k != "buffer"}
      fn = functools.partial(ts.microbatch_loss, state=state, batch=b,
                             denominators=ts._denominators(b, step_cfg),
                             model_cfg=CFG, step_cfg=step_cfg)
      out.append(jax.value_and_grad(fn, has_aux=True)(state.trainable))
    return out

  for step_cfg, ((_, want), want_grads), ((_, got), got_grads) in zip(
      cfgs, losses_and_grads(state, padded), losses_and_grads(state, packed)):
    assert set(want) == set(got)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4,
                                 err_msg=f"{step_cfg.stage}: {key}")
    want = metrics_lib.values(want)  # the (total, weight) pairs, divided
    assert float(want["loss"]) > 0
    assert ("buffer_loss" in want) == (step_cfg.stage == "bfpo")
    for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads)):
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


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
  cfg = helpers.tiny_config()
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  padded = sharding.memory_report(cfg, sizes, pairs_per_device=4)
  packed = sharding.memory_report(cfg, sizes, pairs_per_device=4,
                                  layout="packed")
  # Same tokens (4 rows of 2048 vs 8 of 1024); attention probabilities and
  # the boolean mask grow with the row length.
  attention = lambda b, t: b * cfg.num_attention_heads * t * t * 4 + b * t * t  # noqa: E731
  assert (packed["activations_estimate"] - padded["activations_estimate"]
          == attention(4, 2048) - attention(8, 1024))
  assert all(packed[k] == padded[k] for k in padded
             if k not in ("activations_estimate", "total"))


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


def test_precomputed_reference_and_eval_of_a_run_equal_padded(tmp_path):
  """build's packed run (reference log-probs of every pair computed in packed
  rows and put back by ``pair_index``, packed eval batches) gives the padded
  run's figures."""
  tokenizer, mesh = load_tokenizer(), sharding.make_mesh(1, -1, 1)
  c = tiny.get_config()
  c.data.sources, c.data.buffer_sources = c.data.sources[:1], ()
  c.data.limit_per_source, c.data.eval_fraction = 24, 0.25
  c.batch.global_size, c.batch.per_device, c.batch.accumulation = 16, 16, 1
  c.data.max_prompt_length, c.data.max_length = 32, 64
  c.data.buckets, c.loss.precompute_reference = (64,), True
  model_cfg, params = build.load_model(c, mesh)
  step_cfg = build.step_config(c)
  state, shardings = ts.create_state(params, optax.sgd(0.1), step_cfg,
                                     model_cfg, mesh=mesh)
  moved = state._replace(trainable=jax.tree.map(lambda x: x * 1.05,
                                                state.trainable))
  eval_fn = ts.build_eval_step(model_cfg, step_cfg, mesh=mesh,
                               shardings=shardings, reduce=False)
  runs = {}
  for layout in ("padded", "packed"):
    c.data.preference_layout = layout
    examples = build.load_examples(c, tokenizer)
    # A pair of two equal responses is a tie whose accuracy rounding flips.
    examples.held_out = [e for e in examples.held_out
                         if e["chosen_ids"] != e["rejected_ids"]]
    build.attach_reference_logps(c, model_cfg, step_cfg, params, examples, mesh,
                                 str(tmp_path / f"{layout}.npz"))
    pairs = [e for source in examples.train for e in source] + examples.held_out
    runs[layout] = ([(e["reference_chosen_logps"], e["reference_rejected_logps"])
                     for e in pairs], train.evaluate(
                         eval_fn, moved, build.make_data(c, examples, 1), mesh))
  np.testing.assert_allclose(runs["packed"][0], runs["padded"][0], atol=1e-4)
  want, got = runs["padded"][1], runs["packed"][1]
  assert want["loss"] > 0 and 0 < want["rewards/accuracy"] < 1
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


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
  # Eval batches of 4 pairs: each pair in one slot of weight 1, in order.
  n = len(examples.held_out)
  assert [sorted(b["pair_index"][b["weight"] > 0].tolist())
          for b in data.eval_batches] == [list(range(min(4, n - start)))
                                          for start in range(0, n, 4)]
  assert all(set(b["weight"][b["weight"] > 0].tolist()) == {1.0}
             for b in data.eval_batches)
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
