"""Tokens/s and model FLOPs utilisation of the BFPO step on an accelerator.

    python benchmarks/mfu.py --config configs/a100x4.py --json runs/mfu.json
    python benchmarks/mfu.py --config configs/tiny.py --preset tiny  # CPU smoke

Builds the config's step at its real shape (Mistral-7B with random weights
unless ``--preset tiny``), sharded over all local devices, and times it.

FLOPs per step use the standard count (no remat recompute, which would make
it "hardware" FLOPs), for each of the 2B sequences of T tokens:

* policy forward: ``2 N T`` (N = matmul parameters incl. the output matrix)
  plus attention ``4 L T^2 D_attn`` (QK^T and AV; causal masking not halved,
  as usual);
* backward: ``2 x forward`` to propagate activations, but weight gradients
  only for trainable matrices: ``2 N T + 2 N_train T`` plus ``2 x`` attention;
* reference forward: ``2 N T`` plus attention.

MFU = FLOPs per step / step time / (devices x peak bf16 FLOP/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import profiling  # noqa: E402  (benchmarks/ is the script's folder)

from bfpo_jax import sharding, trainable  # noqa: E402
from bfpo_jax import train_step as ts  # noqa: E402
from bfpo_jax.build import step_config  # noqa: E402
from bfpo_jax.model import MistralConfig, init_params  # noqa: E402

# Dense bf16 peak per device, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12}


def peak_flops(device) -> float | None:
  for name, flops in PEAK_BF16.items():
    if name.lower() in device.device_kind.lower():
      return flops
  return None


def matmul_params(cfg: MistralConfig, params) -> int:
  """Parameters that take part in matmuls (everything but norms and the
  embedding lookup; the output matrix counts, tied or not)."""
  n = sum(x.size for x in jax.tree.leaves(params["layers"]) if x.ndim == 2)
  return n + cfg.hidden_size * cfg.vocab_size


def step_flops(cfg: MistralConfig, params, mask, pairs, seq_len) -> float:
  """Model FLOPs of one BFPO step (see the module docstring)."""
  n = matmul_params(cfg, params)
  n_train = sum(x.size for x, m in zip(jax.tree.leaves(params),
                                       jax.tree.leaves(mask)) if m)
  tokens = 2 * pairs * seq_len
  attn_width = cfg.num_attention_heads * cfg.dim_per_head
  attention = 4 * cfg.num_hidden_layers * seq_len * attn_width * tokens
  forward = 2 * n * tokens + attention
  backward = 2 * n * tokens + 2 * n_train * tokens + 2 * attention
  return forward + backward + forward  # policy fwd, bwd, reference fwd


def load_config(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _mesh_sizes(text):
  sizes = tuple(int(x) for x in text.split(","))
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(f"--mesh wants data,fsdp,tensor, got {text!r}")
  return sizes


def add_model_flags(parser):
  """--config, --preset, --layers and --mesh, shared with collectives.py."""
  parser.add_argument("--config", default="configs/a100x4.py")
  parser.add_argument("--preset", default="mistral_7b",
                      choices=["mistral_7b", "tiny"])
  parser.add_argument("--layers", type=int, default=0,
                      help="override the layer count (to fit a smaller device "
                      "or compile faster)")
  parser.add_argument("--mesh", type=_mesh_sizes,
                      help="data,fsdp,tensor sizes (one may be -1), e.g. 4,1,1")


def model_config(config, preset, layers=0) -> MistralConfig:
  """The ``preset`` architecture run as ``config.model`` says (dtype, remat)."""
  cfg = getattr(MistralConfig, preset)(
      dtype=np.dtype(config.model.dtype),
      param_dtype=np.dtype(config.model.param_dtype),
      remat=config.model.remat, remat_policy=config.model.remat_policy,
      attention_impl=config.model.attention_impl)
  return cfg.replace(num_hidden_layers=layers) if layers else cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_flags(parser)
  parser.add_argument("--pairs_per_device", type=int, default=0)
  parser.add_argument("--seq_len", type=int, default=0)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="per-device bf16 peak, if not in the built-in table")
  parser.add_argument("--json")
  parser.add_argument("--profile", help="also trace 3 steps into this folder "
                      "and print where their time goes")
  args = parser.parse_args(argv)

  config = load_config(args.config)
  devices = jax.devices()
  cfg = model_config(config, args.preset, args.layers)
  pairs_per_device = args.pairs_per_device or config.batch.per_device
  seq_len = args.seq_len or config.data.max_length
  mesh = sharding.make_mesh(*(args.mesh or (1, -1, 1)))
  pairs = pairs_per_device * len(devices)
  step_cfg = dataclasses.replace(step_config(config), accumulation_steps=1)
  param_shardings = sharding.named(mesh, sharding.param_specs(cfg, dict(mesh.shape)))
  params = jax.jit(init_params, static_argnums=0, out_shardings=param_shardings)(
      cfg, jax.random.key(0))
  mask = trainable.trainable_mask(params, step_cfg.mode,
                                  config.trainable.pattern or None)
  flops = step_flops(cfg, params, mask, pairs, seq_len)
  optimizer = optax.adamw(config.optimizer.learning_rate)
  state, shardings = ts.create_state(params, optimizer, step_cfg, cfg, mask=mask,
                                     mesh=mesh)
  del params
  jitted = ts.build_train_step(cfg, step_cfg, optimizer, mesh=mesh,
                               shardings=shardings)
  rng = np.random.default_rng(0)
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(3, cfg.vocab_size, (pairs, seq_len),
                                              dtype=np.int32)
    batch[f"{side}_attention_mask"] = np.ones((pairs, seq_len), bool)
    loss = np.ones((pairs, seq_len), bool)
    loss[:, : seq_len // 4] = False
    batch[f"{side}_loss_mask"] = loss
  batch["chosen_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  batch["rejected_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  step = (profiling.compile_and_dump(jitted, (state, batch), args.profile)
          if args.profile else jitted.lower(state, batch).compile())

  times = []
  for i in range(args.warmup + args.reps):
    tick = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - tick)
  if args.profile:
    profiling.trace(step, state, batch, args.profile)
  median = statistics.median(times)
  peak = args.peak_tflops * 1e12 or peak_flops(devices[0])
  result = {
      "device": devices[0].device_kind, "devices": len(devices),
      "layers": cfg.num_hidden_layers, "pairs": pairs, "seq_len": seq_len,
      "median_step_s": median, "tokens_per_s": 2 * pairs * seq_len / median,
      "model_tflops_per_step": flops / 1e12,
      "achieved_tflops_per_device": flops / median / len(devices) / 1e12,
      "mfu": (flops / median / (len(devices) * peak)) if peak else None,
      "loss": float(metrics["loss"]), "date": time.strftime("%Y-%m-%d"),
  }
  print(json.dumps(result, indent=2))
  if args.json:
    profiling.write_json(result, args.json)


if __name__ == "__main__":
  main()
