"""Attention masks from ids, and which kernel each platform gets.

Dimension names (``q_BxTxNxH``, ``k_BxSxKxH``, a tile's ``q_CxKxGxH``) are
listed in :mod:`bfpo_jax`.

Attention kernels, by platform and row layout:

* CPU: XLA's ``dot_product_attention`` for padded rows and packed SFT
  rows. The mask is a boolean [B, 1, T, S] built by comparing ids (causal
  index, padding, ``segment_ids`` of packed sequences, ``branch_ids`` of
  packed preference pairs); it broadcasts over heads and fuses into the
  softmax, so no float [B, N, T, S] mask exists, only the scores XLA's
  attention always forms. Packed preference rows run
  :func:`blockwise_attention`, XLA ops in tiles of up to 256 x 256 that skip
  the tiles the same mask leaves empty (most of a row of several pairs);
  rows too short for two tiles of at least 128 tokens have little to skip
  and run dense.
* GPU: ``model.attention_impl="cudnn"`` runs cuDNN flash attention on
  right-padded rows (causal, window and sequence lengths in-kernel, no mask
  tensor). Packed rows run XLA's dense attention: cuDNN's in-kernel masks are
  padding, causal and window only, and JAX hands it any other mask as a
  dense [B, 1, T, S] bias (bounded, per row not per head, but untested
  here, so not wired in).
* TPU: XLA's dense attention today. The kernel to use is Pallas splash
  attention (``jax.experimental.pallas.ops.tpu.splash_attention``): its
  ``SegmentIds`` keep packed sequences and pairs apart block-sparsely.
  Equality of segment ids cannot say "the rejected branch sees the prompt
  but not the chosen branch", so a pair needs two splash calls merged by
  their log-sum-exps: one over the pair's prompt keys (query ids = pair, key
  ids = pair on the prompt only) and one over the query's own branch (ids =
  pair x branch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BLOCK = 256
"""Largest tile of :func:`blockwise_attention` (packed pairs on CPU)."""
MIN_BLOCK = 128
"""Smallest tile worth the loop: shorter rows run XLA's dense attention."""


def attention_mask(key_valid_BxS, query_index_T, sliding_window,
                   segment_ids_BxT=None, branch_ids_BxT=None,
                   positions_BxT=None):
  """Boolean [B, 1, T, S]: causal, within the window, and not padding.

  Indices are positions in the (padded) buffer, as in transformers: a query
  at index i sees keys j with ``i - window < j <= i``. With packed rows
  (``segment_ids``, no cache), a query sees only keys of its own segment.
  With packed preference pairs (``branch_ids``: 0 prompt, 1 chosen, 2
  rejected; see ``data.packing``) it also sees only prompt keys and keys of
  its own branch, and the window is measured in ``positions``, which
  continue from the prompt in each branch.
  """
  key_index_S = jnp.arange(key_valid_BxS.shape[1])
  allowed_TxS = key_index_S[None, :] <= query_index_T[:, None]
  if sliding_window is not None and branch_ids_BxT is None:
    allowed_TxS &= key_index_S[None, :] > query_index_T[:, None] - sliding_window
  mask = allowed_TxS[None, None] & key_valid_BxS[:, None, None, :]
  if segment_ids_BxT is not None:
    mask &= (segment_ids_BxT[:, None, :, None]
             == segment_ids_BxT[:, None, None, :])
  if branch_ids_BxT is not None:
    query, key = branch_ids_BxT[:, None, :, None], branch_ids_BxT[:, None, None, :]
    mask &= (key == 0) | (key == query)
    if sliding_window is not None:
      mask &= (positions_BxT[:, None, None, :]
               > positions_BxT[:, None, :, None] - sliding_window)
  return mask


def blockwise_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, block):
  """``dot_product_attention`` in [block, block] tiles, skipping empty tiles.

  Rows, query blocks and key blocks run in ``lax.scan`` loops with an online
  softmax in float32; a tile in which no query may see any key (above the
  diagonal, or between different packed pairs) is skipped by ``lax.cond``,
  in the backward pass too. What it saves is what the mask leaves out: for
  packed rows most of the [T, S] square. A query that may see no key at all
  (padding) gets a finite, meaningless output, as in the dense path.

  Args:
    q_BxTxNxH: queries.
    k_BxSxKxH: keys (K divides N: grouped-query attention).
    v_BxSxKxH: values.
    mask_Bx1xTxS: boolean mask from :func:`attention_mask`.
    block: tile size C; divides T and S.

  Returns:
    [B, T, N, H] attention outputs in the queries' dtype.
  """
  b, t, n, h = q_BxTxNxH.shape
  s, k = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
  tq, tk = t // block, s // block
  q = (q_BxTxNxH.astype(jnp.float32) / jnp.sqrt(h)).reshape(
      b, tq, block, k, n // k, h)
  keys = k_BxSxKxH.astype(jnp.float32).reshape(b, tk, block, k, h)
  values = v_BxSxKxH.astype(jnp.float32).reshape(b, tk, block, k, h)
  mask = mask_Bx1xTxS[:, 0].reshape(b, tq, block, tk, block).swapaxes(2, 3)
  needed = jnp.any(mask, axis=(3, 4))  # [B, T / C, S / C]
  low = jnp.finfo(jnp.float32).min

  def tile(carry, inputs, q_CxKxGxH):
    m_KxGxC, l_KxGxC, acc_KxGxCxH = carry
    k_CxKxH, v_CxKxH, mask_CxC = inputs
    scores = jnp.einsum("qkgh,skh->kgqs", q_CxKxGxH, k_CxKxH)
    scores = jnp.where(mask_CxC, scores, low)
    m_new = jnp.maximum(m_KxGxC, jnp.max(scores, axis=-1))
    p = jnp.exp(scores - m_new[..., None])
    scale = jnp.exp(m_KxGxC - m_new)
    return (m_new, l_KxGxC * scale + jnp.sum(p, axis=-1),
            acc_KxGxCxH * scale[..., None]
            + jnp.einsum("kgqs,skh->kgqh", p, v_CxKxH))

  def query_block(q_CxKxGxH, keys_row, values_row, mask_row, needed_row):
    init = (jnp.full((k, n // k, block), low, jnp.float32),
            jnp.zeros((k, n // k, block), jnp.float32),
            jnp.zeros((k, n // k, block, h), jnp.float32))

    def body(carry, inputs):
      *tile_inputs, need = inputs
      return jax.lax.cond(need, lambda: tile(carry, tile_inputs, q_CxKxGxH),
                          lambda: carry), None

    (_, total, acc), _ = jax.lax.scan(body, init, (keys_row, values_row,
                                                   mask_row, needed_row))
    out = acc / jnp.maximum(total, 1e-30)[..., None]  # [K, G, C, H]
    return out.transpose(2, 0, 1, 3).reshape(block, n, h)

  def row(_, inputs):
    q_row, keys_row, values_row, mask_row, needed_row = inputs
    out = jax.lax.map(lambda x: query_block(x[0], keys_row, values_row, x[1],
                                            x[2]), (q_row, mask_row, needed_row))
    return None, out.reshape(t, n, h)

  _, out = jax.lax.scan(row, None, (q, keys, values, mask, needed))
  return out.astype(q_BxTxNxH.dtype)


def masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, *,
                     packed_pairs=False):
  """Attention under a boolean mask, on the kernel the module docstring says.

  Args:
    q_BxTxNxH: queries.
    k_BxSxKxH: keys.
    v_BxSxKxH: values.
    mask_Bx1xTxS: boolean mask from :func:`attention_mask`.
    packed_pairs: the rows hold packed preference pairs (``branch_ids``).

  Returns:
    [B, T, N, H] attention outputs in the queries' dtype.
  """
  t = q_BxTxNxH.shape[1]
  block = math.gcd(t, BLOCK)
  if (packed_pairs and block >= MIN_BLOCK and t > block
      and jax.default_backend() == "cpu"):
    return blockwise_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS,
                               block)
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                      mask=mask_Bx1xTxS, implementation="xla")
