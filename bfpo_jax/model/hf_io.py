"""Hugging Face checkpoint folders <-> our params, through safetensors only.

Folders of ``MistralForCausalLM``, ``LlamaForCausalLM``, ``Qwen2ForCausalLM``
and ``Qwen3ForCausalLM`` are read and written; any other architecture is
refused in one line naming these. A ``.gguf`` file (llama.cpp) is read too,
dequantized (:mod:`bfpo_jax.model.gguf_io`); ``python -m
bfpo_jax.model.convert`` turns one into a folder. A damaged weights file (bad
header, cut short) is refused in one line naming it.

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


def is_gguf(path: str) -> bool:
  """Whether ``path`` names a GGUF file (llama.cpp's single-file format)."""
  return str(path).lower().endswith(".gguf")


def _safetensors_keys(file: str) -> list[str]:
  """The tensor names of one safetensors file; a damaged file (bad header,
  truncated data) raises :class:`ModelFolderError` naming it."""
  try:
    with safe_open(file, "numpy") as f:
      return list(f.keys())
  except Exception as e:  # SafetensorError, OSError: one line either way
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ModelFolderError(f"{file}: damaged safetensors file ({text})") from None


def _tensor_files(path: str) -> dict[str, str]:
  """Maps each HF tensor name to the safetensors file holding it."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise ModelFolderError(f"{index}: not a safetensors index ({e})") from None
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
      if not os.path.isfile(file):
        raise ModelFolderError(f"{file}: listed in {INDEX_FILE} but missing")
      _safetensors_keys(file)
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.exists(single):
    names = _safetensors_keys(single)
    if not names:
      raise ModelFolderError(f"{single}: damaged safetensors file (it holds "
                             "no tensors)")
    return {name: single for name in names}
  if glob.glob(os.path.join(path, "pytorch_model*.bin")):
    raise ModelFolderError(
        f"{path}: only PyTorch pickle weights (pytorch_model*.bin) found; they "
        "are refused because unpickling runs arbitrary code. Convert once, in "
        "a trusted environment: AutoModelForCausalLM.from_pretrained(path)"
        ".save_pretrained(out, safe_serialization=True)")
  raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _gguf(path: str):
  """``(hf config dict, HFTensors)`` of a GGUF file."""
  from bfpo_jax.model import gguf_io

  reader = gguf_io.open_gguf(path)
  config = gguf_io.hf_config(gguf_io.metadata(reader), gguf_io.shapes(reader),
                             path)
  return config, gguf_io.HFTensors(reader, config, path)


def load_config(path: str, **overrides) -> MistralConfig:
  """Reads ``path/config.json`` (``path`` a folder or Hub id), or the
  metadata of a ``.gguf`` file, into a :class:`MistralConfig`.

  Raises:
    FileNotFoundError: no ``config.json``.
    ValueError: one line, for an architecture or setting not supported, a
      damaged GGUF file, or a Hub id that cannot be fetched (:class:`HubError`).
  """
  import transformers

  if is_gguf(path):
    return MistralConfig.from_hf(_gguf(path)[0], **overrides)
  path = resolve_model(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path}: no config.json (not a model folder)")
  try:
    with open(config_file) as f:
      raw = json.load(f)
  except ValueError as e:
    raise ModelFolderError(f"{config_file}: not valid JSON ({e})") from None
  try:  # before AutoConfig, which fails obscurely on unknown model types
    check_supported(raw)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return MistralConfig.from_hf(
      transformers.AutoConfig.from_pretrained(path, trust_remote_code=False),
      **overrides)


def check_folder(path: str) -> None:
  """Raises, before any weight is read, what :func:`load_hf` would on a
  folder without ``config.json``, without safetensors weights or with a
  damaged weights file (its header is read, its tensors are not)."""
  load_config(path)
  if not is_gguf(path):
    _tensor_files(resolve_model(path))


class _Safetensors:
  """HF tensor name -> numpy array, from a folder's safetensors files."""

  def __init__(self, files, stack):
    self.files = files
    self.handles = {f: stack.enter_context(safe_open(f, "numpy"))
                    for f in sorted(set(files.values()))}
    self.names = list(files)

  def __getitem__(self, name):
    try:
      return self.handles[self.files[name]].get_tensor(name)
    except Exception as e:  # data cut short after a good header
      text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise ModelFolderError(f"{self.files[name]}: damaged safetensors file "
                             f"(tensor {name}: {text})") from None


def load_hf(path: str, dtype=jnp.float32, shardings=None, **config_overrides):
  """Loads a Hugging Face Mistral, Llama or Qwen folder, or a GGUF file.

  Args:
    path: folder with ``config.json`` and safetensors weights (single file or
      sharded with an index), a Hub id (``owner/name[@revision]``), or a
      ``.gguf`` file (dequantized tensor by tensor,
      :mod:`bfpo_jax.model.gguf_io`).
    dtype: dtype of the returned params (also the config's ``param_dtype``).
    shardings: optional ``jax.sharding.Sharding`` for every leaf, or a pytree
      of them shaped like the params; each tensor is placed as it is read.
    **config_overrides: fields of :class:`MistralConfig` to set, e.g.
      ``dtype=jnp.bfloat16, remat=True``.

  Returns:
    ``(config, params)``.
  """
  with contextlib.ExitStack() as stack:
    if is_gguf(path):
      raw, tensors = _gguf(path)
      cfg = MistralConfig.from_hf(raw, param_dtype=dtype, **config_overrides)
    else:
      path = resolve_model(path)
      cfg = load_config(path, param_dtype=dtype, **config_overrides)
      tensors = _Safetensors(_tensor_files(path), stack)
    return cfg, _place(path, cfg, tensors, dtype, shardings)


def _place(path, cfg, tensors, dtype, shardings):
  """Our params from ``tensors[hf_name]``, leaf by leaf onto ``shardings``."""
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    sharding_leaves = [shardings] * len(leaves)
  else:
    sharding_leaves = treedef.flatten_up_to(shardings)

  wanted = {hf_name(param_path(p))[0] for p, _ in leaves}
  available = set(tensors.names)
  missing = sorted(wanted - available)
  unexpected = sorted(n for n in available - wanted
                      if not _IGNORED_HF.search(n)
                      and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if missing or unexpected:
    raise ModelFolderError(f"{path}: checkpoint does not match its config: "
                           f"missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
  out = []
  for (p, spec), sharding in zip(leaves, sharding_leaves):
    name, transpose = hf_name(param_path(p))
    tensor = tensors[name]
    expected = spec.shape[::-1] if transpose else spec.shape
    if tensor.shape != expected:
      raise ModelFolderError(f"{path}: {name} has shape {tensor.shape}, "
                             f"the config implies {expected}")
    if transpose:
      tensor = tensor.T
    tensor = np.ascontiguousarray(tensor.astype(jnp.dtype(dtype)))
    out.append(jnp.asarray(tensor) if sharding is None
               else jax.device_put(tensor, sharding))
    del tensor
  return jax.tree_util.tree_unflatten(treedef, out)


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_hf(path: str, cfg: MistralConfig, params, *, max_shard_size="5GB",
            dtype=None):
  """Writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads.

  The architecture written (Mistral, Llama, Qwen2 or Qwen3) is
  ``cfg.model_type``.

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
  out_dtype = lambda x: jnp.dtype(dtype or x.dtype)  # noqa: E731
  entries = []
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, transpose = hf_name(param_path(p))

    def fetch(x=x, transpose=transpose):
      host = _to_host(x).astype(out_dtype(x))
      return host.T if transpose else host

    entries.append((name, int(np.prod(x.shape)) * out_dtype(x).itemsize, fetch))
  first = jax.tree_util.tree_leaves(params)[0]
  return write_folder(path, cfg, entries, out_dtype(first), max_shard_size)


def write_folder(path: str, cfg: MistralConfig, entries, dtype,
                 max_shard_size="5GB"):
  """``config.json`` and the safetensors weights of ``entries``.

  Args:
    path: output folder (created; earlier weight files in it are removed).
    cfg: written as ``config.json``, with ``dtype`` as the weights' dtype.
    entries: ``(hf_name, nbytes, fetch)`` in file order; ``fetch()`` returns
      the [out, in]-layout array, called once, one shard at a time, on every
      process (process 0 writes).
    dtype: the dtype the arrays are written in.
    max_shard_size: as :func:`save_hf`.

  Returns:
    The list of files written.
  """
  limit = _parse_size(max_shard_size)
  shards, current, size = [], [], 0
  for entry in entries:
    if current and size + entry[1] > limit:
      shards.append(current)
      current, size = [], 0
    current.append(entry)
    size += entry[1]
  shards.append(current)

  if jax.process_index() == 0:
    os.makedirs(path, exist_ok=True)
    hf_config = cfg.to_hf()
    hf_config.dtype = str(jnp.dtype(dtype))
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
    for name, _, fetch in shard:
      tensors[name] = np.ascontiguousarray(fetch())
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
