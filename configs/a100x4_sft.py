"""The paper's SFT stage on 4 A100s (80 GB): bfpo.sh, step 1.

    huggingface-cli download mistralai/Mistral-7B-v0.1 \\
        --local-dir models/Mistral-7B-v0.1
    launch/gpu.sh --config configs/a100x4_sft.py --workdir runs/sft_7b

configs/a100x4.py then starts from runs/sft_7b. As the reference runs it
(bfpo.sh with recipes/zephyr-7b-beta/sft/selective.yaml and
data/mix_sft.yaml): Mistral-7B-v0.1, only every block's down_proj trains, lr
5e-7, cosine, warmup 0.1, 4 GPUs x 4 sequences x 2 accumulation = 32 rows of
2048 tokens per step, one epoch. Data: all of UltraChat train_sft plus the
first 20% of PKU-SafeRLHF train (the safer response), each conversation with
an empty system turn, packed as trl's ConstantLengthDataset packs them
(concatenated with EOS between, cut into 2048-token rows, attention across
examples) and trained on every token. Evaluated at the end on UltraChat
test_sft and PKU-SafeRLHF test, packed the same way.

Memory per device (python -m bfpo_jax.sharding --model mistral_7b --mesh
fsdp=4 --remat_policy dots --pairs_per_device 2 --seq_len 2048, i.e. 4 rows
of 2048 tokens): 36.7 GiB estimated.
"""

from configs import a100x4


def get_config():
  c = a100x4.get_config("sft")
  c.init_from = ""
  c.model.hf_path = "models/Mistral-7B-v0.1"
  c.trainable.mode = "selective"
  c.data.sources = ("ultrachat:HuggingFaceH4/ultrachat_200k",
                    a100x4.pku("take=0.2"))
  c.data.buffer_sources = ()
  c.data.buffer_task = "sft"
  c.data.buffer_weight = 0.0
  c.data.eval_sources = ("ultrachat:HuggingFaceH4/ultrachat_200k?split=test_sft",
                         a100x4.pku("split=test"))
  c.data.eval_fraction = 0.0
  c.data.max_length = 2048
  c.data.buckets = (2048,)
  c.data.pack_sft = True
  c.data.pack_mode = "stream"
  c.data.sft_loss = "all"
  c.optimizer.learning_rate = 5e-7
  c.batch.global_size = 32
  c.batch.per_device = 4
  c.batch.accumulation = 2
  c.eval_every_steps = 0  # the reference evaluates once, after the epoch
  return c
