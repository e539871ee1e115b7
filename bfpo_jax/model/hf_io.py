"""Hugging Face checkpoint folders <-> our params, through safetensors only.

Folders of ``MistralForCausalLM`` and ``LlamaForCausalLM`` are read and
written; any other architecture is refused in one line naming these two.

Loading goes leaf by leaf: each tensor is read, cast and placed on its
sharding before the next is read, so a 7B checkpoint never has a full float32
copy in host memory. Saving writes ``model.safetensors`` or, above
``max_shard_size``, ``model-0000i-of-0000n.safetensors`` shards with the
Hub's ``model.safetensors.index.json``; ``transformers``, vLLM and
lm-eval-harness load the folder unchanged.

PyTorch pickle checkpoints (``pytorch_model*.bin``) are refused: unpickling
runs arbitrary code. Wherever a folder is read, a Hub id
(``mistralai/Mistral-7B-v0.1[@revision]``) may stand in for it: it is fetched
into the Hub cache by :func:`bfpo_jax.hub.resolve_model`, safetensors,
config and tokenizer files only.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bfpo_jax.hub import HubError, resolve_model  # noqa: F401 -- public here
from bfpo_jax.model.config import MistralConfig, check_supported
from bfpo_jax.model.mistral import abstract_params, param_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some old exports carry that are recomputed, not learned.
_IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")


class ModelFolderError(ValueError):
  """A model folder that cannot be loaded (one line, names the folder)."""


def hf_name(path: str) -> tuple[str, bool]:
  """HF tensor name of one of our param paths, and whether it is transposed.

  'layers/0/mlp/down_proj/kernel' -> ('model.layers.0.mlp.down_proj.weight',
  True); HF stores linear weights as [out, in], we store kernels [in, out].
  Biases keep their name: '.../q_proj/bias' -> '...q_proj.bias'.
  """
  *parents, leaf = path.split("/")
  prefix = "" if parents[0] == "lm_head" else "model."
  suffix = ".bias" if leaf == "bias" else ".weight"
  return prefix + ".".join(parents) + suffix, leaf == "kernel"


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size),
                       re.IGNORECASE)
  if not match:
    raise ValueError(f"max_shard_size: cannot parse {size!r} (e.g. '5GB')")
  unit = match.group(2).upper()
  base = 1024 if "I" in unit else 1000
  power = {"K": 1, "M": 2, "G": 3}[unit[0]]
  return int(float(match.group(1)) * base ** power)


def _tensor_files(path: str) -> dict[str, str]:
  """Maps each HF tensor name to the safetensors file holding it."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    with safe_open(single, "numpy") as f:
      return {name: single for name in f.keys()}
  if glob.glob(os.path.join(path, "pytorch_model*.bin")):
    raise ModelFolderError(
        f"{path}: only PyTorch pickle weights (pytorch_model*.bin) found; they "
        "are refused because unpickling runs arbitrary code. Convert once, in "
        "a trusted environment: AutoModelForCausalLM.from_pretrained(path)"
        ".save_pretrained(out, safe_serialization=True)")
  raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_config(path: str, **overrides) -> MistralConfig:
  """Reads ``path/config.json`` (``path`` a folder or Hub id) into a
  :class:`MistralConfig`.

  Raises:
    FileNotFoundError: no ``config.json``.
    ValueError: one line, for an architecture or setting not supported, or a
      Hub id that cannot be fetched (:class:`HubError`).
  """
  import transformers

  path = resolve_model(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no config.json (not a model folder)")
  with open(config_file) as f:
    raw = json.load(f)
  try:  # before AutoConfig, which fails obscurely on unknown model types
    check_supported(raw)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return MistralConfig.from_hf(
      transformers.AutoConfig.from_pretrained(path, trust_remote_code=False),
      **overrides)


def check_folder(path: str) -> None:
  """Raises, before any weight is read, what :func:`load_hf` would on a
  folder without ``config.json`` or without safetensors weights."""
  load_config(path)
  _tensor_files(resolve_model(path))


def load_hf(path: str, dtype=jnp.float32, shardings=None, **config_overrides):
  """Loads a Hugging Face Mistral or Llama folder.

  Args:
    path: folder with ``config.json`` and safetensors weights (single file or
      sharded with an index), or a Hub id (``owner/name[@revision]``).
    dtype: dtype of the returned params (also the config's ``param_dtype``).
    shardings: optional ``jax.sharding.Sharding`` for every leaf, or a pytree
      of them shaped like the params; each tensor is placed as it is read.
    **config_overrides: fields of :class:`MistralConfig` to set, e.g.
      ``dtype=jnp.bfloat16, remat=True``.

  Returns:
    ``(config, params)``.
  """
  path = resolve_model(path)
  cfg = load_config(path, param_dtype=dtype, **config_overrides)
  files = _tensor_files(path)
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    sharding_leaves = [shardings] * len(leaves)
  else:
    sharding_leaves = treedef.flatten_up_to(shardings)

  wanted = {hf_name(param_path(p))[0] for p, _ in leaves}
  missing = sorted(wanted - set(files))
  unexpected = sorted(n for n in set(files) - wanted
                      if not _IGNORED_HF.search(n)
                      and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if missing or unexpected:
    raise ModelFolderError(f"{path}: checkpoint does not match config.json: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}")

  out = []
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, "numpy"))
               for f in sorted(set(files.values()))}
    for (p, spec), sharding in zip(leaves, sharding_leaves):
      name, transpose = hf_name(param_path(p))
      tensor = handles[files[name]].get_tensor(name)
      expected = spec.shape[::-1] if transpose else spec.shape
      if tensor.shape != expected:
        raise ModelFolderError(f"{path}: {name} has shape {tensor.shape}, "
                         f"config.json implies {expected}")
      if transpose:
        tensor = tensor.T
      tensor = np.ascontiguousarray(tensor.astype(jnp.dtype(dtype)))
      out.append(jnp.asarray(tensor) if sharding is None
                 else jax.device_put(tensor, sharding))
      del tensor
  return cfg, jax.tree_util.tree_unflatten(treedef, out)


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf(path: str, cfg: MistralConfig, params, *, max_shard_size="5GB",
            dtype=None):
  """Writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads.

  The architecture written (Mistral or Llama) is ``cfg.model_type``.

  Args:
    path: output folder (created).
    cfg: the model's config; written as ``config.json``.
    params: nested dict of arrays (sharded arrays are gathered one at a time).
    max_shard_size: bytes (int) or a string like "5GB"/"500MiB"; above it the
      weights are split into shards with an index.
    dtype: dtype to write (default: each leaf's own).

  Returns:
    The list of files written.
  """
  limit = _parse_size(max_shard_size)
  flat = [(hf_name(param_path(p)), x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  out_dtype = lambda x: jnp.dtype(dtype or x.dtype)  # noqa: E731
  shards, current, size = [], [], 0
  for entry in flat:
    nbytes = int(np.prod(entry[1].shape)) * out_dtype(entry[1]).itemsize
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += nbytes
  shards.append(current)

  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    hf_config = cfg.to_hf()
    hf_config.dtype = str(out_dtype(flat[0][1]))
    hf_config.save_pretrained(path)
    for stale in (glob.glob(os.path.join(path, "model*.safetensors"))
                  + glob.glob(os.path.join(path, INDEX_FILE))):
      os.remove(stale)

  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(names, shards):
    tensors = {}
    for (name, transpose), x in shard:
      host = _to_host(x).astype(out_dtype(x))
      tensors[name] = np.ascontiguousarray(host.T if transpose else host)
      weight_map[name] = file
      total += tensors[name].nbytes
    if jax.process_index() == 0:  # every process gathers; one writes
      save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    del tensors
  written = [os.path.join(path, "config.json")] + [
      os.path.join(path, n) for n in names]
  if len(shards) > 1 and jax.process_index() == 0:
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    written.append(os.path.join(path, INDEX_FILE))
  return written
