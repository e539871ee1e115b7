"""SACPO and P-SACPO (Wachi et al., NeurIPS 2024): DPO for helpfulness, then
DPO for safety from that model, then a linear merge.

    launch/gpu.sh --config configs/sacpo.py:helpful --workdir runs/sacpo_helpful
    launch/gpu.sh --config configs/sacpo.py:safety --workdir runs/sacpo_safety
    python -m bfpo_jax.merge runs/sacpo_helpful runs/sacpo_safety \\
        --weight 0.5 --dtype bfloat16 --out runs/p_sacpo_0.5          # P-SACPO

The reverse order, which the authors also run:

    launch/gpu.sh --config configs/sacpo.py:safety_first \\
        --workdir runs/sacpo_safety_first
    launch/gpu.sh --config configs/sacpo.py:helpful_second \\
        --workdir runs/sacpo_helpful_second

On a CPU, the same four stages at toy scale (minutes): add ``,tiny`` to the
variant (``configs/sacpo.py:helpful,tiny``; workdirs runs/sacpo_tiny_*):
configs/tiny.py's model from random init (or ``--config.init_from=
runs/tiny_sft``) on its bundled PKU-SafeRLHF rows, read both ways.

As the authors' scripts run it (github.com/line/sacpo at b489ae5:
script/train/pku_helpful(dpo)_safety_train.sh,
pku_safety(dpo)_helpful_train.sh, src/train/{helpfulness,safety}_dpo.py,
src/util.py, config/merge/*.yaml):

- data: PKU-Alignment/PKU-SafeRLHF-30K, its train split for both stages and
  its test split for evaluation. The helpfulness stage's chosen response is
  ``better_response_id`` (get_pku_pair_by_helpfulness), the safety stage's
  ``safer_response_id`` (get_pku_pair_by_safety; here the source option
  ``?chosen=safer``). The safety flags are read only for the per-group
  metrics.
- loss: TRL's sigmoid DPO, summed log-probs, no label smoothing. beta 0.1
  for helpfulness (``beta_helpful_dpo=0.1``); the safety stage's beta (the
  paper's beta/lambda) is swept over 0.1, 0.05, 0.025, 0.01 and the merges
  use the 0.01 model, the default here (``--config.loss.beta=0.05`` for
  another point of the sweep). Reverse order: safety 0.01 first
  (``beta_safety_dpo=0.01``), then helpfulness swept over the same four
  values; 0.1 here.
- optimizer: AdamW (adamw_torch, no weight decay), lr 2e-5, cosine, warmup
  ratio 0.03, clip 1.0 (TrainingArguments' default), 3 epochs, bf16, full
  fine-tuning, seed 0; prompts cut to 128 and pairs to 512 tokens as TRL
  cuts them.
- batch: 16 per GPU x 2 accumulation on 8 GPUs = 256 pairs for the first
  stage and on 2 GPUs = 64 pairs for the second; here the same global
  batches on 4 GPUs (4 pairs per device x 16 or 4 microbatches).
- P-SACPO: config/merge/linear_{0.25,0.5,0.75}.yaml merge the helpfulness
  model (weight 1 - W) with the stepwise model (weight W) in bfloat16;
  naive_*.yaml merge the helpfulness model with the safety-only model of the
  reverse order (``python -m bfpo_jax.merge runs/sacpo_helpful
  runs/sacpo_safety_first --weight W``).

What differs, knowingly: the authors start from PKU-Alignment/
alpaca-7b-reproduced with its own prompt template ("BEGINNING OF
CONVERSATION: USER: ... ASSISTANT:"); these configs start from this
project's SFT stage (configs/a100x4_sft.py's runs/sft_7b, as BFPO's
configs/a100x4.py does) with its Zephyr template, so the two methods compare
from one model on one data path. PKU-SafeRLHF-30K is not pinned to a
revision (the authors' scripts do not pin it). Reference log-probs are
precomputed once per stage into the shared cache runs/reference_cache
(loss.reference_cache), which also drops the reference copy (3.4 GiB per
device) that TRL keeps. Checkpoints and evaluation every 100 steps.

Memory per device (python -m bfpo_jax.sharding --model mistral_7b --mesh
fsdp=4 --mode full --pairs_per_device 4 --seq_len 512 --remat_policy dots
--layout packed): 43.1 GiB estimated, of which the reference copy (3.4 GiB)
is not held with precomputed reference log-probs.
"""

from configs import a100x4, tiny

PKU_30K = "pku_saferlhf:PKU-Alignment/PKU-SafeRLHF-30K"
VARIANTS = {  # name: (chosen side, beta, global batch, init_from variant)
    "helpful": ("better", 0.1, 256, None),
    "safety": ("safer", 0.01, 64, "helpful"),
    "safety_first": ("safer", 0.01, 256, None),
    "helpful_second": ("better", 0.1, 64, "safety_first"),
}


def workdir(variant: str, small: bool = False) -> str:
  """The workdir the docstring's commands give a variant's run."""
  return f"runs/sacpo_{'tiny_' if small else ''}{variant}"


def _source(chosen: str, options: str, path: str = PKU_30K) -> str:
  query = "&".join(filter(None, [options, "" if chosen == "better"
                                 else f"chosen={chosen}"]))
  return f"{path}?{query}" if query else path


def get_config(arg="helpful"):
  variant, _, scale = arg.partition(",")
  if variant not in VARIANTS or scale not in ("", "tiny"):
    raise ValueError(f"configs/sacpo.py: {arg!r} is not one of "
                     f"{', '.join(VARIANTS)} (optionally ',tiny')")
  chosen, beta, global_batch, start = VARIANTS[variant]
  small = scale == "tiny"
  c = _tiny(chosen) if small else _full(chosen, global_batch)
  c.stage = "dpo"
  c.loss.beta = beta
  c.loss.label_smoothing = 0.0
  c.loss.average_logps = False
  c.loss.precompute_reference = True
  c.init_from = workdir(start, small) if start else c.init_from
  return c


def _full(chosen, global_batch):
  c = a100x4.get_config("dpo")
  c.seed = 0
  c.trainable.mode = "full"
  c.data.sources = (_source(chosen, "split=train"),)
  c.data.buffer_sources = ()
  c.data.buffer_task, c.data.buffer_weight = "sft", 0.0
  c.data.eval_sources = (_source(chosen, "split=test"),)
  c.data.eval_fraction = 0.0
  c.data.max_prompt_length, c.data.max_length = 128, 512
  c.data.buckets = (128, 256, 512)
  c.data.pack_length = 1024
  c.batch.global_size = global_batch
  c.batch.per_device = 4
  c.batch.accumulation = global_batch // (4 * 4)
  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_ratio = 0.03
  c.num_epochs = 3
  c.loss.reference_cache = "runs/reference_cache"
  c.checkpoint_every_steps = 100
  c.eval_every_steps = 100
  return c


def _tiny(chosen):
  """The same stages on configs/tiny.py's model and bundled PKU-SafeRLHF rows."""
  c = tiny.get_config("dpo")
  c.data.sources = (_source(chosen, "",
                            f"pku_saferlhf:{tiny.TINY}/pku_saferlhf.jsonl"),)
  c.data.buffer_sources = ()
  c.data.buffer_task, c.data.buffer_weight = "sft", 0.0
  c.num_epochs = 3
  c.loss.reference_cache = "runs/reference_cache_tiny"
  return c
