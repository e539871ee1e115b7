"""Communication per step of a config's real step, from its compiled HLO.

    python benchmarks/collectives.py --config configs/a100x4.py
    python benchmarks/collectives.py --config configs/a100x4.py --layers 4 \\
        --json runs/bench/collectives.json

Compiles the config's train step for its mesh on fake CPU devices from
abstract shapes (nothing is allocated, so Mistral-7B fits on a laptop) and
sums the bytes each device moves through all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute per step, by collective and
by phase/component (the named scopes of :mod:`profiling`). Instructions inside
loops count once per trip (known trip counts of the compiled ``while`` ops).

The figure is the per-device output size of each collective (for all-reduce
the reduced buffer), a standard proxy for the bytes on the wire; divide by
the interconnect bandwidth for a lower bound on communication time.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import numpy as np
import profiling

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2,
                "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s"
                          r"([a-z\-]+)\(")


def _bytes(type_text):
  total = 0
  for dtype, dims in _SHAPE.findall(type_text):
    total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",")
                                                if d] or [1]))
  return total


def _computations(hlo_text):
  """{computation: [instruction lines]} and the entry computation's name."""
  blocks, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match and "=" not in line.split("(")[0]:
        current = match.group(1)
        blocks[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
    else:
      blocks[current].append(line)
  return blocks, entry


def _trip_counts(blocks, entry):
  """How many times each computation runs per call of ``entry``."""
  calls = collections.defaultdict(list)  # caller -> [(callee, times)]
  for name, lines in blocks.items():
    for line in lines:
      trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      body = re.search(r"\bbody=%?([\w.\-]+)", line)
      if body:
        calls[name].append((body.group(1), int(trip.group(1)) if trip else 1))
      for key in ("calls", "to_apply", "condition"):
        for callee in re.findall(key + r"=%?([\w.\-]+)", line):
          calls[name].append((callee, 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
          calls[name].append((callee, 1))  # an upper bound: every branch
  times = collections.Counter({entry: 1})
  order, seen = [entry], {entry}
  for name in order:  # breadth first; HLO call graphs are acyclic
    for callee, _ in calls[name]:
      if callee not in seen:
        seen.add(callee)
        order.append(callee)
  for name in order:
    for callee, n in calls[name]:
      times[callee] += times[name] * n
  return times


def collective_bytes(hlo_text):
  """Per-device bytes per step: ``{"by_kind": {...}, "by_part": {...}}``."""
  blocks, entry = _computations(hlo_text)
  times = _trip_counts(blocks, entry)
  by_kind, by_part = collections.Counter(), collections.Counter()
  for name, lines in blocks.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      kind = match.group(3).removesuffix("-start")
      if kind not in COLLECTIVES:
        continue
      size = _bytes(match.group(2)) * times[name]
      op_name = re.search(r'op_name="([^"]*)"', line)
      phase, component = profiling.classify(op_name.group(1) if op_name
                                             else "")
      by_kind[kind] += size
      by_part[f"{phase}/{component}"] += size
  return {"total_bytes": sum(by_kind.values()), "by_kind": dict(by_kind),
          "by_part": dict(by_part.most_common())}


def compile_step(config, preset="mistral_7b", layers=0, devices=4):
  """The config's jitted train step for ``preset``, compiled from shapes."""
  import jax
  import optax
  from mfu import model_config

  from bfpo_jax import sharding
  from bfpo_jax import train_step as ts
  from bfpo_jax.build import step_config
  from bfpo_jax.model import abstract_params

  cfg = model_config(config, preset, layers)
  m = config.mesh
  sizes = sharding.mesh_shape(m.data, m.fsdp, m.tensor, devices)
  mesh = sharding.make_mesh(**sizes, devices=jax.devices()[:int(np.prod(
      list(sizes.values())))])
  step_cfg = step_config(config)
  optimizer = optax.adamw(config.optimizer.learning_rate)
  params = abstract_params(cfg)
  mask = ts.trainable_mask(params, step_cfg.mode,
                           config.trainable.pattern or None)
  init = lambda p: ts.init_state(p, mask, optimizer, step_cfg)  # noqa: E731
  abstract = jax.eval_shape(init, params)
  shardings = ts.state_shardings(mesh, cfg, abstract, optimizer, step_cfg)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  rows = config.batch.global_size
  t = config.data.max_length
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=sharding.batch_sharding(mesh))
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = spec((rows, t), np.int32)
    batch[f"{side}_attention_mask"] = spec((rows, t), np.bool_)
    batch[f"{side}_loss_mask"] = spec((rows, t), np.bool_)
  batch["chosen_is_safe"] = spec((rows,), np.bool_)
  batch["rejected_is_safe"] = spec((rows,), np.bool_)
  step = ts.build_train_step(cfg, step_cfg, optimizer, mesh=mesh,
                             shardings=shardings)
  return step.lower(state, batch).compile(), cfg, mesh


def main(argv=None):
  from mfu import add_model_flags, load_config  # imports jax: not before main

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_flags(parser)
  parser.add_argument("--devices", type=int, default=4,
                      help="device count, where the config's mesh has a -1")
  parser.add_argument("--json")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  if args.mesh:  # instead of the config's
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = args.mesh
  compiled, cfg, mesh = compile_step(config, args.preset, args.layers,
                                     args.devices)
  result = {"config": args.config, "preset": args.preset,
            "mesh": dict(mesh.shape),
            "layers": cfg.num_hidden_layers,
            "global_batch": config.batch.global_size,
            "accumulation": config.batch.accumulation,
            "seq_len": config.data.max_length,
            **collective_bytes(compiled.as_text())}
  gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
  print(f"{args.config} mesh {result['mesh']} layers {result['layers']}: "
        f"{gib(result['total_bytes'])} per device per step")
  for key, value in result["by_kind"].items():
    print(f"  {key:<20} {gib(value)}")
  for key, value in result["by_part"].items():
    print(f"  {key:<30} {gib(value)}")
  if args.json:
    profiling.write_json(result, args.json)


if __name__ == "__main__":
  # Before jax starts: enough fake CPU devices for any config's mesh.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=64")
  main()
