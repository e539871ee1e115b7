"""Mesh sizes, logical-axis rules and the memory report, against hand counts."""

import pytest
from jax.sharding import PartitionSpec as P

from bfpo_jax import sharding
from bfpo_jax.model import MistralConfig


def test_mesh_shape_resolves_and_rejects():
  assert sharding.mesh_shape(2, -1, 2, num_devices=8) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape(1, -1, 1, num_devices=4)["fsdp"] == 4
  with pytest.raises(ValueError, match="needs 8 devices, but 4"):
    sharding.mesh_shape(2, 2, 2, num_devices=4)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.mesh_shape(3, -1, 1, num_devices=8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(-1, -1, 1, num_devices=8)


def test_logical_to_spec_replicates_what_does_not_divide():
  sizes = {"data": 1, "fsdp": 4, "tensor": 2}
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), sizes) == P(
      "fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (6, 128), sizes) == P(
      None, "tensor")
  assert sharding.logical_to_spec(("norm",), (64,), sizes) == P(None)
  # A mesh axis is used once per array.
  assert sharding.logical_to_spec(("mlp", "vocab"), (8, 8), sizes) == P(
      "tensor", None)


def test_memory_report_matches_hand_count_for_mistral_7b():
  cfg = MistralConfig.mistral_7b()
  report = sharding.memory_report(cfg, {"data": 1, "fsdp": 4, "tensor": 1})
  down_proj = 32 * 14336 * 4096  # paper's trainable set
  assert report["params_trainable_fp32"] == down_proj * 4 // 4
  assert report["reference_copy"] == down_proj * 2 // 4
  assert report["optimizer_state"] == 2 * report["params_trainable_fp32"]
  total_params = 7_241_732_096  # Mistral-7B-v0.1
  norms = 65 * 4096  # 2 per block + final; replicated, not sharded
  assert report["params_frozen"] == (total_params - down_proj - norms) * 2 // 4 + (
      norms * 2)
  lora = sharding.memory_report(cfg, {"data": 1, "fsdp": 4, "tensor": 1},
                                mode="lora", lora_rank=8)
  assert lora["reference_copy"] == 0
  assert lora["params_frozen"] == (total_params - norms) * 2 // 4 + norms * 2
  # remat "dots" keeps q (4096), k, v (1024 each), o (4096), gate, up
  # (14336 each) and down (4096) per token per block: 2 x 4 x 1024 tokens in
  # bf16 over 32 blocks.
  dots = sharding.memory_report(cfg, {"data": 1, "fsdp": 4, "tensor": 1},
                                remat_policy="dots")
  per_token = 4096 + 2 * 1024 + 4096 + 2 * 14336 + 4096
  assert (dots["activations_estimate"] - report["activations_estimate"]
          == 32 * 4 * 1024 * per_token * 2)


def test_memory_cli_prints(capsys):
  sharding.main(["--model", "mistral_7b", "--mesh", "fsdp=4"])
  out = capsys.readouterr().out
  assert "params_frozen" in out and "total" in out and "GiB" in out
