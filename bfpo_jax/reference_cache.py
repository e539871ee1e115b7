"""Reference log-probs shared across runs (``loss.reference_cache=DIR``).

Precomputed reference log-probs depend on the reference weights, the model's
architecture and compute dtype, the tokenized pairs (tokenizer, template,
truncation, lengths, sources and their order) and how log-probs are reduced.
A run stores them in ``DIR/<fingerprint hash>.npz`` with that fingerprint;
a later run with the same fingerprint reads them instead of running the
reference forward over every pair (e.g. DPO, IPO-with-summed-log-probs and
BFPO from one SFT model on one data set compute them once). Anything else is
recomputed, and the run says why in one line: which parts of the nearest
stored fingerprint differ, or what is wrong with a damaged file.

The weights enter as a checksum of every reference leaf computed where the
leaves live (sharded, on device): two 32-bit position-weighted sums of each
leaf's bits. Any change of a single value changes it; it is not a
cryptographic hash. The tokens enter as a SHA-256 of every pair's ids.

Files are written atomically (a temporary file, then a rename), so runs that
share ``DIR`` never read a half-written file.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from bfpo_jax import sharding

# Keys of a tokenized pair that do not change its log-probs.
_NOT_TOKENS = ("chosen_is_safe", "rejected_is_safe")
# MistralConfig fields that change how it runs or what it would initialise,
# not what it computes.
_RUN_ONLY = ("remat", "remat_policy", "attention_impl", "initializer_range")
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _leaf_bits(x):
  """A leaf's bit patterns as uint32 (floats bitcast, narrower ones widened)."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    x = jax.lax.bitcast_convert_type(x, unsigned)
    if x.dtype == jnp.uint64:
      return (x ^ (x >> 32)).astype(jnp.uint32)
  return x.astype(jnp.uint32)


def _leaf_checksum(x):
  """[2] uint32 position-weighted sums of a leaf's bits.

  The weights are odd, so changing one value always changes the first sum;
  positions come from iotas, so no sharded leaf is reshaped or gathered.
  """
  bits = _leaf_bits(x)
  position = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    stride = int(np.prod(x.shape[axis + 1:], dtype=np.int64)) & 0xFFFFFFFF
    position = position + jax.lax.broadcasted_iota(
        jnp.uint32, x.shape, axis) * jnp.uint32(stride)
  first = (position * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
  second = ((position ^ jnp.uint32(0x5BD1E995))
            * jnp.uint32(0x27D4EB2D)) | jnp.uint32(1)
  mixed = bits ^ (bits >> jnp.uint32(15))
  return jnp.stack([jnp.sum(bits * first, dtype=jnp.uint32),
                    jnp.sum(mixed * second, dtype=jnp.uint32)])


@functools.cache
def _checksums(mesh):
  kwargs = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
  return jax.jit(lambda xs: [_leaf_checksum(x) for x in xs], **kwargs)


def weights_checksum(params, mesh=None) -> str:
  """Hex checksum of every leaf of ``params`` (values, shapes, dtypes, paths).

  Computed on the devices holding the leaves; only 8 bytes per leaf reach
  the host.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  sums = jax.device_get(_checksums(mesh)([x for _, x in leaves]))
  digest = hashlib.sha256()
  for (path, x), s in zip(leaves, sums):
    digest.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|"
                  f"{int(s[0])}|{int(s[1])};".encode())
  return digest.hexdigest()[:32]


def tokens_digest(pairs) -> str:
  """SHA-256 of the tokenized pairs, in order (ids, prompt lengths, and any
  other key a pair carries except its safety flags)."""
  digest = hashlib.sha256()
  for pair in pairs:
    for key in sorted(pair):
      if key in _NOT_TOKENS or key.startswith("reference_"):
        continue
      value = np.asarray(pair[key])
      digest.update(f"{key}|{value.dtype.kind}|{value.shape};".encode())
      digest.update(value.astype(np.int64).tobytes()
                    if value.dtype.kind in "biu" else repr(pair[key]).encode())
  return digest.hexdigest()[:32]


def _model_fields(model_cfg) -> dict:
  fields = {f.name: str(getattr(model_cfg, f.name))
            for f in dataclasses.fields(model_cfg) if f.name not in _RUN_ONLY}
  fields["head_dim"] = str(model_cfg.dim_per_head)  # None means the default
  return fields


def fingerprint(config, model_cfg, reference_params, pairs, *, tokenizer="",
                average_logps=False, mesh=None) -> dict:
  """What determines a run's reference log-probs, as a flat dict.

  Args:
    config: the run's config (data settings and layout are read).
    model_cfg: the model's ``MistralConfig`` (architecture and dtypes).
    reference_params: the reference policy's params (checksummed).
    pairs: the tokenized pairs, in the order their log-probs are stored.
    tokenizer: the tokenizer's name or folder, as the run resolved it.
    average_logps: whether log-probs are averaged over response tokens.
    mesh: the mesh ``reference_params`` live on, if any.
  """
  d = config.data
  return {
      "reference weights": weights_checksum(reference_params, mesh),
      "model": json.dumps(_model_fields(model_cfg), sort_keys=True),
      "loss.average_logps": bool(average_logps),
      "data.preference_layout": d.preference_layout,
      "tokenizer": tokenizer,
      "data.template": d.template,
      "data.truncation": d.truncation,
      "data.max_prompt_length": d.max_prompt_length,
      "data.max_length": d.max_length,
      "data.sources": list(d.sources),
      "data.buffer_sources": (list(d.buffer_sources)
                              if d.buffer_task == "preference" else []),
      "data.eval_sources": list(d.eval_sources),
      "pairs": len(pairs),
      "tokens": tokens_digest(pairs),
  }


def entry_path(cache_dir: str, fp: dict) -> str:
  """Where the log-probs of fingerprint ``fp`` live in ``cache_dir``."""
  name = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  return os.path.join(cache_dir, name[:24] + ".npz")


def _change(key, old, new) -> list[str]:
  """``key old -> new``, lists element by element, long texts by the part
  after what they share."""
  if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
    return [line for i, (a, b) in enumerate(zip(old, new))
            for line in _change(f"{key}[{i}]", a, b)]
  if isinstance(old, str) and isinstance(new, str):
    shared = len(os.path.commonprefix([old, new]))
    if shared > 12:
      old, new = "..." + old[shared - 8:], "..." + new[shared - 8:]
  if old == new:
    return []
  return [f"{key} {old} -> {new}"]


def _difference(stored: dict, fp: dict) -> list[str]:
  out = []
  for key in sorted(set(stored) | set(fp)):
    if stored.get(key) == fp.get(key):
      continue
    if key in ("reference weights", "tokens", "model"):
      out.append(key)
    else:
      out += _change(key, stored.get(key), fp.get(key))
  return out


def _stored_fingerprint(path: str) -> dict:
  with np.load(path, allow_pickle=False) as f:
    return json.loads(str(f["fingerprint"]))


def _nearest(cache_dir: str, fp: dict) -> str:
  """Why no stored entry fits: the differences from the closest one."""
  best = None
  for path in sorted(glob.glob(os.path.join(cache_dir, "*.npz"))):
    try:
      diff = _difference(_stored_fingerprint(path), fp)
    except _READ_ERRORS:
      continue  # another run's damaged file is its own business
    if best is None or len(diff) < len(best[1]):
      best = (os.path.basename(path), diff)
  if best is None:
    return f"{cache_dir} holds no entry yet"
  return (f"no entry for this fingerprint in {cache_dir}; the closest "
          f"({best[0]}) differs in {', '.join(best[1])}")


def read(cache_dir: str, fp: dict):
  """``((chosen, rejected), None)`` from the entry of ``fp``, or
  ``(None, why)`` when there is none or it cannot be used."""
  path = entry_path(cache_dir, fp)
  if not os.path.exists(path):
    return None, _nearest(cache_dir, fp)
  try:
    with np.load(path, allow_pickle=False) as f:
      stored = json.loads(str(f["fingerprint"]))
      chosen, rejected = np.asarray(f["chosen"]), np.asarray(f["rejected"])
  except _READ_ERRORS as e:
    return None, f"{path} is damaged ({type(e).__name__}: {e})"
  n = fp["pairs"]
  if stored != fp:
    return None, (f"{path} holds another fingerprint (differs in "
                  f"{', '.join(_difference(stored, fp))})")
  for name, side in (("chosen", chosen), ("rejected", rejected)):
    if side.shape != (n,) or side.dtype != np.float32:
      return None, (f"{path} is damaged ({name}: {side.dtype}{list(side.shape)}"
                    f", expected float32[{n}])")
    if not np.all(np.isfinite(side)):
      return None, f"{path} is damaged ({name} has non-finite values)"
  return (chosen, rejected), None


def write(cache_dir: str, fp: dict, chosen, rejected) -> str:
  """Stores an entry atomically; returns its path."""
  os.makedirs(cache_dir, exist_ok=True)
  path = entry_path(cache_dir, fp)
  temporary = f"{path[:-4]}.tmp{os.getpid()}.npz"
  np.savez(temporary, fingerprint=np.array(json.dumps(fp, sort_keys=True)),
           chosen=np.asarray(chosen, np.float32),
           rejected=np.asarray(rejected, np.float32))
  os.replace(temporary, path)
  return path


def agree(found, n: int):
  """Process 0's ``read`` result on every process, so that all of them
  either read or run the reference forward together (it is collective)."""
  if jax.process_count() == 1:
    return found
  from jax.experimental import multihost_utils

  hit = bool(multihost_utils.broadcast_one_to_all(
      np.array(found is not None)))
  if not hit:
    return None
  local = found if found is not None else (np.zeros(n, np.float32),) * 2
  return tuple(np.asarray(x) for x in
               multihost_utils.broadcast_one_to_all(tuple(local)))


def outcome(cache_dir: str, fp: dict, logps, why: str | None) -> str:
  """Saves freshly computed ``logps`` (``why``: the reason they were
  computed; None: they were read) and returns the line a run logs."""
  if why is None:
    return f"read {entry_path(cache_dir, fp)}"
  line = f"computed: {why}"
  if jax.process_index() == 0:
    try:
      line += f"; saved as {write(cache_dir, fp, *logps)}"
    except OSError as e:
      line += f"; not saved ({e.strerror or e})"
  return line
