"""The paper's BFPO stage for Mistral-7B on one host with 4 A100s (80 GB).

    launch/gpu.sh --config configs/a100x4.py --workdir runs/bfpo_7b \\
        --config.init_from=/path/to/zephyr-7b-sft-full

Recipe (BFPO, ICLR 2025): lr 5e-7, cosine, warmup 0.1, one epoch, global
batch 32 = 2 per GPU x 4 accumulation x 4 GPUs, bf16, beta (tau) 0.01,
alpha 0.5, b1 3, only every block's down_proj trains; data 30K UltraFeedback
pairs (both safe) + 30K PKU-SafeRLHF pairs, prompts 512 / pairs 1024 tokens.

Memory per device (python -m bfpo_jax.sharding --model mistral_7b --mesh
fsdp=4 --remat_policy dots): 23.1 GiB estimated -- 2.5 frozen bf16 params,
1.75 down_proj fp32 masters, 0.9 reference copy, 3.5 Adam moments, 1.75
gradients, ~12.8 activations. Remat keeps each block's matmul outputs
("dots"), so the backward pass recomputes only attention scores: by the FLOP
count of benchmarks/mfu.py that is ~22% fewer FLOPs per step than full remat
(12.6 GiB per device; --config.model.remat_policy=full where memory is short).
"""

from bfpo_jax.config import default_config


def get_config(stage="bfpo"):
  c = default_config()
  c.stage = stage
  c.model.hf_path = ""  # set, or pass --config.init_from=<SFT checkpoint>
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.model.remat_policy = "dots"
  c.model.attention_impl = "xla"  # "cudnn" for flash attention (right-padded)
  c.trainable.mode = "selective"  # paper: every block's mlp/down_proj
  c.data.sources = (
      "ultrafeedback:HuggingFaceH4/ultrafeedback_binarized",
      "pku_saferlhf:PKU-Alignment/PKU-SafeRLHF",
  )
  c.data.limit_per_source = 30_000
  c.data.max_prompt_length = 512
  c.data.max_length = 1024
  c.data.buckets = (256, 512, 1024)
  c.data.eval_fraction = 0.02
  c.data.num_workers = 8
  c.batch.global_size = 32
  c.batch.per_device = 2
  c.batch.accumulation = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1
  c.optimizer.learning_rate = 5e-7
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_ratio = 0.1
  c.num_epochs = 1
  c.loss.beta, c.loss.alpha, c.loss.b1 = 0.01, 0.5, 3.0
  c.loss.chunk_size = 512
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200
  return c
