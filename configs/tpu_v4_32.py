"""BFPO for Mistral-7B on a TPU v4-32 slice (16 chips, 4 hosts).

    launch/tpu_pod.sh NAME ZONE --config configs/tpu_v4_32.py \\
        --workdir gs://BUCKET/runs/bfpo_7b --config.init_from=gs-fuse-path

FSDP over all 16 chips (32 GiB HBM each); global batch 32 = 2 x 1 x 16
safety pairs plus as many UltraFeedback buffer pairs, as configs/a100x4.py.
Memory per chip (python -m bfpo_jax.sharding --model mistral_7b --mesh
fsdp=16 --pairs_per_device 4 --remat_policy dots --layout packed): 28.88
GiB estimated; --config.model.remat_policy=full: 7.88 GiB.
"""

from configs import a100x4


def get_config(stage="bfpo"):
  c = a100x4.get_config(stage)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 1
  c.batch.per_device, c.batch.accumulation = 2, 1
  c.model.attention_impl = "xla"
  return c
