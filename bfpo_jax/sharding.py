"""Device mesh, logical-axis rules, and shardings of params, state and batches.

The model names each parameter axis logically (``vocab``, ``embed``, ``mlp``,
``q_heads``, ``kv_heads``, ``norm``); :data:`DEFAULT_RULES` maps those names to
the mesh axes ``data``, ``fsdp`` and ``tensor``: FSDP shards weights over
``fsdp`` along ``embed``, tensor parallelism splits heads, mlp and vocabulary
over ``tensor``, and batches split over ``data`` and ``fsdp``. A dimension that
a mesh axis does not divide stays replicated on that axis.

``python -m bfpo_jax.sharding --model mistral_7b --mesh fsdp=4`` prints the
bytes per device of params, optimizer state, gradients and activations, from
shapes alone (nothing is allocated).
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.mistral import abstract_params, activation_sharding, logical_axes
from bfpo_jax.trainable import split, trainable_mask

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("lora_rank", None),
    # Activations: rows over the data-parallel axes (FSDP gathers weights to
    # them), heads and MLP features over tensor. See with_activation_sharding.
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1,
               num_devices: int | None = None) -> dict[str, int]:
  """Resolves one ``-1`` to "the remaining devices"; checks the product."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh: sizes must be positive or -1, got {sizes}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    if n % known:
      raise ValueError(f"mesh {sizes}: {n} devices are not divisible by {known}")
    sizes[unknown[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"but {n} are available")
  return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """A ``(data, fsdp, tensor)`` mesh with automatic (GSPMD) axis types."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names, shape, axis_sizes, rules=DEFAULT_RULES):
  """PartitionSpec for one array from its logical axis names.

  A mesh axis is used at most once per array, and only where it divides the
  dimension; otherwise that dimension is replicated.
  """
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axis = table.get(name)
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a not in used and axis_sizes.get(a, 1) > 1)
    size = math.prod(axis_sizes[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def _is_axes(x):
  return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def param_specs(cfg: MistralConfig, axis_sizes, rules=DEFAULT_RULES):
  """PartitionSpecs of the model params."""
  return jax.tree.map(
      lambda names, x: logical_to_spec(names, x.shape, axis_sizes, rules),
      logical_axes(cfg), abstract_params(cfg), is_leaf=_is_axes)


def lora_specs(param_spec_tree, lora_tree):
  """Adapter specs: A keeps the kernel's input split, B its output split."""
  def spec(adapter, kernel_spec):
    if adapter is None:
      return None
    padded = tuple(kernel_spec) + (None,) * (2 - len(kernel_spec))
    return {"lora_a": PartitionSpec(padded[0], None),
            "lora_b": PartitionSpec(None, padded[1])}

  return jax.tree.map(spec, lora_tree, param_spec_tree,
                      is_leaf=lambda x: x is None or (isinstance(x, dict)
                                                      and "lora_a" in x))


def with_activation_sharding(fn, mesh, rules=DEFAULT_RULES):
  """``fn`` traced with its model activations pinned to ``mesh`` by ``rules``.

  Without pins, XLA's propagation meets FSDP-sharded weights (model width
  over ``fsdp``) and batch-sharded inputs (rows over ``fsdp``) and may settle
  on sharding the width: every device then holds the whole batch and every
  matmul all-reduces full activations. Pinning the residual stream to rows
  makes it gather weights instead (see benchmarks/collectives.py).
  """
  axis_sizes = dict(mesh.shape)

  def resolve(axes, shape):
    return NamedSharding(mesh, logical_to_spec(axes, shape, axis_sizes, rules))

  @functools.wraps(getattr(fn, "func", fn))  # a partial: name the function
  def pinned(*args, **kwargs):
    with activation_sharding(resolve):
      return fn(*args, **kwargs)

  return pinned


def named(mesh, spec_tree):
  """NamedShardings from a pytree of PartitionSpecs (None stays None)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data`` and ``fsdp``."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_bytes(shape, dtype, spec: PartitionSpec, axis_sizes) -> int:
  """Bytes of one device's shard of an array."""
  per_device = list(shape)
  for i, axes in enumerate(tuple(spec)):
    if axes is None:
      continue
    for a in (axes,) if isinstance(axes, str) else axes:
      per_device[i] = -(-per_device[i] // axis_sizes[a])
  return int(np.prod(per_device)) * jnp.dtype(dtype).itemsize


def memory_report(cfg: MistralConfig, axis_sizes, *, mode="selective",
                  pattern=None, lora_rank=16, optimizer="adamw",
                  pairs_per_device=2, seq_len=1024, frozen_dtype=jnp.bfloat16,
                  compute_dtype=jnp.bfloat16, chunk_size=1024,
                  remat_policy="full", layout="padded", pack_length=None,
                  rules=DEFAULT_RULES):
  """Bytes per device of a BFPO step, from shapes alone.

  Trainable leaves are float32 masters with a reference copy in
  ``frozen_dtype`` (none under LoRA) and float32 gradients; frozen leaves are stored in
  ``frozen_dtype``. The activation figure assumes per-block remat: the
  residual stream of every block for chosen+rejected, plus one block's
  working set (attention probabilities in float32 via the XLA path, and
  its boolean [rows, 1, T, T] mask) and one chunk of float32 logits;
  ``remat_policy="dots"`` adds every block's saved matmul outputs (q, k, v,
  o, gate, up, down). ``layout="packed"`` counts the packed rows' worst
  case, one pair in each row of ``pack_length`` (default ``2 * seq_len``)
  tokens: ``pairs_per_device`` rows instead of twice as many rows of
  ``seq_len``. It is an estimate; measure on the device.
  """
  shapes = abstract_params(cfg)
  specs = param_specs(cfg, axis_sizes, rules)
  mask = trainable_mask(shapes, mode, pattern)

  def total(tree, dtype=None):
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(
        jax.tree.map(lambda m, s: s if m is not None else None, tree, specs,
                     is_leaf=lambda x: x is None),
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(shard_bytes(x.shape, dtype or x.dtype, s, axis_sizes)
               for x, s in zip(leaves, spec_leaves))

  trainable, frozen = split(shapes, mask)
  if mode == "lora":
    frozen = shapes
    d = [x for x, m in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask)) if m]
    trainable_bytes = sum(lora_rank * (x.shape[0] + x.shape[1]) * 4 for x in d)
    trainable_bytes //= max(1, axis_sizes.get("fsdp", 1))
    reference_bytes = 0
  else:
    trainable_bytes = total(trainable, jnp.float32)
    reference_bytes = total(trainable, frozen_dtype)
  moments = {"adamw": 2, "rmsprop": 1}[optimizer]
  if layout == "packed":
    b, t = pairs_per_device, pack_length or 2 * seq_len
  else:
    b, t = 2 * pairs_per_device, seq_len
  dim = cfg.hidden_size
  act = jnp.dtype(compute_dtype).itemsize
  n_heads = max(1, cfg.num_attention_heads // axis_sizes.get("tensor", 1))
  block = b * t * (6 * dim + 3 * cfg.intermediate_size) * act
  attention = b * n_heads * t * t * 4 + b * t * t  # probabilities, bool mask
  activations = (cfg.num_hidden_layers * b * t * dim * act + block + attention
                 + chunk_size * cfg.vocab_size * 4 * 2)
  if remat_policy == "dots":
    tp, h = axis_sizes.get("tensor", 1), cfg.dim_per_head
    per_shard = ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * h
                 + 2 * cfg.intermediate_size) // tp
    activations += cfg.num_hidden_layers * b * t * (per_shard + 2 * dim) * act
  report = {
      "params_frozen": total(frozen, frozen_dtype),
      "params_trainable_fp32": trainable_bytes,
      "reference_copy": reference_bytes,
      "optimizer_state": moments * trainable_bytes,
      "gradients": trainable_bytes,
      "activations_estimate": activations,
  }
  report["total"] = sum(report.values())
  return report


def _parse_mesh(text):
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in text.split(","):
    key, _, value = part.partition("=")
    if key not in sizes:
      raise argparse.ArgumentTypeError(f"--mesh: unknown axis {key!r}")
    sizes[key] = int(value)
  return sizes


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Bytes per device of a BFPO step, from shapes alone.")
  parser.add_argument("--model", default="mistral_7b",
                      choices=["mistral_7b", "tiny"])
  parser.add_argument("--mesh", type=_parse_mesh, default="fsdp=4",
                      help="e.g. fsdp=4 or data=2,fsdp=2,tensor=2")
  parser.add_argument("--mode", default="selective",
                      choices=["full", "selective", "lora"])
  parser.add_argument("--pattern", default=None)
  parser.add_argument("--optimizer", default="adamw",
                      choices=["adamw", "rmsprop"])
  parser.add_argument("--pairs_per_device", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--remat_policy", default="full", choices=["full", "dots"])
  parser.add_argument("--layout", default="padded", choices=["padded", "packed"],
                      help="preference rows: padded pairs or packed pairs")
  parser.add_argument("--pack_length", type=int, default=None,
                      help="tokens per packed row (default 2 x seq_len)")
  args = parser.parse_args(argv)
  cfg = getattr(MistralConfig, args.model)()
  report = memory_report(cfg, args.mesh, mode=args.mode, pattern=args.pattern,
                         optimizer=args.optimizer,
                         pairs_per_device=args.pairs_per_device,
                         seq_len=args.seq_len, remat_policy=args.remat_policy,
                         layout=args.layout, pack_length=args.pack_length)
  mesh = ",".join(f"{k}={v}" for k, v in args.mesh.items())
  rows = (f"{args.pairs_per_device} packed rows x "
          f"{args.pack_length or 2 * args.seq_len} tokens"
          if args.layout == "packed" else
          f"{args.pairs_per_device} pairs x {args.seq_len} tokens")
  print(f"{args.model}, mesh {mesh}, {args.mode}, {args.optimizer}, "
        f"{rows} per device, remat {args.remat_policy}")
  for key, value in report.items():
    print(f"  {key:24s} {value / 2**30:8.2f} GiB")


if __name__ == "__main__":
  main()
