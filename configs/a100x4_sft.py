"""The paper's SFT stage on 4 A100s: UltraChat + PKU-SafeRLHF safer responses.

    launch/gpu.sh --config configs/a100x4_sft.py --workdir runs/sft_7b \\
        --config.model.hf_path=/path/to/Mistral-7B-v0.1

Full fine-tuning of 7B with fp32 masters: 34.6 GiB per device estimated
(python -m bfpo_jax.sharding --mesh fsdp=4 --mode full --pairs_per_device 4),
which fits 80 GB A100s with remat.
"""

from configs import a100x4


def get_config():
  c = a100x4.get_config("sft")
  c.trainable.mode = "full"
  c.data.sources = (
      "ultrachat:HuggingFaceH4/ultrachat_200k",
      "pku_saferlhf:PKU-Alignment/PKU-SafeRLHF",
  )
  c.data.limit_per_source = 0
  c.optimizer.learning_rate = 2e-5
  c.batch.global_size = 64
  c.batch.per_device = 4
  c.batch.accumulation = 4
  return c
