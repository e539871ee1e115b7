"""Train steps: masks, LoRA, accumulation, buffer term, NaN skip, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bfpo_jax import logprobs, losses, trainable
from bfpo_jax import train_step as ts
from bfpo_jax.model import apply, init_params
from tests import helpers

CFG = helpers.tiny_config()


@functools.lru_cache
def _params():
  return init_params(CFG, jax.random.key(0))


def _run(step_cfg, batch, steps=3, lr=1e-2, pattern=None, optimizer=None):
  optimizer = optimizer or optax.adam(lr)
  state, _ = ts.create_state(_params(), optimizer, step_cfg, CFG, pattern=pattern)
  step = ts.build_train_step(CFG, step_cfg, optimizer)
  batch = jax.device_put(batch)  # as train.py's build.global_batch does
  history = []
  with helpers.no_implicit_transfers():
    for _ in range(steps):
      state, metrics = step(state, batch)
      history.append(jax.device_get(metrics))
  return state, history


def _changed_paths(state, step_cfg):
  before = jax.tree_util.tree_flatten_with_path(_params())[0]
  after = jax.tree.leaves(ts.policy_params(state, step_cfg))
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for (path, a), b in zip(before, after)
          if not np.array_equal(np.asarray(a), np.asarray(b))}


@pytest.mark.parametrize("stage,beta", [("sft", 0.1), ("bfpo", 0.1),
                                        ("dpo", 0.1), ("ipo", 0.1)])
def test_loss_goes_down_on_a_fixed_batch(stage, beta):
  batch = (helpers.sft_batch(0) if stage == "sft"
           else helpers.preference_batch(0))
  step_cfg = ts.StepConfig(stage=stage, beta=beta, mode="full", chunk_size=16)
  _, history = _run(step_cfg, batch, steps=30, lr=3e-3)
  first, last = history[0]["loss"], history[-1]["loss"]
  assert np.isfinite(last) and last < 0.5 * first, (first, last)
  assert all(h["nonfinite"] == 0 for h in history)


def test_selective_trains_only_down_proj_and_frozen_are_bit_identical():
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective")
  state, _ = _run(step_cfg, helpers.preference_batch(1))
  changed = _changed_paths(state, step_cfg)
  down = {f"layers/{i}/mlp/down_proj/kernel" for i in range(CFG.num_hidden_layers)}
  assert changed == down
  # Optimizer state (Adam mu, nu) exists for the trainable leaves only.
  trainable_bytes = trainable.tree_bytes(state.trainable)
  assert trainable.tree_bytes(state.opt_state) == 2 * trainable_bytes + 4
  assert trainable.count_params(state.trainable) == sum(
      CFG.intermediate_size * CFG.hidden_size for _ in range(2))
  # The reference is the initial down_proj, not a second model.
  np.testing.assert_array_equal(
      state.reference["layers"][0]["mlp"]["down_proj"]["kernel"],
      _params()["layers"][0]["mlp"]["down_proj"]["kernel"])


def test_lora_starts_at_base_and_trains_adapters_only():
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="lora", lora_scale=2.0)
  optimizer = optax.adam(1e-2)
  state, _ = ts.create_state(_params(), optimizer, step_cfg, CFG, lora_rank=4)
  ids = helpers.preference_batch(2)["chosen_input_ids"]
  np.testing.assert_array_equal(apply(CFG, ts.policy_params(state, step_cfg), ids),
                                apply(CFG, _params(), ids))
  step = ts.build_train_step(CFG, step_cfg, optimizer)
  for _ in range(3):
    state, _ = step(state, helpers.preference_batch(2))
  jax.tree.map(np.testing.assert_array_equal, state.frozen, _params())
  changed = _changed_paths(state, step_cfg)
  assert changed == {f"layers/{i}/self_attn/{p}_proj/kernel"
                     for i in range(2) for p in "qkvo"}
  adapter = state.trainable["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert adapter["lora_a"].shape == (CFG.hidden_size, 4)
  merged = trainable.lora_merge(_params(), state.trainable, 2.0)
  w = _params()["layers"][0]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(
      merged["layers"][0]["self_attn"]["q_proj"]["kernel"],
      w + 2.0 * adapter["lora_a"] @ adapter["lora_b"], atol=1e-6)


@pytest.mark.parametrize("stage", ["bfpo", "sft", "bfpo_buffer"])
def test_accumulation_equals_one_big_batch(stage):
  batch = (helpers.sft_batch(3) if stage == "sft"
           else helpers.preference_batch(3))
  if stage != "sft":
    batch["weight"][[1, 6]] = 0.0  # padded pairs in two different microbatches
  buffer = {}
  if stage == "bfpo_buffer":  # the reference's helpfulness stream
    batch["buffer"] = helpers.preference_batch(9, length=10)
    batch["buffer"]["weight"][[2, 3]] = 0.0
    buffer = dict(buffer_weight=1.0, buffer_task="preference")
  results = []
  for k in (1, 4):
    step_cfg = ts.StepConfig(stage=stage.split("_")[0], beta=0.1,
                             accumulation_steps=k, mode="full", chunk_size=8,
                             **buffer)
    results.append(_run(step_cfg, batch, steps=2, optimizer=optax.sgd(0.1)))
  (s1, h1), (s4, h4) = results
  if stage != "sft":  # per-group means combine by their groups' counts
    assert {"rewards/chosen/unsafe", "logits/chosen"} <= set(h1[0])
  for a, b in zip(h1, h4):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               s1.trainable, s4.trainable)


def test_step_loss_equals_pure_loss_on_model_logps():
  batch = helpers.preference_batch(4)
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective")
  state, _ = ts.create_state(_params(), optax.sgd(0.0), step_cfg, CFG)

  def logps(side):  # independent path: full logits, unchunked
    logits = apply(CFG, _params(), batch[f"{side}_input_ids"],
                   batch[f"{side}_attention_mask"])
    return logprobs.sequence_logps(logits[:, :-1], batch[f"{side}_input_ids"][:, 1:],
                                   batch[f"{side}_loss_mask"][:, 1:])

  chosen, rejected = logps("chosen"), logps("rejected")
  expected, _ = losses.bfpo_loss(chosen, rejected, chosen, rejected,
                                 batch["chosen_is_safe"],
                                 batch["rejected_is_safe"], beta=0.1)
  metrics = ts.build_eval_step(CFG, step_cfg)(state, batch)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  # At initialisation policy == reference, so the loss is mean(target^2).
  target = losses.bfpo_target(batch["chosen_is_safe"], batch["rejected_is_safe"],
                              beta=0.1)
  np.testing.assert_allclose(metrics["loss"], np.mean(np.square(target)),
                             rtol=1e-5)


def test_precomputed_reference_and_buffer_term():
  batch = helpers.preference_batch(5)
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective")
  state, _ = ts.create_state(_params(), optax.sgd(0.0), step_cfg, CFG)
  ref = jax.jit(functools.partial(ts.reference_logps_step, model_cfg=CFG,
                                  step_cfg=step_cfg))(state, batch)
  cached = dict(batch, reference_chosen_logps=ref[0],
                reference_rejected_logps=ref[1])
  pre_cfg = ts.StepConfig(stage="bfpo", beta=0.1, precomputed_reference=True)
  plain = ts.build_eval_step(CFG, step_cfg)(state, batch)
  pre = ts.build_eval_step(CFG, pre_cfg)(state, cached)
  np.testing.assert_allclose(pre["loss"], plain["loss"], rtol=1e-6)

  buffer = helpers.sft_batch(6)
  buf_cfg = ts.StepConfig(stage="bfpo", beta=0.1, buffer_weight=0.3)
  with_buffer = ts.build_eval_step(CFG, buf_cfg)(state, dict(batch, buffer=buffer))
  sft_cfg = ts.StepConfig(stage="sft")
  sft = ts.build_eval_step(CFG, sft_cfg)(state, buffer)
  np.testing.assert_allclose(with_buffer["loss"],
                             plain["loss"] + 0.3 * sft["loss"], rtol=1e-5)


def test_preference_buffer_loss_is_the_sum_of_two_means():
  main = helpers.preference_batch(10)
  main["weight"][[0, 5, 7]] = 0.0  # unequal real pairs: a pooled mean differs
  buffer = helpers.preference_batch(11, length=14)
  buffer["chosen_is_safe"][:] = buffer["rejected_is_safe"][:] = True
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective")
  state, _ = ts.create_state(_params(), optax.sgd(0.0), step_cfg, CFG)
  plain = ts.build_eval_step(CFG, step_cfg)
  alone_main, alone_buffer = plain(state, main), plain(state, buffer)
  buf_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective",
                          buffer_weight=0.25, buffer_task="preference")
  both = ts.build_eval_step(CFG, buf_cfg)(state, dict(main, buffer=buffer))
  np.testing.assert_allclose(
      both["loss"], alone_main["loss"] + 0.25 * alone_buffer["loss"], rtol=1e-6)
  np.testing.assert_allclose(both["buffer_loss"], alone_buffer["loss"],
                             rtol=1e-6)
  for key in ("rewards/accuracy", "logps/chosen", "count/safe_safe"):
    np.testing.assert_allclose(both[key], alone_main[key], rtol=1e-6)
    np.testing.assert_allclose(both[f"buffer/{key}"], alone_buffer[key],
                               rtol=1e-6)
  # The gradient is that of the two losses added.
  optimizer = optax.sgd(1.0)
  grads = {}
  for name, cfg, batch in (
      ("both", buf_cfg, dict(main, buffer=buffer)),
      ("main", step_cfg, main), ("buffer", step_cfg, buffer)):
    start, _ = ts.create_state(_params(), optimizer, cfg, CFG)
    after, _ = ts.build_train_step(CFG, cfg, optimizer)(start, batch)
    grads[name] = jax.tree.map(lambda a, b: a - b, state.trainable,
                               after.trainable)
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(
      g, a + 0.25 * b, rtol=1e-4, atol=1e-7),
      grads["both"], grads["main"], grads["buffer"])


def test_logits_metrics_are_the_mean_response_logit():
  batch = helpers.preference_batch(12)
  batch["weight"][3] = 0.0
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective")
  state, _ = ts.create_state(_params(), optax.sgd(0.0), step_cfg, CFG)
  metrics = ts.build_eval_step(CFG, step_cfg)(state, batch)
  for side in ("chosen", "rejected"):
    logits = np.asarray(apply(CFG, _params(), batch[f"{side}_input_ids"],
                              batch[f"{side}_attention_mask"]))
    mask = batch[f"{side}_loss_mask"][:, 1:]  # positions predicting the response
    per_row = np.array([logits[i, :-1][mask[i]].mean() for i in range(8)])
    expected = np.average(per_row, weights=batch["weight"])
    np.testing.assert_allclose(metrics[f"logits/{side}"], expected, rtol=1e-4)


def test_nonfinite_step_is_skipped():
  batch = helpers.preference_batch(7)
  batch["reference_chosen_logps"] = np.full(8, np.nan, np.float32)
  batch["reference_rejected_logps"] = np.zeros(8, np.float32)
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, precomputed_reference=True)
  optimizer = optax.adam(1e-2)
  state, _ = ts.create_state(_params(), optimizer, step_cfg, CFG)
  before = jax.device_get(state)
  state, metrics = ts.build_train_step(CFG, step_cfg, optimizer)(state, batch)
  assert metrics["nonfinite"] == 1.0
  assert int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.trainable, before.trainable)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)


def test_masked_optimizer_keeps_no_state_for_frozen_leaves():
  mask = trainable.trainable_mask(_params(), "selective")
  tx = trainable.masked_optimizer(optax.adam(1e-2), mask)
  opt_state = tx.init(_params())
  down_bytes = 2 * 4 * CFG.intermediate_size * CFG.hidden_size * 2  # mu,nu f32
  assert trainable.tree_bytes(opt_state) == down_bytes + 4
  grads = jax.tree.map(jnp.ones_like, _params())
  updates, _ = tx.update(grads, opt_state, _params())
  changed = [m for m, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates))
             if np.any(np.asarray(u) != 0)]
  assert all(changed) and len(changed) == 2


def test_mask_errors():
  with pytest.raises(ValueError, match="matches no parameter"):
    trainable.trainable_mask(_params(), "selective", r"nothing_here")
  with pytest.raises(ValueError, match="mode"):
    trainable.trainable_mask(_params(), "half")
  with pytest.raises(ValueError, match="non-matrix"):
    trainable.trainable_mask(_params(), "lora", r"norm")


def test_packed_sft_loss_equals_unpacked():
  from bfpo_jax.data import pipeline

  batch = helpers.sft_batch(8, rows=4, length=12)
  examples = [{"input_ids": list(ids[att]), "loss_mask": list(loss[att])}
              for ids, att, loss in zip(batch["input_ids"],
                                        batch["attention_mask"],
                                        batch["loss_mask"])]
  packed = pipeline.collate_sft(pipeline.pack_sft(examples, 24), buckets=(24,),
                                pad_id=0)
  assert packed["input_ids"].shape[0] < 4
  step_cfg = ts.StepConfig(stage="sft", chunk_size=8)
  state, _ = ts.create_state(_params(), optax.sgd(0.0), step_cfg, CFG)
  eval_fn = ts.build_eval_step(CFG, step_cfg)
  np.testing.assert_allclose(eval_fn(state, packed)["loss"],
                             eval_fn(state, batch)["loss"], rtol=1e-5)
