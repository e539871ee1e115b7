"""Rotary position embeddings: default RoPE and the scaled variants of HF configs.

The frequencies follow ``transformers.modeling_rope_utils`` exactly, so a
checkpoint with ``rope_parameters`` (Llama 3's ``llama3``, ``linear``,
``yarn``) gives the logits ``transformers`` gives. ``dynamic`` (NTK) and
``longrope`` change with the sequence length at run time and are refused.

Dimension names are listed in :mod:`bfpo_jax`.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _llama3(inv_freq, p):
  factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
  old_context = p["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(h, theta, p, max_position_embeddings):
  """YaRN inverse frequencies and attention factor (the paper's defaults)."""
  factor = p.get("factor") or (max_position_embeddings
                               / p["original_max_position_embeddings"])

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = p.get("attention_factor")
  if attention_factor is None:
    if p.get("mscale") and p.get("mscale_all_dim"):
      attention_factor = mscale(factor, p["mscale"]) / mscale(
          factor, p["mscale_all_dim"])
    else:
      attention_factor = mscale(factor)
  beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1
  original = p["original_max_position_embeddings"]

  def correction_dim(rotations):
    return (h * math.log(original / (rotations * 2 * math.pi))
            / (2 * math.log(theta)))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if p.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, h - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(h // 2, dtype=np.float32) - low) / (high - low),
                 0, 1)
  pos_freqs = theta ** (np.arange(0, h, 2).astype(np.float32) / h)
  extrapolation = (1 - ramp).astype(np.float32)
  inv_freq = (1.0 / (factor * pos_freqs) * (1 - extrapolation)
              + 1.0 / pos_freqs * extrapolation)
  return inv_freq.astype(np.float32), float(attention_factor)


@functools.lru_cache(maxsize=32)
def rope_frequencies(cfg) -> tuple[np.ndarray | None, float]:
  """``(inv_freq [H/2] float32, attention_factor)`` of a config's RoPE.

  ``inv_freq`` is None for default RoPE, which :func:`rope` computes inside
  the trace from ``rope_theta`` (as it always has).
  """
  p = dict(cfg.rope_scaling)
  h, theta = cfg.dim_per_head, cfg.rope_theta
  if cfg.rope_type == "default":
    return None, 1.0
  base = (1.0 / theta ** (np.arange(0, h, 2).astype(np.float32) / h)
          ).astype(np.float32)
  if cfg.rope_type == "linear":
    return (base / p["factor"]).astype(np.float32), 1.0
  if cfg.rope_type == "llama3":
    return _llama3(base, p), 1.0
  return _yarn(h, theta, p, cfg.max_position_embeddings)


def rope(x_BxTxNxH, positions_BxT, theta, inv_freq=None, attention_factor=1.0):
  """Rotary embedding, half-split layout (``rotate_half``) as in transformers.

  Args:
    x_BxTxNxH: queries, or keys ([B, T, K, H]).
    positions_BxT: position ids.
    theta: ``rope_theta``; used when ``inv_freq`` is None (default RoPE).
    inv_freq: optional [H/2] precomputed (scaled) inverse frequencies.
    attention_factor: multiplies cos and sin (YaRN), 1 otherwise.

  Returns:
    ``x`` rotated, in its own dtype.
  """
  h = x_BxTxNxH.shape[-1]
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  angles_BxTxH2 = (positions_BxT[..., None].astype(jnp.float32)
                   * inv_freq[None, None, :])
  cos = jnp.cos(angles_BxTxH2)[:, :, None, :]
  sin = jnp.sin(angles_BxTxH2)[:, :, None, :]
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)
