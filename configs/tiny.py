"""Tiny CPU default: SFT then BFPO on bundled real-schema data, in minutes.

    python -m bfpo_jax.train --config configs/tiny.py:sft --workdir runs/tiny_sft
    python -m bfpo_jax.train --config configs/tiny.py --workdir runs/tiny_bfpo \\
        --config.init_from=runs/tiny_sft

A 2-layer, d=64 Mistral with the real 32k Mistral-7B tokenizer (bundled in
mistral-common), random init, full fine-tuning at a high learning rate so the
losses visibly move. `:bfpo` (default), `:sft`, `:dpo` or `:ipo` picks the stage.

The recipe's shape at toy scale (the reference's template, trl truncation,
BFPO steps of safety pairs plus a same-sized UltraFeedback buffer batch, SFT
loss on all tokens), with simpler settings than configs/a100x4*.py: random
init instead of Mistral-7B, 64/128-token prompts/pairs, batch 8, 2-3 epochs,
evaluation on 10% held out of the training files instead of test splits,
no SFT packing, every parameter trained.

Memory per device: 0.11 GiB estimated (float32; the run prints it at start-up
from bfpo_jax.sharding.memory_report).
"""

import os

from bfpo_jax.config import default_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "bfpo_jax", "data", "tiny")


def get_config(stage="bfpo"):
  c = default_config()
  c.stage = stage
  c.model.preset = "tiny"
  c.tokenizer = "mistral"
  c.trainable.mode = "full"
  if stage == "sft":
    c.data.sources = (f"ultrachat:{TINY}/ultrachat_200k.jsonl",
                      f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl")
  else:  # the recipe's shape: safety pairs + a helpfulness buffer stream
    c.data.sources = (f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl",
                      f"redteam:{TINY}/redteam.json")
    c.data.buffer_sources = (
        f"ultrafeedback:{TINY}/ultrafeedback_binarized.jsonl",)
    c.data.buffer_task = "preference"
    c.data.buffer_weight = 1.0
  c.data.eval_fraction = 0.1
  c.data.max_prompt_length = 64
  c.data.max_length = 128
  c.data.buckets = (64, 128)
  c.batch.global_size = 8
  c.batch.per_device = 4
  c.batch.accumulation = 2
  c.mesh.fsdp = -1
  c.num_epochs = 2 if stage == "sft" else 3
  c.optimizer.learning_rate = 3e-3 if stage == "sft" else 1e-3
  c.optimizer.warmup_ratio = 0.1
  if stage == "bfpo":  # dpo/ipo keep their defaults (beta 0.1, as TRL)
    c.loss.beta = 0.1  # tau; targets of +-10 nats on a model this small
  c.loss.chunk_size = 256
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 10
  return c
