"""Qwen2 / Qwen3 checkpoints against transformers' PyTorch models.

Qwen2 puts biases on q, k and v (not o); Qwen3 normalises every head of q and
k with an RMSNorm before RoPE and may set ``attention_bias`` on all four
projections. Random tiny configs, saved by transformers, loaded by us.
"""

import json

import numpy as np
import optax
import pytest
import torch
import transformers

from bfpo_jax import losses, sharding, trainable
from bfpo_jax import model as M
from bfpo_jax import train_step as ts
from bfpo_jax.model import hf_io
from tests.helpers import assert_greedy_equals_transformers

VOCAB = 96
CASES = {
    "qwen2_gqa_tied": ("qwen2", dict(num_key_value_heads=2,
                                     tie_word_embeddings=True)),
    "qwen2_mha_untied": ("qwen2", dict(num_key_value_heads=4,
                                       rope_theta=1e6)),
    "qwen3_headdim24": ("qwen3", dict(num_key_value_heads=2, head_dim=24)),
    "qwen3_biases_tied": ("qwen3", dict(num_key_value_heads=1,
                                        attention_bias=True,
                                        tie_word_embeddings=True)),
}
CLASSES = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}


def save_random_qwen(path, kind, seed=0, **overrides):
  fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)
  fields.update(overrides)
  config_cls, model_cls = CLASSES[kind]
  torch.manual_seed(seed)
  config = config_cls(**fields)
  config._attn_implementation = "eager"
  hf_model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in hf_model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  hf_model.save_pretrained(path, safe_serialization=True)
  return hf_model


def _logits(hf_model, ids, mask=None):
  kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
  with torch.no_grad():
    return hf_model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def qwen(request, tmp_path_factory):
  kind, overrides = CASES[request.param]
  path = str(tmp_path_factory.mktemp(request.param))
  hf_model = save_random_qwen(path, kind, **overrides)
  cfg, params = hf_io.load_hf(path)
  return request.param, path, hf_model, cfg, params


def test_config_and_parameters_follow_the_architecture(qwen):
  name, _, _, cfg, params = qwen
  kind, overrides = CASES[name]
  attn = params["layers"][0]["self_attn"]
  assert cfg.model_type == kind and cfg.sliding_window is None
  assert "bias" in attn["q_proj"] and "bias" in attn["v_proj"] if (
      kind == "qwen2" or overrides.get("attention_bias")) else (
      "bias" not in attn["q_proj"])
  assert ("bias" in attn["o_proj"]) == bool(overrides.get("attention_bias"))
  assert ("q_norm" in attn) == (kind == "qwen3")
  if kind == "qwen3":
    assert attn["k_norm"]["scale"].shape == (cfg.dim_per_head,)


def test_logits_match_transformers_unpadded_and_left_padded(qwen):
  _, _, hf_model, cfg, params = qwen
  ids = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
  np.testing.assert_allclose(M.apply(cfg, params, ids), _logits(hf_model, ids),
                             atol=1e-4, rtol=1e-4)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  ours = np.asarray(M.apply(cfg, params, ids, mask))
  theirs = _logits(hf_model, ids, mask)
  np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4,
                             rtol=1e-4)


def test_save_hf_round_trips_through_transformers(qwen, tmp_path):
  name, _, hf_model, cfg, params = qwen
  out = str(tmp_path / "export")
  hf_io.save_hf(out, cfg, params)
  with open(f"{out}/config.json") as f:
    assert json.load(f)["architectures"] == [
        CLASSES[CASES[name][0]][1].__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  ids = np.random.default_rng(1).integers(3, VOCAB, (1, 20))
  np.testing.assert_allclose(_logits(reloaded, ids), _logits(hf_model, ids),
                             atol=1e-5, rtol=1e-5)
  assert hf_io.load_config(out) == cfg


@pytest.mark.parametrize("qwen", ["qwen3_biases_tied"], indirect=True)
def test_cached_greedy_equals_transformers(qwen):
  _, _, hf_model, cfg, params = qwen
  assert_greedy_equals_transformers(hf_model, cfg, params, VOCAB)


def _torch_response_logps(hf_model, ids, loss_mask):
  logits = torch.tensor(_logits(hf_model, ids))
  logp = torch.log_softmax(logits[:, :-1], -1).gather(
      -1, torch.tensor(ids[:, 1:])[..., None])[..., 0].numpy()
  return (logp * loss_mask[:, 1:]).sum(-1)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_one_bfpo_step_loss_equals_the_pytorch_computation(kind, tmp_path):
  """The step's BFPO loss on a Qwen policy, with a second Qwen as the
  reference, equals the loss of the same pairs' log-probs from PyTorch."""
  policy = save_random_qwen(str(tmp_path / "policy"), kind, seed=0,
                            num_key_value_heads=2)
  reference = save_random_qwen(str(tmp_path / "reference"), kind, seed=1,
                               num_key_value_heads=2)
  cfg, params = hf_io.load_hf(str(tmp_path / "policy"))
  rng = np.random.default_rng(3)
  pairs, length, prompt = 4, 16, 5
  batch = {}
  shared = rng.integers(3, VOCAB, (pairs, prompt))
  for side in ("chosen", "rejected"):
    ids = np.concatenate([shared, rng.integers(3, VOCAB, (pairs, length
                                                          - prompt))], 1)
    lengths = rng.integers(prompt + 2, length + 1, pairs)
    attention = np.arange(length)[None] < lengths[:, None]
    loss_mask = attention & (np.arange(length)[None] >= prompt)
    batch.update({f"{side}_input_ids": np.where(attention, ids, 0),
                  f"{side}_attention_mask": attention,
                  f"{side}_loss_mask": loss_mask})
  batch["chosen_is_safe"] = np.array([1, 1, 0, 0], bool)
  batch["rejected_is_safe"] = np.array([1, 0, 1, 0], bool)
  logps = {(who, side): _torch_response_logps(
      m, batch[f"{side}_input_ids"], batch[f"{side}_loss_mask"])
      for who, m in (("policy", policy), ("reference", reference))
      for side in ("chosen", "rejected")}
  batch["reference_chosen_logps"] = logps["reference", "chosen"]
  batch["reference_rejected_logps"] = logps["reference", "rejected"]
  want, _ = losses.bfpo_loss(
      logps["policy", "chosen"], logps["policy", "rejected"],
      logps["reference", "chosen"], logps["reference", "rejected"],
      batch["chosen_is_safe"], batch["rejected_is_safe"], beta=0.1)
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, accumulation_steps=1,
                           precomputed_reference=True, chunk_size=8)
  mesh = sharding.make_mesh(1, 1, 1)
  optimizer = optax.sgd(0.0)
  state, shards = ts.create_state(params, optimizer, step_cfg, cfg, mesh=mesh)
  step = ts.build_train_step(cfg, step_cfg, optimizer, mesh=mesh,
                             shardings=shards)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-4)
  assert trainable.count_params(state.trainable) > 0


def test_per_layer_sliding_windows_are_refused_in_one_line(tmp_path):
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
      use_sliding_window=True, sliding_window=8, max_window_layers=1)
  config.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="sliding-window") as err:
    hf_io.load_config(str(tmp_path))
  assert "\n" not in str(err.value)


def test_new_parameters_shard_like_their_neighbours_and_lora_targets_them():
  """q/k/v biases split over ``tensor`` like their kernels' outputs; the
  per-head q/k norms are replicated; LoRA's default targets are q/k/v/o."""
  cfg = M.MistralConfig.tiny(model_type="qwen3", qk_norm=True,
                             attention_bias=True, num_attention_heads=4,
                             num_key_value_heads=2)
  specs = sharding.param_specs(cfg, {"data": 1, "fsdp": 2, "tensor": 2})
  attn = specs["layers"][0]["self_attn"]
  assert attn["q_proj"]["kernel"] == sharding.PartitionSpec("fsdp", "tensor")
  assert attn["q_proj"]["bias"] == sharding.PartitionSpec("tensor")
  assert attn["o_proj"]["bias"] == sharding.PartitionSpec("fsdp")
  assert attn["q_norm"]["scale"] == sharding.PartitionSpec(None)
  mask = trainable.trainable_mask(M.abstract_params(cfg), "lora")
  lora = mask["layers"][0]["self_attn"]
  assert all(lora[p]["kernel"] for p in ("q_proj", "k_proj", "v_proj",
                                         "o_proj"))
  assert not lora["q_proj"]["bias"] and not lora["q_norm"]["scale"]
