"""LoRA adapters <-> PEFT folders (``adapter_config.json`` +
``adapter_model.safetensors``), as ``peft`` writes and reads them.

Our adapter on a kernel ``W [in, out]`` is ``W + s * A @ B`` with
``A [in, r]``, ``B [r, out]`` and ``s = lora_alpha / r`` (see
:mod:`bfpo_jax.trainable`). PEFT stores, per adapted ``nn.Linear`` (weight
``[out, in]``), ``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]``
under ``base_model.model.<module>.`` and adds ``scaling * B @ A`` with the
same ``scaling = lora_alpha / r``; so ``lora_A = A^T`` and ``lora_B = B^T``.
``peft.PeftModel.from_pretrained(base, folder)`` loads what
:func:`save_peft` writes, and :func:`load_peft` reads what peft writes
(plain LoRA on linear layers, optionally rsLoRA: ``scaling = alpha/sqrt(r)``).

Adapters on embeddings, DoRA, per-module ranks and ``modules_to_save`` have
no exact counterpart here and are refused in one line. Weights are read from
safetensors only (never ``adapter_model.bin``: unpickling runs code).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from bfpo_jax.model.hf_io import _to_host, hf_name
from bfpo_jax.model.mistral import match_params, param_path
from bfpo_jax.trainable import LORA_KEYS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# Config fields that, set (not empty, false or "none"), change the maths.
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                "fan_in_fan_out", "bias", "lora_bias", "target_parameters",
                "trainable_token_indices")


class AdapterError(ValueError):
  """A PEFT folder that cannot be read or written here (one line)."""


def is_adapter(folder: str) -> bool:
  """Whether ``folder`` is a PEFT adapter folder."""
  return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


def read_adapter_config(folder: str) -> dict:
  path = os.path.join(folder, ADAPTER_CONFIG)
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise AdapterError(f"{path}: cannot be read ({e})") from None
  if config.get("peft_type") != "LORA":
    raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only "
                       "LORA adapters are supported")
  for field in _UNSUPPORTED:
    if config.get(field) and config.get(field) != "none":
      raise AdapterError(f"{path}: {field}={config[field]!r} is not supported "
                         "(plain LoRA on linear layers only)")
  return config


def _module(path: str) -> str:
  """PEFT module name of one of our kernel paths: 'model.layers.0.mlp.up_proj'."""
  return hf_name(path)[0][: -len(".weight")]


def _is_adapter(x) -> bool:
  return isinstance(x, dict) and set(x) == set(LORA_KEYS)


def _adapters(lora) -> dict:
  """``{param path: (A [in, r], B [r, out])}`` of an adapter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(lora, is_leaf=_is_adapter)[0]
  return {param_path(p): (x["lora_a"], x["lora_b"]) for p, x in leaves}


def target_modules(adapted: list[str], kernels: list[str]) -> list[str]:
  """PEFT's ``target_modules`` for adapters on the kernel paths ``adapted``.

  Short names (``q_proj``) where they select exactly the adapted modules
  among all ``kernels``, as users write them; full module names otherwise.
  """
  names = {_module(p) for p in adapted}
  by_short = collections.defaultdict(set)
  for p in kernels:
    by_short[_module(p).rsplit(".", 1)[-1]].add(_module(p))
  out = []
  for short in sorted({n.rsplit(".", 1)[-1] for n in names}):
    chosen = {n for n in names if n.rsplit(".", 1)[-1] == short}
    out += [short] if chosen == by_short[short] else sorted(chosen)
  return out


def save_peft(path: str, lora, *, rank: int, alpha: float,
              base_model: str = "") -> list[str]:
  """Writes an adapter tree (:func:`bfpo_jax.trainable.init_lora`'s shape) as
  a PEFT LoRA folder; every process gathers, process 0 writes.

  Args:
    path: output folder (created).
    lora: adapter tree, None where a leaf has no adapter.
    rank, alpha: the LoRA rank and alpha (scale = alpha / rank).
    base_model: ``base_model_name_or_path`` to record (a Hub id or folder).

  Returns:
    The files written.

  Raises:
    AdapterError: adapters on a leaf that is not a linear kernel.
  """
  adapters = _adapters(lora)
  not_linear = [p for p in adapters if not p.endswith("/kernel")]
  if not_linear:
    raise AdapterError(f"LoRA on {not_linear[0]} (not a linear layer) has no "
                       "PEFT LoRA-linear form; the merged export holds it")
  every_leaf = jax.tree_util.tree_flatten_with_path(
      lora, is_leaf=lambda x: x is None or _is_adapter(x))[0]
  kernels = [param_path(p) for p, _ in every_leaf
             if param_path(p).endswith("/kernel")]
  tensors = {}
  for p, (a, b) in adapters.items():
    module = _PREFIX + _module(p)
    tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(_to_host(a).T)
    tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(_to_host(b).T)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
      "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False,
      "target_modules": target_modules(list(adapters), kernels),
      "base_model_name_or_path": base_model or None, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
      "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
      "layers_pattern": None, "revision": None,
  }
  files = [os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)]
  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    with open(files[0], "w") as f:
      json.dump(config, f, indent=2)
    save_file(tensors, files[1], metadata={"format": "pt"})
  return files


def layer_pattern(paths: list[str], num_layers: int) -> str:
  """A regex over param paths matching exactly ``paths``, with
  ``layers/\\d+/`` where every layer has the same adapter.

  Examples:
    >>> layer_pattern(["layers/0/a/kernel", "layers/1/a/kernel"], 2)
    '^(layers/\\\\d+/a/kernel)$'
  """
  per_rest = collections.defaultdict(set)
  parts = []
  for p in paths:
    match = re.fullmatch(r"layers/(\d+)/(.+)", p)
    if match:
      per_rest[match[2]].add(int(match[1]))
    else:
      parts.append(re.escape(p))
  for rest, layers in per_rest.items():
    if layers == set(range(num_layers)):
      parts.append(r"layers/\d+/" + re.escape(rest))
    else:
      parts += [re.escape(f"layers/{i}/{rest}") for i in sorted(layers)]
  return "^(" + "|".join(sorted(parts)) + ")$"


def load_peft(folder: str, abstract, num_layers: int):
  """Reads a PEFT LoRA folder onto params shaped like ``abstract``.

  Args:
    folder: the adapter folder (``adapter_config.json`` and
      ``adapter_model.safetensors``).
    abstract: the base model's params (arrays or ShapeDtypeStructs).
    num_layers: the model's layer count (for the pattern).

  Returns:
    ``(lora, settings)``: an adapter tree shaped like
    :func:`bfpo_jax.trainable.init_lora`'s (float32 numpy, None elsewhere)
    and ``{"rank", "alpha", "pattern", "base_model"}``, where ``alpha`` gives
    our scale ``alpha / rank`` and ``pattern`` selects exactly the adapted
    kernels.

  Raises:
    AdapterError: one line naming the folder and what does not fit.
  """
  config = read_adapter_config(folder)
  weights = os.path.join(folder, ADAPTER_WEIGHTS)
  if not os.path.isfile(weights):
    pickled = os.path.isfile(os.path.join(folder, "adapter_model.bin"))
    raise AdapterError(
        f"{folder}: no {ADAPTER_WEIGHTS}" + (
            "; adapter_model.bin is refused (unpickling runs arbitrary code): "
            "save it again with safe_serialization=True" if pickled else ""))
  tensors = load_file(weights)
  kernels = {_module(param_path(p)): (param_path(p), x.shape)
             for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
             if param_path(p).endswith("/kernel")}
  pairs = collections.defaultdict(dict)
  for key, value in tensors.items():
    match = _KEY.fullmatch(key)
    if match is None or match["module"] not in kernels:
      raise AdapterError(f"{folder}: tensor {key} is not a LoRA-linear weight "
                         "of this model's layers")
    pairs[match["module"]][match["ab"]] = value
  if not pairs:
    raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} holds no LoRA weights")
  rank = int(config["r"])
  adapters = {}
  for module, ab in pairs.items():
    path, (d_in, d_out) = kernels[module]
    a, b = ab.get("A"), ab.get("B")
    if a is None or b is None or a.shape != (rank, d_in) or b.shape != (
        d_out, rank):
      raise AdapterError(f"{folder}: {module} needs lora_A [{rank}, {d_in}] and "
                         f"lora_B [{d_out}, {rank}] (r={rank} in "
                         f"{ADAPTER_CONFIG})")
    adapters[path] = {"lora_a": a.T.astype(np.float32),
                      "lora_b": b.T.astype(np.float32)}
  lora = jax.tree_util.tree_map_with_path(
      lambda p, _: adapters.get(param_path(p)), abstract)
  alpha = float(config["lora_alpha"])
  if config.get("use_rslora"):  # scaling alpha/sqrt(r) = (alpha sqrt(r)) / r
    alpha *= math.sqrt(rank)
  pattern = layer_pattern(sorted(adapters), num_layers)
  matched = {param_path(p) for p, m in jax.tree_util.tree_flatten_with_path(
      match_params(abstract, pattern))[0] if m}
  assert matched == set(adapters), "layer_pattern must select the adapters"
  return lora, {"rank": rank, "alpha": alpha, "pattern": pattern,
                "base_model": config.get("base_model_name_or_path") or ""}
