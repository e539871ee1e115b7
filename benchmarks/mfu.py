"""Tokens/s and model FLOPs utilisation of the BFPO step on an accelerator.

    python benchmarks/mfu.py --config configs/a100x4.py --json runs/mfu.json
    python benchmarks/mfu.py --config configs/tiny.py --preset tiny  # CPU smoke
    python benchmarks/mfu.py --config configs/a100x4.py --layout packed \\
        --pairs_per_device 16 --layers 8 --remat_policy full --json OUT.json

Builds the config's step at its real shape (Mistral-7B with random weights
unless ``--preset tiny``), sharded over all local devices, and times it.
``--remat_policy`` and ``--attention_impl`` override the config's
``model.remat_policy`` and ``model.attention_impl``; ``--layers`` the layer
count. ``--layout`` picks the batch:

* ``uniform`` (default): every sequence ``seq_len`` tokens, no padding, the
  first quarter prompt;
* ``padded``: ``pairs_per_device`` pairs of the paper's length mix
  (``benchmarks/packing.py``: PKU-SafeRLHF-like and UltraFeedback pairs
  alternately, cut by the trl rule at the config's lengths) padded to the
  config's ``data.buckets``;
* ``packed``: the same pairs packed as ``data.packing`` packs them (rows of
  ``data.pack_length``, ``data.pairs_per_row`` pairs at most).

FLOPs per step use the standard count (no remat recompute, which would make
it "hardware" FLOPs), for each of the 2B sequences of T tokens (a packed row
counts as half a pair of T tokens, attention over the whole row):

* policy forward: ``2 N T`` (N = matmul parameters incl. the output matrix)
  plus attention ``4 L T^2 D_attn`` (QK^T and AV; causal masking not halved,
  as usual);
* backward: ``2 x forward`` to propagate activations, but weight gradients
  only for trainable matrices: ``2 N T + 2 N_train T`` plus ``2 x`` attention;
* reference forward: ``2 N T`` plus attention.

MFU = FLOPs per step / step time / (devices x peak bf16 FLOP/s), the peak
from :data:`PEAK_BF16` by the device's name (or ``--peak_tflops``).
``tokens_per_s`` counts token slots (what the FLOPs cover), ``real_tokens_per_s``
the slots that hold a token of a pair. The JSON also has the compile time,
the peak device memory (``memory_stats``, where the backend has it) beside
the project's estimate (:func:`bfpo_jax.sharding.memory_report`) and XLA's
own (``memory_analysis``), and how many cuDNN fused-attention calls the
compiled step makes (0: XLA's attention ran). ``--compile_only`` stops after
compiling. The JSON is written once compiled, again once timed (before
``--profile`` traces), and with ``profile_error`` if the trace fails. The
memory estimate assumes per-block remat (an underestimate without).
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

import packing  # noqa: E402  (benchmarks/ is the script's folder)
import profiling  # noqa: E402

from bfpo_jax import sharding, trainable  # noqa: E402
from bfpo_jax import train_step as ts  # noqa: E402
from bfpo_jax.build import step_config  # noqa: E402
from bfpo_jax.model import MistralConfig, init_params  # noqa: E402

PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
    ("H200 NVL", 835e12), ("H200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12))
"""Dense bf16 peak per device, FLOP/s (datasheets, without sparsity). The
first name found in the device's ``device_kind`` wins, so a variant (PCIe,
NVL, A100 before A10, L40S before L4) comes before its family. The H100 SXM
reports as e.g. 'NVIDIA H100 80GB HBM3', the A100s 40 and 80 GB alike."""

LAYOUTS = ("uniform", "padded", "packed")
REMAT_CHOICES = ("none", "full", "dots")


def peak_flops(device) -> float | None:
  kind = device.device_kind.lower()
  for name, flops in PEAK_BF16:
    if name.lower() in kind:
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


def uniform_batch(rng, vocab, pairs, seq_len):
  """Pairs of ``seq_len``-token sequences, the first quarter prompt."""
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(3, vocab, (pairs, seq_len),
                                              dtype=np.int32)
    batch[f"{side}_attention_mask"] = np.ones((pairs, seq_len), bool)
    loss = np.ones((pairs, seq_len), bool)
    loss[:, : seq_len // 4] = False
    batch[f"{side}_loss_mask"] = loss
  batch["chosen_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  batch["rejected_is_safe"] = rng.integers(0, 2, pairs).astype(bool)
  return batch


def mixed_pairs(rng, n, vocab, max_length, max_prompt_length):
  """``n`` tokenized pairs of the paper's length mix, alternately
  PKU-SafeRLHF-like and UltraFeedback, cut by the trl rule."""
  cut = lambda x: packing.truncated(x, max_length, max_prompt_length)  # noqa: E731
  pku, uf = cut(packing.pku_lengths(rng, n)), cut(packing.uf_lengths(rng, n))
  lengths = np.where((np.arange(n) % 2 == 0)[:, None], pku, uf)
  return packing.examples(lengths, rng, vocab)


def make_batch(layout, config, vocab, pairs, seq_len, rows_multiple, seed=0):
  """``(batch, geometry)``: the step's host batch and what it holds.

  ``geometry``: ``rows`` x ``row_length`` token slots, ``pairs``,
  ``real_tokens`` (slots holding a pair's token) and ``flops_pairs`` (the
  ``pairs`` argument of :func:`step_flops`: a packed row is half a pair).
  """
  rng = np.random.default_rng(seed)
  if layout == "uniform":
    batch = uniform_batch(rng, vocab, pairs, seq_len)
    return batch, dict(rows=2 * pairs, row_length=seq_len, pairs=pairs,
                       real_tokens=2 * pairs * seq_len, flops_pairs=pairs)
  d = config.data
  examples = mixed_pairs(rng, pairs, vocab, seq_len, d.max_prompt_length)
  if layout == "padded":
    batch = packing.collate({"kind": "padded", "buckets": tuple(d.buckets)},
                            examples)
    rows, length = 2 * pairs, batch["chosen_input_ids"].shape[1]
    real = int(batch["chosen_attention_mask"].sum()
               + batch["rejected_attention_mask"].sum())
    flops_pairs = pairs
  else:
    batch = packing.collate(
        {"kind": "packed", "pack_length": d.pack_length or 2 * seq_len,
         "pairs_per_row": d.pairs_per_row, "buckets": tuple(d.buckets)},
        examples, rows_multiple=rows_multiple)
    rows, length = batch["input_ids"].shape
    real, flops_pairs = int(batch["attention_mask"].sum()), rows / 2
  return batch, dict(rows=rows, row_length=length, pairs=pairs,
                     real_tokens=real, flops_pairs=flops_pairs)


def memory_estimate(config, cfg, mesh, layout, geometry) -> dict:
  """:func:`sharding.memory_report` of this step, bytes per device."""
  devices = mesh.devices.size
  if layout == "packed":
    rows = dict(pairs_per_device=max(1, geometry["rows"] // devices),
                pack_length=geometry["row_length"], layout="packed")
  else:
    rows = dict(pairs_per_device=max(1, geometry["pairs"] // devices),
                seq_len=geometry["row_length"])
  return sharding.memory_report(
      cfg, dict(mesh.shape), mode=config.trainable.mode,
      pattern=config.trainable.pattern or None,
      frozen_dtype=cfg.param_dtype, compute_dtype=cfg.dtype,
      chunk_size=config.loss.chunk_size,
      remat_policy="dots" if cfg.remat and cfg.remat_policy == "dots"
      else "full", **rows)


def layers_that_fit(estimate, budget_bytes, max_layers) -> int:
  """Most layers (at most ``max_layers``) whose ``estimate(layers)["total"]``
  stays within ``budget_bytes``; the estimate grows linearly with layers."""
  one, two = estimate(1)["total"], estimate(2)["total"]
  per_layer, fixed = two - one, 2 * one - two
  return int(max(0, min(max_layers, (budget_bytes - fixed) // per_layer)))


def cudnn_attention_calls(hlo_text) -> int:
  """cuDNN fused-attention custom calls (forward and backward) in an HLO."""
  return sum("__cudnn$fmha" in line and "custom-call" in line
             for line in hlo_text.splitlines())


def _xla_memory(compiled):
  try:
    stats = compiled.memory_analysis()
    return {k: int(getattr(stats, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes",
        "alias_size_in_bytes", "temp_size_in_bytes", "peak_memory_in_bytes")
        if hasattr(stats, k)}
  except Exception as e:  # the backend may not implement it
    return {"error": f"{type(e).__name__}: {e}"}


def parser():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_flags(p)
  p.add_argument("--layout", default="uniform", choices=LAYOUTS)
  p.add_argument("--remat_policy", choices=REMAT_CHOICES,
                 help="instead of the config's model.remat/remat_policy")
  p.add_argument("--attention_impl", choices=["xla", "cudnn"],
                 help="instead of the config's model.attention_impl")
  p.add_argument("--pairs_per_device", type=int, default=0)
  p.add_argument("--seq_len", type=int, default=0)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--compile_only", action="store_true",
                 help="compile and report, time nothing")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="per-device bf16 peak, if not in the built-in table")
  p.add_argument("--json")
  p.add_argument("--profile", help="also trace 3 steps into this folder "
                 "and print where their time goes")
  return p


def setup(args):
  """``(config, cfg, mesh, batch, geometry)`` from parsed flags; allocates
  nothing on the device."""
  config = load_config(args.config)
  if args.remat_policy:
    config.model.remat = args.remat_policy != "none"
    if args.remat_policy != "none":
      config.model.remat_policy = args.remat_policy
  if args.attention_impl:
    config.model.attention_impl = args.attention_impl
  cfg = model_config(config, args.preset, args.layers)
  mesh = sharding.make_mesh(*(args.mesh or (1, -1, 1)))
  devices = mesh.devices.size
  pairs = (args.pairs_per_device or config.batch.per_device) * devices
  seq_len = args.seq_len or config.data.max_length
  batch, geometry = make_batch(args.layout, config, cfg.vocab_size, pairs,
                               seq_len, rows_multiple=devices)
  return config, cfg, mesh, batch, geometry


def main(argv=None):
  args = parser().parse_args(argv)
  config, cfg, mesh, host_batch, geometry = setup(args)
  devices = jax.devices()
  step_cfg = dataclasses.replace(step_config(config), accumulation_steps=1)
  param_shardings = sharding.named(mesh, sharding.param_specs(cfg, dict(mesh.shape)))
  params = jax.jit(init_params, static_argnums=0, out_shardings=param_shardings)(
      cfg, jax.random.key(0))
  mask = trainable.trainable_mask(params, step_cfg.mode,
                                  config.trainable.pattern or None)
  flops = step_flops(cfg, params, mask, geometry["flops_pairs"],
                     geometry["row_length"])
  optimizer = optax.adamw(config.optimizer.learning_rate)
  state, shardings = ts.create_state(params, optimizer, step_cfg, cfg, mask=mask,
                                     mesh=mesh)
  del params
  jitted = ts.build_train_step(cfg, step_cfg, optimizer, mesh=mesh,
                               shardings=shardings)
  batch = jax.device_put(host_batch, sharding.batch_sharding(mesh))
  tick = time.perf_counter()
  step = (profiling.compile_and_dump(jitted, (state, batch), args.profile)
          if args.profile else jitted.lower(state, batch).compile())
  compile_s = time.perf_counter() - tick
  estimate = memory_estimate(config, cfg, mesh, args.layout, geometry)
  stats = devices[0].memory_stats() or {}
  result = {
      "device": devices[0].device_kind, "devices": len(devices),
      "layers": cfg.num_hidden_layers, "layout": args.layout,
      "remat_policy": cfg.remat_policy if cfg.remat else "none",
      "attention_impl": cfg.attention_impl,
      "cudnn_fmha_calls": cudnn_attention_calls(step.as_text()),
      "pairs": geometry["pairs"], "rows": geometry["rows"],
      "seq_len": geometry["row_length"],
      "real_tokens_per_step": geometry["real_tokens"],
      "compile_s": compile_s, "model_tflops_per_step": flops / 1e12,
      "memory": {"estimate_bytes": estimate["total"], "estimate": estimate,
                 "device_bytes_limit": stats.get("bytes_limit"),
                 "xla_memory_analysis": _xla_memory(step)},
      "date": time.strftime("%Y-%m-%d"),
  }
  if args.json:  # what is known so far, should the steps not finish
    profiling.write_json(result, args.json)
  if not args.compile_only:
    times = []
    for i in range(args.warmup + args.reps):
      tick = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      if i >= args.warmup:
        times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    peak = args.peak_tflops * 1e12 or peak_flops(devices[0])
    slots = geometry["rows"] * geometry["row_length"]
    result.update({
        "median_step_s": median, "step_s": times,
        "tokens_per_s": slots / median,
        "real_tokens_per_s": geometry["real_tokens"] / median,
        "pairs_per_s": geometry["pairs"] / median,
        "achieved_tflops_per_device": flops / median / len(devices) / 1e12,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "peak_source": ("--peak_tflops" if args.peak_tflops else
                        "PEAK_BF16 table" if peak else "none for this device"),
        "mfu": (flops / median / (len(devices) * peak)) if peak else None,
        "loss": float(metrics["loss"])})
    result["memory"]["peak_device_bytes"] = (
        (devices[0].memory_stats() or {}).get("peak_bytes_in_use"))
  print(json.dumps(result, indent=2))
  if args.json:
    profiling.write_json(result, args.json)
  if args.profile and not args.compile_only:
    try:
      profiling.trace(step, state, batch, args.profile)
    except Exception as e:  # the timing stands; profiling.py can retry
      result["profile_error"] = f"{type(e).__name__}: {e}"
      print(f"profile: {result['profile_error']}", file=sys.stderr)
      if args.json:
        profiling.write_json(result, args.json)


if __name__ == "__main__":
  main()
