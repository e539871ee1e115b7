"""What the backend evaluates: an HF folder, a training workdir, or params.

A workdir (``python -m bfpo_jax.train``'s output) is read from its newest
state: ``hf_export/`` when it was written after the latest checkpoint (a
finished run), otherwise the latest checkpoint, rebuilt as training builds
it: the base model named in the checkpoint's fingerprint, then the
checkpoint's trainable leaves restored onto their shardings (LoRA adapters
merged). Either way the weights land directly on the mesh, sharded as in
training (weights over ``fsdp``/``tensor``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from bfpo_jax import sharding, trainable
from bfpo_jax.build import EXPORT_DIR
from bfpo_jax.checkpoint import Checkpointer
from bfpo_jax.hub import resolve_model
from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.hf_io import load_config, load_hf
from bfpo_jax.model.mistral import abstract_params, init_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}
PRESETS = ("tiny", "mistral_7b")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
_STATE_ITEM = "state"  # the Checkpointer's item holding step/trainable/opt_state


@dataclasses.dataclass
class Loaded:
  cfg: MistralConfig  # compute dtype set
  params: Any  # placed on the mesh
  tokenizer: str  # a tokenizer folder, or "mistral" (the bundled one)
  source: str  # what was read, for logs and results


def resolve_dtype(dtype: str, folder: str | None = None):
  """``"auto"`` -> the folder's config.json dtype (else float32)."""
  if dtype == "auto":
    dtype = "float32"
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
      with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
      dtype = raw.get("dtype") or raw.get("torch_dtype") or dtype
      dtype = dtype if dtype in DTYPES else "float32"
  if dtype not in DTYPES:
    raise ValueError(f"dtype: {dtype!r} is not one of auto, "
                     f"{', '.join(DTYPES)}")
  return DTYPES[dtype]


def has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def is_workdir(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, "checkpoints"))
          or os.path.isfile(os.path.join(path, "summary.json")))


def _param_shardings(cfg, mesh):
  return sharding.named(mesh, sharding.param_specs(cfg, dict(mesh.shape)))


def _from_folder(folder, mesh, dtype):
  """``(cfg, params)`` of an HF folder, weights and compute in ``dtype``."""
  cfg = load_config(folder, param_dtype=dtype, dtype=dtype)
  _, params = load_hf(folder, dtype=dtype,
                      shardings=_param_shardings(cfg, mesh))
  return cfg, params


def _latest_checkpoint(workdir):
  """``(step, fingerprint)`` of the newest checkpoint, or (None, {})."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None, {}
  ckpt = Checkpointer(directory, keep=None, async_save=False)
  try:
    step = ckpt.latest_step
    return step, ({} if step is None else ckpt.fingerprint())
  finally:
    ckpt.close()


def _base_model(base, seed, mesh, dtype):
  """The model a run started from: an HF folder, Hub id or random-init preset."""
  base = resolve_model(base)
  if os.path.isdir(base):
    return _from_folder(base, mesh, dtype)
  if base not in PRESETS:
    raise FileNotFoundError(f"the run's base model {base!r} is not a folder "
                            "here")
  # Training initialised presets in float32 (their default param dtype).
  cfg = getattr(MistralConfig, base)(dtype=dtype, param_dtype=jnp.float32)
  shardings = _param_shardings(cfg, mesh)
  params = jax.jit(init_params, static_argnums=0, out_shardings=shardings)(
      cfg, jax.random.key(seed))
  cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                 out_shardings=shardings)
  return cfg.replace(param_dtype=dtype), cast(params)


def _restore_trainable(workdir, step, cfg, mesh, settings):
  """The checkpoint's trainable leaves (or LoRA adapters), on their shardings."""
  abstract = abstract_params(cfg)
  specs = sharding.param_specs(cfg, dict(mesh.shape))
  mask = trainable.trainable_mask(abstract, settings["mode"],
                                  settings.get("pattern") or None)
  if settings["mode"] == "lora":
    shapes = jax.eval_shape(lambda p: trainable.init_lora(
        p, mask, settings["lora_rank"], jax.random.key(0)), abstract)
    specs = sharding.lora_specs(specs, shapes)
  else:
    shapes = trainable.split(abstract, mask)[0]
  target = {"trainable": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(
          x.shape, jnp.float32, sharding=jax.sharding.NamedSharding(mesh, s)),
      shapes, specs)}
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                      _STATE_ITEM)
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
          target), partial_restore=True))
  return restored["trainable"]


def _from_checkpoint(workdir, step, fingerprint, mesh, dtype):
  base, settings = fingerprint.get("model"), fingerprint.get("trainable")
  if not base or not settings:
    raise ValueError(f"{workdir}: checkpoint {step} does not name its base "
                     "model; evaluate its hf_export/ instead")
  cfg, params = _base_model(base, fingerprint.get("seed", 0), mesh, dtype)
  restored = _restore_trainable(workdir, step, cfg, mesh, settings)
  shardings = _param_shardings(cfg, mesh)
  if settings["mode"] == "lora":
    scale = settings["lora_alpha"] / settings["lora_rank"]
    merge = lambda p, a: trainable.lora_merge(p, a, scale)  # noqa: E731
  else:  # the restored leaves replace the base's
    merge = lambda p, t: trainable.combine(  # noqa: E731
        jax.tree.map(lambda x: x.astype(dtype), t), p)
  params = jax.jit(merge, out_shardings=shardings)(params, restored)
  return cfg, params, base


def _workdir_tokenizer(workdir, base):
  for folder in (os.path.join(workdir, EXPORT_DIR), base):
    if os.path.isdir(folder) and has_tokenizer(folder):
      return folder
  return "mistral" if base in PRESETS else None


def load(pretrained, mesh, *, dtype="auto", tokenizer=None) -> Loaded:
  """Loads ``pretrained`` onto ``mesh``.

  Args:
    pretrained: an HF model folder or Hub id (``owner/name[@revision]``), a
      training workdir, or an in-memory ``(MistralConfig, params)`` pair.
    mesh: the mesh to place the weights on.
    dtype: ``auto`` (the folder's dtype; in-memory params keep theirs),
      ``float32``, ``bfloat16`` or ``float16``: weights and compute.
    tokenizer: a tokenizer folder or ``mistral``; default: the model's own.

  Raises:
    FileNotFoundError / ValueError: one line naming the path and the problem.
  """
  if isinstance(pretrained, tuple | list):
    cfg, params = pretrained
    if dtype != "auto":
      cfg = cfg.replace(dtype=resolve_dtype(dtype),
                        param_dtype=resolve_dtype(dtype))
      params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    params = jax.device_put(params, _param_shardings(cfg, mesh))
    if tokenizer is None:
      raise ValueError("in-memory params need tokenizer=FOLDER (or mistral)")
    return Loaded(cfg, params, tokenizer, "in-memory params")

  path = resolve_model(str(pretrained))
  if path.lower().endswith(".gguf"):  # dequantized; its own tokenizer
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such GGUF file")
    jdtype = resolve_dtype("float32" if dtype == "auto" else dtype)
    cfg, params = _from_folder(path, mesh, jdtype)
    return Loaded(cfg, params, tokenizer or path, path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model folder or workdir")
  if not is_workdir(path):
    jdtype = resolve_dtype(dtype, path)
    cfg, params = _from_folder(path, mesh, jdtype)
    tok = tokenizer or (path if has_tokenizer(path) else None)
    source = path
  else:
    export = os.path.join(path, EXPORT_DIR)
    step, fingerprint = _latest_checkpoint(path)
    exported = os.path.join(export, "config.json")
    use_export = os.path.isfile(exported) and (
        step is None or os.path.getmtime(exported) >= os.path.getmtime(
            os.path.join(path, "checkpoints", str(step))))
    if use_export:
      jdtype = resolve_dtype(dtype, export)
      cfg, params = _from_folder(export, mesh, jdtype)
      tok = tokenizer or (export if has_tokenizer(export) else None)
      source = f"{export} (newer than any checkpoint)"
    elif step is not None:
      jdtype = resolve_dtype(dtype, fingerprint.get("model"))
      cfg, params, base = _from_checkpoint(path, step, fingerprint, mesh,
                                           jdtype)
      tok = tokenizer or _workdir_tokenizer(path, base)
      source = f"{path} checkpoint {step} (base {base})"
    else:
      raise FileNotFoundError(f"{path}: a workdir with neither a checkpoint "
                              f"nor {EXPORT_DIR}/")
  if tok is None:
    raise FileNotFoundError(f"{path}: no tokenizer files; pass tokenizer=DIR "
                            "(or tokenizer=mistral for the bundled Mistral-7B "
                            "tokenizer)")
  return Loaded(cfg, params, tok, source)
