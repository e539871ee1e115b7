"""Trainable masks, split/combine and LoRA merge, against hand-built truths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bfpo_jax import trainable

PARAMS = {
    "embed_tokens": {"embedding": np.ones((8, 4), np.float32)},
    "layers": {str(i): {
        "mlp": {"down_proj": {"kernel": np.full((6, 4), i, np.float32)},
                "up_proj": {"kernel": np.zeros((4, 6), np.float32)}},
        "self_attn": {"q_proj": {"kernel": np.zeros((4, 4), np.float32)}},
        "input_layernorm": {"scale": np.ones((4,), np.float32)}}
        for i in range(2)},
}


def _true_paths(mask):
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return {"/".join(k.key for k in path) for path, m in flat if m}


def test_selective_default_is_every_down_proj():
  mask = trainable.trainable_mask(PARAMS, "selective")
  assert _true_paths(mask) == {"layers/0/mlp/down_proj/kernel",
                               "layers/1/mlp/down_proj/kernel"}


def test_lora_default_is_the_attention_projections():
  assert _true_paths(trainable.trainable_mask(PARAMS, "lora")) == {
      "layers/0/self_attn/q_proj/kernel", "layers/1/self_attn/q_proj/kernel"}


def test_full_and_a_custom_pattern():
  assert all(jax.tree.leaves(trainable.trainable_mask(PARAMS, "full")))
  mask = trainable.trainable_mask(PARAMS, "selective", r"layers/1/.*scale$")
  assert _true_paths(mask) == {"layers/1/input_layernorm/scale"}


@pytest.mark.parametrize("mode,pattern,message", [
    ("partial", None, "must be one of"),
    ("selective", r"nothing$", "matches no parameter"),
    ("lora", r"scale$", "non-matrix"),
])
def test_bad_modes_and_patterns_are_named(mode, pattern, message):
  with pytest.raises(ValueError, match=message):
    trainable.trainable_mask(PARAMS, mode, pattern)


def test_split_then_combine_is_the_identity_and_counts_add_up():
  mask = trainable.trainable_mask(PARAMS, "selective")
  train, frozen = trainable.split(PARAMS, mask)
  assert trainable.count_params(train) == 2 * 6 * 4
  assert trainable.count_params(train) + trainable.count_params(frozen) == (
      8 * 4 + 2 * (24 + 24 + 16 + 4))
  assert trainable.tree_bytes(train) == 4 * 2 * 6 * 4
  jax.tree.map(np.testing.assert_array_equal,
               trainable.combine(train, frozen), PARAMS)


def test_lora_merge_is_w_plus_scale_a_b():
  mask = trainable.trainable_mask(PARAMS, "lora")
  lora = trainable.init_lora(PARAMS, mask, rank=2, rng=jax.random.key(0))
  adapter = lora["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(adapter["lora_b"], 0)  # starts at the base
  a = np.arange(8, dtype=np.float32).reshape(4, 2)
  b = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
  lora = jax.tree.map(lambda x: x, lora)
  lora["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = {
      "lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}
  merged = trainable.lora_merge(PARAMS, lora, 0.5)
  np.testing.assert_allclose(
      merged["layers"]["0"]["self_attn"]["q_proj"]["kernel"], 0.5 * a @ b,
      rtol=1e-6)
  np.testing.assert_array_equal(
      merged["layers"]["1"]["mlp"]["down_proj"]["kernel"], 1.0)
