"""The paper's BFPO stage on one host with 4 A100s (80 GB): bfpo.sh, step 2.

    launch/gpu.sh --config configs/a100x4_sft.py --workdir runs/sft_7b  # step 1
    launch/gpu.sh --config configs/a100x4.py --workdir runs/bfpo_7b     # step 2

Starts from the SFT stage's workdir, ``runs/sft_7b``; the public Zephyr SFT
model is the documented alternative (``--config.init_from=/path/to/
zephyr-7b-sft-full``, the default of the reference's bfpo/selective.yaml).

As the reference runs it (wx-zhang/bfpo: bfpo.sh, recipes/zephyr-7b-beta/
bfpo/selective.yaml and data/balance_bfpo.yaml, src/alignment/trainer/):
every step sees 32 PKU-SafeRLHF pairs (2 per GPU x 4 accumulation x 4 GPUs)
and, from the "buffer" stream, 32 UltraFeedback pairs (both responses safe);
the loss is the BFPO mean over the first plus the BFPO mean over the second,
so an epoch is N_PKU / 32 steps and uses as many UltraFeedback pairs.
PKU-SafeRLHF is pinned at the reference's revision and cut to the first 20%
of its train split; evaluation runs on its whole test split every 100 steps.
lr 5e-7, cosine, warmup ceil(0.1 x steps), AdamW without weight decay, clip
1.0, one epoch, bf16, beta (tau) 0.01, alpha 0.5, b1 3, only every block's
down_proj trains; prompts keep 512 / pairs 1024 tokens, cut as trl cuts them.

Pairs are packed (data.preference_layout="packed", data.packing): each
prompt runs once, [prompt | chosen | rejected], several pairs per row of at
most 2048 tokens, rows in multiples of 16 (4 devices x 4 microbatches); the
same pairs take about half the token slots and model FLOPs of padded rows
(benchmarks/packing.py, docs/BENCHMARKS.md).
--config.data.preference_layout=padded pads them to the buckets instead.

Memory per device (python -m bfpo_jax.sharding --model mistral_7b --mesh
fsdp=4 --remat_policy dots --pairs_per_device 4 --layout packed, the safety
and helpfulness pairs of a microbatch both live in its backward pass, one
pair per row of 2048 at worst): 36.7 GiB estimated -- 2.5 frozen bf16
params, 1.75 down_proj fp32 masters, 0.9 reference copy, 3.5 Adam moments,
1.75 gradients, ~26 activations (35.7 GiB padded). Remat keeps each block's
matmul outputs ("dots"); --config.model.remat_policy=full needs 15.7 GiB.
"""

from bfpo_jax.config import default_config

PKU = "PKU-Alignment/PKU-SafeRLHF"
PKU_REVISION = "ff7ba91063016c78a225b0f74e1c0860bb18230f"  # as the reference
SFT_WORKDIR = "runs/sft_7b"  # configs/a100x4_sft.py's run


def pku(options: str) -> str:
  """A PKU-SafeRLHF source pinned at the reference's revision."""
  return f"pku_saferlhf:{PKU}?revision={PKU_REVISION}&{options}"


def get_config(stage="bfpo"):
  c = default_config()
  c.stage = stage
  c.seed = 42  # the recipes' seed (data order differs from torch's anyway)
  c.init_from = SFT_WORKDIR
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.model.remat_policy = "dots"
  c.model.attention_impl = "xla"  # "cudnn" for flash attention (right-padded)
  c.trainable.mode = "selective"  # paper: every block's mlp/down_proj
  c.data.sources = (pku("take=0.2"),)  # the safety batch of every step
  c.data.buffer_sources = (
      "ultrafeedback:HuggingFaceH4/ultrafeedback_binarized",)
  c.data.buffer_task = "preference"  # loss = mean(safety) + mean(helpful)
  c.data.buffer_weight = 1.0
  c.data.eval_sources = (pku("split=test"),)
  c.data.eval_fraction = 0.0
  c.data.template = "reference"
  c.data.truncation = "trl"
  c.data.max_prompt_length = 512
  c.data.max_length = 1024
  c.data.buckets = (256, 512, 1024)  # padded lengths; shorter packed rows
  c.data.preference_layout = "packed"
  c.data.pack_length = 2048  # any pair cut to 1024 / 512 fits a row
  c.data.pairs_per_row = 8
  c.data.num_workers = 8
  c.batch.global_size = 32
  c.batch.per_device = 2
  c.batch.accumulation = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-7
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  c.num_epochs = 1
  c.loss.beta, c.loss.alpha, c.loss.b1 = 0.01, 0.5, 3.0
  c.loss.chunk_size = 512
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 100
  return c
