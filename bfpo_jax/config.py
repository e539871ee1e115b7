"""The one config shape every stage and every config file fills in.

``configs/*.py`` start from :func:`default_config` and change what they need;
``--config.FIELD=VALUE`` overrides any field on the command line. Field names
are the public interface of the training CLI.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

from bfpo_jax.data.packing import LAYOUTS
from bfpo_jax.data.pipeline import DEFAULT_BUCKETS, MIXTURES, PACK_MODES
from bfpo_jax.data.sources import TASKS, DataError, SourceSpec
from bfpo_jax.data.tokenize import SFT_LOSSES, TEMPLATES, TRUNCATIONS
from bfpo_jax.hub import is_hub_id
from bfpo_jax.model.config import ATTENTION_IMPLS, REMAT_POLICIES
from bfpo_jax.optimizer import OPTIMIZERS, SCHEDULES
from bfpo_jax.trainable import MODES

STAGES = ("sft", "bfpo", "dpo", "ipo")  # what a run trains (train_step)
DTYPES = ("float32", "bfloat16", "float16")

METHOD_DEFAULTS = {
    "bfpo": {"beta": 0.01, "average_logps": False},  # the paper and its code
    "dpo": {"beta": 0.1, "average_logps": False},  # TRL's DPOConfig
    "ipo": {"beta": 0.1, "average_logps": True},  # the IPO paper, TRL
    "sft": {"beta": 0.01, "average_logps": False},  # unused by the loss
}
"""Per stage, the value of each ``loss`` field left unset (None)."""


PRESETS = ("tiny", "mistral_7b")
ENUMERATED = {
    "stage": STAGES,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat_policy": REMAT_POLICIES,
    "model.attention_impl": ATTENTION_IMPLS,
    "trainable.mode": MODES,
    "data.mixture": MIXTURES,
    "data.template": TEMPLATES,
    "data.truncation": TRUNCATIONS,
    "data.sft_loss": SFT_LOSSES,
    "data.pack_mode": PACK_MODES,
    "data.buffer_task": TASKS,
    "data.preference_layout": LAYOUTS,
    "optimizer.name": OPTIMIZERS,
    "optimizer.schedule": SCHEDULES,
}
"""Every field with a fixed set of values, and the values, checked first."""


class ConfigError(ValueError):
  """A config that cannot run; the message names the field."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "bfpo"  # sft | bfpo | dpo | ipo
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.hf_path = ""  # HF folder or Hub id (owner/name[@revision]); "" =
  # random init of `preset`
  c.model.preset = "tiny"  # random-init architecture: tiny | mistral_7b
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"  # storage dtype of frozen weights
  c.model.remat = False  # rematerialise each block in the backward pass
  c.model.remat_policy = "full"  # full: keep block inputs only; dots: also
  # the weight matmuls' outputs (more memory, almost no recompute)
  c.model.attention_impl = "xla"  # xla | cudnn
  c.init_from = ""  # an earlier run's workdir, an HF folder or Hub id, or a
  # PEFT LoRA adapter folder (its base: model.hf_path, else the adapter's own)
  c.tokenizer = ""  # tokenizer folder or Hub id; "" = the model's, "mistral" =
  # the bundled Mistral-7B-v0.1 one

  c.trainable = ml_collections.ConfigDict()
  c.trainable.mode = "selective"  # full | selective | lora
  c.trainable.pattern = ""  # regex over param paths; "" = the mode's default
  c.trainable.lora_rank = 16
  c.trainable.lora_alpha = 32.0  # LoRA scale = alpha / rank

  c.data = ml_collections.ConfigDict()
  # "KIND:PATH_OR_HUB_NAME[?revision=R&split=S&take=T&chosen=C]" strings (see
  # bfpo_jax.data); take = the first fraction (0.2) or count of the rows;
  # chosen = safer: PKU-SafeRLHF pairs ranked by safety (SACPO's second stage)
  c.data.sources = ()
  c.data.limit_per_source = 0  # 0 = all; else a seeded random subset
  c.data.mixture = "concat"  # concat (count-based) | weighted
  c.data.weights = ()  # per source, for the weighted mixture
  c.data.buffer_sources = ()  # the buffer stream, one batch of it per step
  c.data.buffer_task = "sft"  # preference: the reference's helpfulness
  # stream, loss = mean(main) + buffer_weight * mean(buffer); sft: an SFT term
  c.data.buffer_weight = 0.0  # weight of the buffer loss; 0 = off
  c.data.eval_sources = ()  # whole splits evaluated (e.g. PKU-SafeRLHF test)
  c.data.eval_fraction = 0.05  # also held out of each source for evaluation
  c.data.max_prompt_length = 512
  c.data.max_length = 1024
  c.data.buckets = DEFAULT_BUCKETS  # padded lengths: the smallest holding a
  # batch's longest row (fewer recompiles than one length per batch)
  c.data.preference_layout = "padded"  # padded: chosen and rejected rows
  # each padded to a bucket; packed: [prompt | chosen | rejected] once per
  # pair, pairs packed first-fit into rows (data.packing)
  c.data.pack_length = 0  # tokens per packed row; 0 = 2 x max_length, which
  # holds any pair cut to max_length
  c.data.pairs_per_row = 8  # most pairs in a packed row (shapes stay static)
  c.data.num_workers = 0  # tokenization processes
  c.data.template = "reference"  # reference (the paper's code, Zephyr's
  # template) | generation (Zephyr's, as at inference) | tokenizer (the
  # model's own chat template, rendered as TRL does)
  c.data.truncation = "trl"  # trl (the reference's) | prompt_first
  c.data.sft_loss = "all"  # all tokens (the reference's SFT) | assistant
  c.data.pack_sft = False  # pack SFT examples into rows of max_length
  c.data.pack_mode = "stream"  # stream: concatenated and cut, attention
  # across examples (the reference's trl packing); examples: whole examples
  # per row, attention within each
  c.data.revision = ""  # pin hub datasets without a ?revision= of their own
  c.data.allow_empty_sources = False  # else a source with no usable rows stops
  # the run (a wrong path or split usually means that)

  c.batch = ml_collections.ConfigDict()
  c.batch.global_size = 32  # pairs (or sequences) per optimizer step
  c.batch.per_device = 2  # per data-parallel device per microbatch
  c.batch.accumulation = 4  # microbatches per step

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | rmsprop
  c.optimizer.learning_rate = 5e-7
  c.optimizer.schedule = "cosine"  # cosine | linear | constant
  c.optimizer.warmup_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0
  c.num_epochs = 1
  c.max_steps = 0  # > 0 overrides num_epochs

  c.loss = ml_collections.ConfigDict()
  # Unset (None): the stage's default (METHOD_DEFAULTS): beta 0.01 for BFPO,
  # 0.1 for DPO and IPO as in TRL; IPO averages log-probs over response tokens
  c.loss.beta = ml_collections.config_dict.placeholder(float)  # tau in the paper
  c.loss.alpha = 0.5
  c.loss.b1 = 3.0
  c.loss.label_smoothing = 0.0  # dpo
  c.loss.average_logps = ml_collections.config_dict.placeholder(bool)  # False:
  # sum over response tokens, as the BFPO paper
  c.loss.precompute_reference = False  # reference log-probs once, up front
  c.loss.reference_cache = ""  # a folder runs share: precomputed reference
  # log-probs kept under a fingerprint of what determines them and read back
  # by any run that matches it (implies precompute_reference); "" = off
  c.loss.chunk_size = 256  # tokens per log-prob chunk (prompt/pad chunks skipped)
  c.loss.vocab_chunk_size = 0  # also stream the vocabulary in chunks of this
  # many columns (less memory for big vocabularies); 0 = the whole vocabulary

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all remaining devices
  c.mesh.tensor = 1

  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 3
  c.eval_every_steps = 200  # 0 = only at the end
  c.log_every_steps = 1
  c.max_consecutive_nonfinite = 5
  c.export_hf = True  # write workdir/hf_export at the end (LoRA merged) with a
  # model card; LoRA runs also write their adapters as a PEFT folder
  c.export_license = ""  # the model card's license id; "" = the base model's
  # (from its model card, when its folder has one), else "unknown"

  c.logging = ml_collections.ConfigDict()
  c.logging.wandb = False  # also log metrics.jsonl's scalars to Weights &
  # Biases (pip install 'bfpo-jax[wandb]'); WANDB_MODE=offline works
  c.logging.wandb_project = "bfpo-jax"
  c.logging.wandb_entity = ""  # "" = your default entity
  c.logging.wandb_run_name = ""  # "" = the workdir's name
  return c


def loss_setting(config, name: str):
  """``config.loss[name]``, or the stage's default (:data:`METHOD_DEFAULTS`)
  when it is unset."""
  value = config.loss[name]
  if value is None:
    return METHOD_DEFAULTS.get(config.stage, METHOD_DEFAULTS["bfpo"])[name]
  return value


def step_settings(config) -> dict:
  """The static settings of a run's train step (``train_step.StepConfig``'s
  fields) from its config: the one place the config maps onto the step."""
  t = config.trainable
  return dict(
      stage=config.stage, beta=loss_setting(config, "beta"),
      alpha=config.loss.alpha, b1=config.loss.b1,
      label_smoothing=config.loss.label_smoothing,
      average_logps=loss_setting(config, "average_logps"),
      chunk_size=config.loss.chunk_size,
      vocab_chunk_size=config.loss.vocab_chunk_size or None,
      accumulation_steps=config.batch.accumulation,
      buffer_weight=config.data.buffer_weight,
      buffer_task=config.data.buffer_task, mode=t.mode,
      lora_scale=t.lora_alpha / t.lora_rank,
      precomputed_reference=bool(config.loss.precompute_reference
                                 or config.loss.reference_cache))


def describe_loss(config) -> str:
  """The loss a run optimises, with its effective settings, in one line:
  ``bfpo, beta 0.01, alpha 0.5, b1 3; log-probs summed over response tokens``.
  """
  if config.stage == "sft":
    return "sft, token negative log-likelihood"
  parts = [f"beta {loss_setting(config, 'beta'):g}"]
  if config.stage == "bfpo":
    parts += [f"alpha {config.loss.alpha:g}", f"b1 {config.loss.b1:g}"]
  if config.stage == "dpo":
    parts.append(f"label_smoothing {config.loss.label_smoothing:g}")
  how = "averaged" if loss_setting(config, "average_logps") else "summed"
  return (f"{config.stage}, {', '.join(parts)}; log-probs {how} over response "
          "tokens")


def data_parallel_size(config, num_devices) -> int:
  from bfpo_jax.sharding import mesh_shape

  sizes = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                     num_devices)
  return sizes["data"] * sizes["fsdp"]


def validate(config, num_devices: int) -> None:
  """Raises :class:`ConfigError` naming the first field that cannot work.

  Reads no file and builds nothing, so a bad value stops the run before the
  data or the model load.
  """
  for field, allowed in ENUMERATED.items():
    value = config
    for part in field.split("."):
      value = value[part]
    if value not in allowed:
      raise ConfigError(f"{field}: {value!r} is not one of {allowed}")
  source = config.init_from or config.model.hf_path
  field = "init_from" if config.init_from else "model.hf_path"
  gguf = source.lower().endswith(".gguf")
  if gguf and not os.path.isfile(source):
    raise ConfigError(f"{field}: GGUF file {source!r} does not exist")
  if source and not gguf and not os.path.isdir(source) and not is_hub_id(
      source):
    raise ConfigError(f"{field}: model folder {source!r} does not exist (nor "
                      "is it a Hub id owner/name[@revision])")
  if not source and config.model.preset not in PRESETS:
    raise ConfigError(f"model.preset: {config.model.preset!r} is not one of "
                      f"{PRESETS}")
  if config.loss.vocab_chunk_size < 0:
    raise ConfigError(f"loss.vocab_chunk_size: {config.loss.vocab_chunk_size} "
                      "must be >= 0 (0 = the whole vocabulary)")
  _validate_data(config)
  try:
    dp = data_parallel_size(config, num_devices)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  b = config.batch
  if b.global_size != b.per_device * b.accumulation * dp:
    raise ConfigError(
        f"batch: global_size ({b.global_size}) must equal per_device "
        f"({b.per_device}) x accumulation ({b.accumulation}) x data-parallel "
        f"devices ({dp}) = {b.per_device * b.accumulation * dp}")
  if config.data.max_prompt_length >= config.data.max_length:
    raise ConfigError("data.max_prompt_length must be below data.max_length")
  if max(config.data.buckets) < config.data.max_length:
    raise ConfigError(f"data.buckets: the largest ({max(config.data.buckets)}) "
                      f"must cover data.max_length ({config.data.max_length})")
  loss = config.loss
  beta = loss_setting(config, "beta")
  if not beta > 0:
    raise ConfigError(f"loss.beta: {beta} must be positive (the margin "
                      "is scaled by 1/beta)")
  if config.stage == "bfpo" and not (math.isfinite(loss.b1) and loss.b1 != 1):
    raise ConfigError(f"loss.b1: {loss.b1} makes b3 = 1/(b1 - 1) undefined "
                      "(the paper uses 3)")
  if not 0 <= loss.label_smoothing <= 0.5:
    raise ConfigError(f"loss.label_smoothing: {loss.label_smoothing} is not "
                      "in [0, 0.5]")
  if not config.optimizer.learning_rate >= 0:
    raise ConfigError(f"optimizer.learning_rate: "
                      f"{config.optimizer.learning_rate} must be >= 0")
  if config.max_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError("num_epochs or max_steps must be positive")
  for field in ("precompute_reference", "reference_cache"):
    if config.loss[field] and config.stage == "sft":
      raise ConfigError(f"loss.{field}: the sft stage has no reference "
                        "policy")
  if config.logging.wandb and importlib.util.find_spec("wandb") is None:
    raise ConfigError("logging.wandb: the wandb package is not installed; "
                      "pip install 'bfpo-jax[wandb]' (or pip install wandb)")


def _validate_data(config) -> None:
  d = config.data
  if not d.sources:
    raise ConfigError("data.sources: no data sources given")
  task = "sft" if config.stage == "sft" else "preference"
  if d.buffer_task == "preference" and task == "sft":
    raise ConfigError("data.buffer_task: a preference buffer needs a "
                      "preference stage, not sft")
  for field, want in (("sources", task), ("eval_sources", task),
                      ("buffer_sources", d.buffer_task)):
    for text in d[field]:
      try:
        SourceSpec.parse(text, task=want)
      except DataError as e:
        raise ConfigError(f"data.{field}: {e}") from None
  if not 0.0 <= d.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction: {d.eval_fraction} is not in [0, 1)")
  if d.buffer_weight and not d.buffer_sources:
    raise ConfigError("data.buffer_weight > 0 needs data.buffer_sources")
  if d.pairs_per_row < 1:
    raise ConfigError(f"data.pairs_per_row: {d.pairs_per_row} is not >= 1")
  if d.pack_length < 0:
    raise ConfigError(f"data.pack_length: {d.pack_length} is not >= 0 (0 = "
                      "2 x data.max_length)")


def pack_length(config) -> int:
  """Tokens per packed preference row (``data.pack_length``, 0 = 2 x max)."""
  return config.data.pack_length or 2 * config.data.max_length
