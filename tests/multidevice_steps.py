"""Run as a script with 8 fake CPU devices: BFPO steps on several meshes.

Prints one JSON line: per mesh, the per-step losses, the largest difference
of the trained params from the 1-device run, and the sharding of one leaf.
``packed/...`` runs take the same pairs packed (``data.packing``).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bfpo_jax import sharding  # noqa: E402
from bfpo_jax import train_step as ts  # noqa: E402
from bfpo_jax.data import packing  # noqa: E402
from bfpo_jax.model import init_params  # noqa: E402
from tests import helpers  # noqa: E402

MESHES = {"single": (1, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2),
          "fsdp8": (1, 8, 1)}


def packed(batch):
  """The batch's pairs packed into 16 rows (any mesh x accumulation here)."""
  return packing.pack_pairs(helpers.pairs_of(batch), length=32,
                            pairs_per_row=4, rows_multiple=16)


def run(mesh_sizes, accumulation, steps=3, layout=lambda b: b):
  cfg = helpers.tiny_config()
  n = int(np.prod(mesh_sizes))
  mesh = sharding.make_mesh(*mesh_sizes, devices=jax.devices()[:n])
  step_cfg = ts.StepConfig(stage="bfpo", beta=0.1, mode="selective",
                           accumulation_steps=accumulation, chunk_size=16)
  optimizer = optax.adam(1e-2)
  params = init_params(cfg, jax.random.key(0))
  state, shardings = ts.create_state(params, optimizer, step_cfg, cfg, mesh=mesh)
  step = ts.build_train_step(cfg, step_cfg, optimizer, mesh=mesh,
                             shardings=shardings)
  losses = []
  for i in range(steps):
    state, metrics = step(state, layout(helpers.preference_batch(i, pairs=16)))
    losses.append(float(metrics["loss"]))
  leaf = state.trainable["layers"][0]["mlp"]["down_proj"]["kernel"]
  frozen = state.frozen["layers"][0]["mlp"]["gate_proj"]["kernel"]
  return losses, jax.device_get(state.trainable), {
      "down_proj": list(leaf.sharding.spec), "gate_proj": list(frozen.sharding.spec),
      "devices": len(leaf.sharding.device_set)}


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {}
  reference = None
  for name, sizes in MESHES.items():
    for accumulation in (1, 2):
      losses, trained, specs = run(sizes, accumulation)
      if reference is None:
        reference = trained
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(trained), jax.tree.leaves(reference)))
      out[f"{name}/acc{accumulation}"] = {"losses": losses, "max_param_diff": diff,
                                          **specs}
  for name, accumulation in (("data2_fsdp2_tensor2", 1), ("fsdp8", 2)):
    losses, trained, specs = run(MESHES[name], accumulation, layout=packed)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(trained), jax.tree.leaves(reference)))
    out[f"packed/{name}/acc{accumulation}"] = {
        "losses": losses, "max_param_diff": diff, **specs}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
