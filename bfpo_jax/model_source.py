"""Where a run's model comes from: a random-init preset, an HF folder or
Hub id, a GGUF file (dequantized, with its own tokenizer), an earlier run's
workdir (its ``hf_export/``), or a PEFT LoRA adapter on its base model.

Everything here refuses what cannot load in one line (``ConfigError``
naming the field) before anything heavy starts.
"""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp

from bfpo_jax import peft_io, sharding, trainable
from bfpo_jax.config import ConfigError
from bfpo_jax.hub import HubError, resolve_model
from bfpo_jax.model import hf_io
from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.hf_io import load_config, load_hf
from bfpo_jax.model.mistral import abstract_params, init_params
from bfpo_jax.tokenizer import load_tokenizer

EXPORT_DIR = "hf_export"
PEFT_DIR = "peft_adapter"  # a LoRA run's adapters, as peft saves them


def _source_field(config) -> str:
  return "init_from" if config.init_from else "model.hf_path"


def peft_adapter(config) -> str:
  """The local folder of the PEFT LoRA adapter ``init_from`` names, or ""."""
  if not config.init_from:
    return ""
  try:
    folder = resolve_model(config.init_from)
  except HubError as e:
    raise ConfigError(f"init_from: {e}") from None
  return folder if peft_io.is_adapter(folder) else ""


def model_source(config) -> str:
  """The model to start from as named: a folder or Hub id ("" = random init).

  ``init_from`` wins over ``model.hf_path``; an earlier run's workdir means
  its ``hf_export/``; a PEFT adapter means its base: ``model.hf_path``, else
  the adapter's ``base_model_name_or_path``.
  """
  adapter = peft_adapter(config)
  if adapter:
    try:
      base = peft_io.read_adapter_config(adapter).get(
          "base_model_name_or_path")
    except peft_io.AdapterError as e:
      raise ConfigError(f"init_from: {e}") from None
    return config.model.hf_path or base or ""
  source = config.init_from or config.model.hf_path
  if source and os.path.isdir(os.path.join(source, EXPORT_DIR)):
    return os.path.join(source, EXPORT_DIR)  # an earlier run's workdir
  return source


def model_folder(config) -> str:
  """:func:`model_source` as a local folder (a Hub id is fetched once)."""
  source = model_source(config)
  if not source:
    return ""
  try:
    return resolve_model(source)
  except HubError as e:
    raise ConfigError(f"{_source_field(config)}: {e}") from None


def check_model_source(config) -> None:
  """Refuses, in one line and before anything loads, a model source that
  cannot load: a run workdir without an export, a folder without
  ``config.json``, one with only PyTorch pickle weights, a Hub id that cannot
  be fetched, or a PEFT adapter without a base model or safetensors."""
  given = config.init_from or config.model.hf_path
  if not given:
    return
  field = _source_field(config)
  adapter, source = peft_adapter(config), model_source(config)
  if adapter and not source:
    raise ConfigError(f"init_from: the PEFT adapter {given} names no base "
                      "model; set --config.model.hf_path")
  checkpoints = os.path.join(given, "checkpoints")
  if source == given and os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints)):
    raise ConfigError(
        f"{field}: {given} is a run workdir with checkpoints but no "
        f"{EXPORT_DIR}/; export its latest checkpoint first: python -m "
        f"bfpo_jax.train --export_only --workdir {given}")
  if adapter and not config.model.hf_path:
    field = f"init_from (the base model its {peft_io.ADAPTER_CONFIG} names)"
  folder = model_folder(config)
  try:
    hf_io.check_folder(folder)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{field}: {e}") from None


def with_peft_settings(config):
  """``(config, notes)``: with a PEFT adapter as ``init_from`` and LoRA
  training, a copy whose ``trainable.lora_rank``, ``lora_alpha`` and
  ``pattern`` are the adapter's (so the run continues exactly its adapters);
  otherwise ``config`` itself."""
  adapter = peft_adapter(config)
  if not adapter or config.trainable.mode != "lora":
    return config, []
  cfg = load_config(model_folder(config))
  try:
    _, settings = peft_io.load_peft(adapter, abstract_params(cfg),
                                    cfg.num_hidden_layers)
  except peft_io.AdapterError as e:
    raise ConfigError(f"init_from: {e}") from None
  config = copy.deepcopy(config)
  config.trainable.lora_rank = settings["rank"]
  config.trainable.lora_alpha = settings["alpha"]
  config.trainable.pattern = settings["pattern"]
  return config, [f"LoRA from the PEFT adapter {config.init_from}: rank "
                  f"{settings['rank']}, alpha {settings['alpha']:g}, pattern "
                  f"{settings['pattern']}"]


def _adapter_tree(config, cfg):
  try:
    return peft_io.load_peft(peft_adapter(config), abstract_params(cfg),
                             cfg.num_hidden_layers)
  except peft_io.AdapterError as e:
    raise ConfigError(f"init_from: {e}") from None


def model_config(config) -> MistralConfig:
  """The run's model config, from ``config.json`` or the preset: shapes
  only, no weight is read."""
  param_dtype = jnp.dtype(config.model.param_dtype)
  run = dict(dtype=jnp.dtype(config.model.dtype), remat=config.model.remat,
             remat_policy=config.model.remat_policy,
             attention_impl=config.model.attention_impl)
  source = model_folder(config)
  if source:
    return load_config(source, param_dtype=param_dtype, **run)
  return getattr(MistralConfig, config.model.preset)(param_dtype=param_dtype,
                                                     **run)


def load_model(config, mesh):
  """``(model_cfg, params)`` with params placed on their shardings.

  A PEFT adapter as ``init_from`` is merged into the base here unless the
  run trains LoRA (then :func:`initial_lora` gives its adapters).
  """
  param_dtype = jnp.dtype(config.model.param_dtype)
  source = model_folder(config)
  cfg = model_config(config)
  shardings = sharding.named(mesh, sharding.param_specs(cfg, dict(mesh.shape)))
  if source:
    try:
      _, params = load_hf(source, dtype=param_dtype, shardings=shardings)
    except hf_io.ModelFolderError as e:
      raise ConfigError(str(e)) from None
  else:
    init = jax.jit(init_params, static_argnums=0, out_shardings=shardings)
    params = init(cfg, jax.random.key(config.seed))
  if peft_adapter(config) and config.trainable.mode != "lora":
    lora, settings = _adapter_tree(config, cfg)
    merge = jax.jit(lambda p, a: trainable.lora_merge(
        p, a, settings["alpha"] / settings["rank"]), out_shardings=shardings)
    params = merge(params, lora)
  return cfg, params


def initial_lora(config, cfg):
  """The adapters a LoRA run starts from: a PEFT ``init_from``'s, else None
  (fresh ones)."""
  if config.trainable.mode != "lora" or not peft_adapter(config):
    return None
  return _adapter_tree(config, cfg)[0]


def tokenizer_for(config):
  source = model_folder(config)
  own = source and (source.lower().endswith(".gguf") or os.path.isfile(
      os.path.join(source, "tokenizer_config.json")))
  name = config.tokenizer or (source if own else "mistral")
  try:
    return load_tokenizer(name)
  except HubError as e:
    raise ConfigError(f"tokenizer: {e}") from None
