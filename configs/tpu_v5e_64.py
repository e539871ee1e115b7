"""BFPO for Mistral-7B on a TPU v5e-64 slice (64 chips, 16 GiB HBM each).

    launch/tpu_pod.sh NAME ZONE --config configs/tpu_v5e_64.py \\
        --workdir gs://BUCKET/runs/bfpo_7b

data=4 x fsdp=16 over 64 chips; global batch 64 = 1 x 1 x 64 safety pairs
plus as many UltraFeedback buffer pairs, as configs/a100x4.py. Memory per
chip (python -m bfpo_jax.sharding --model mistral_7b --mesh data=4,fsdp=16
--pairs_per_device 2 --layout packed): 5.36 GiB estimated with full remat
(4.85 padded); the "dots" policy of configs/a100x4.py would need 15.86 GiB
of the 16.
"""

from configs import a100x4


def get_config(stage="bfpo"):
  c = a100x4.get_config(stage)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 16, 1
  c.batch.global_size, c.batch.per_device, c.batch.accumulation = 64, 1, 1
  c.model.remat_policy = "full"
  return c
