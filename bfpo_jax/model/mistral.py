"""Mistral (and Llama, Qwen2, Qwen3) decoder in Flax NNX, and the functional
surface around it.

The modules mirror ``transformers``' ``MistralForCausalLM`` (RoPE, grouped-query
attention, optional sliding window, RMSNorm, SwiGLU, tied or untied output);
``LlamaForCausalLM`` is the same network without the window, with optional
projection biases and scaled RoPE; ``Qwen2ForCausalLM`` adds biases to q, k
and v, ``Qwen3ForCausalLM`` an RMSNorm on each head of q and k before RoPE
(see :class:`MistralConfig`).
Each parameter carries logical axis names in its ``out_sharding`` metadata
(``vocab``, ``embed``, ``q_heads``, ``kv_heads``, ``mlp``, ``norm``) that
:mod:`bfpo_jax.sharding` maps to mesh axes.

Training and outside users work with a plain nested dict of arrays
(``params``); :func:`apply` binds it to the module graph inside the trace, so
the functions below are pure and jit-able with the config static.

Dimension names (``q_BxTxNxH``, ``gate_BxTxF``) are listed in :mod:`bfpo_jax`.

Which attention kernel each platform gets: :mod:`bfpo_jax.model.attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from bfpo_jax.model.attention import attention_mask, masked_attention
from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.rope import rope, rope_frequencies

_ACTIVATION_SHARDING = contextvars.ContextVar("activation_sharding",
                                              default=None)

BTD = ("act_batch", "act_length", "act_embed")
"""Logical axes of the residual stream [B, T, D]."""

@contextlib.contextmanager
def activation_sharding(resolve):
  """Within this context, traced activations are pinned to shardings.

  ``resolve(logical_axes, shape)`` returns the ``jax.sharding.Sharding`` of
  an activation with those logical axes (``act_batch``, ``act_length``,
  ``act_embed``, ``act_heads``, ``act_kv_heads``, ``act_mlp``), or None to
  leave it to XLA. :func:`bfpo_jax.sharding.with_activation_sharding` builds
  one from a mesh and rules. Outside the context nothing is pinned.
  """
  token = _ACTIVATION_SHARDING.set(resolve)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def pin(x, axes):
  """``x`` constrained to the sharding of logical ``axes``, if a context says."""
  resolve = _ACTIVATION_SHARDING.get()
  sharding = None if resolve is None else resolve(axes, x.shape)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _param(rngs, cfg, shape, axes, init=None):
  init = init or nnx.initializers.normal(cfg.initializer_range)
  return nnx.Param(init(rngs.params(), shape, cfg.param_dtype),
                   out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
  """``x @ kernel (+ bias)``; kernel [in, out], computed in ``cfg.dtype``."""

  def __init__(self, cfg, d_in, d_out, axes, rngs, use_bias=False):
    self.dtype = cfg.dtype
    self.kernel = _param(rngs, cfg, (d_in, d_out), axes)
    if use_bias:
      self.bias = _param(rngs, cfg, (d_out,), axes[1:], nnx.initializers.zeros)

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if hasattr(self, "bias"):
      y = y + self.bias[...].astype(self.dtype)[(None,) * (y.ndim - 1)]
    return y


class RMSNorm(nnx.Module):
  """``scale * x / rms(x)`` over the last axis (``dim`` wide, default the
  model width), normalised in float32 as in transformers."""

  def __init__(self, cfg, rngs, dim=None):
    self.eps, self.dtype = cfg.rms_norm_eps, cfg.dtype
    self.scale = _param(rngs, cfg, (dim or cfg.hidden_size,), ("norm",),
                        nnx.initializers.ones)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True)
                              + self.eps)
    scale_1xD = self.scale[...].astype(self.dtype).reshape(
        (1,) * (x.ndim - 1) + (-1,))
    return scale_1xD * x32.astype(self.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    d, n, k, h = (cfg.hidden_size, cfg.num_attention_heads,
                  cfg.num_key_value_heads, cfg.dim_per_head)
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    self.q_proj = Dense(cfg, d, n * h, ("embed", "q_heads"), rngs, qkv_bias)
    self.k_proj = Dense(cfg, d, k * h, ("embed", "kv_heads"), rngs, qkv_bias)
    self.v_proj = Dense(cfg, d, k * h, ("embed", "kv_heads"), rngs, qkv_bias)
    self.o_proj = Dense(cfg, n * h, d, ("q_heads", "embed"), rngs,
                        cfg.attention_bias)
    if cfg.qk_norm:  # Qwen3: each head of q and k normalised before RoPE
      self.q_norm = RMSNorm(cfg, rngs, dim=h)
      self.k_norm = RMSNorm(cfg, rngs, dim=h)

  def __call__(self, x_BxTxD, positions_BxT, key_valid_BxS, query_index_T,
               cache=None, segment_ids_BxT=None, branch_ids_BxT=None):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    heads = BTD[:2] + ("act_heads", None)
    kv_heads = BTD[:2] + ("act_kv_heads", None)
    inv_freq, factor = rope_frequencies(cfg)
    q_BxTxNxH = pin(self.q_proj(x_BxTxD).reshape(b, t, n, h), heads)
    k_BxTxKxH = pin(self.k_proj(x_BxTxD).reshape(b, t, k, h), kv_heads)
    if cfg.qk_norm:
      q_BxTxNxH, k_BxTxKxH = self.q_norm(q_BxTxNxH), self.k_norm(k_BxTxKxH)
    q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, cfg.rope_theta, inv_freq, factor)
    k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, cfg.rope_theta, inv_freq, factor)
    v_BxTxKxH = pin(self.v_proj(x_BxTxD).reshape(b, t, k, h), kv_heads)
    if cache is not None:
      start = query_index_T[0]
      k_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
          cache["k"], k_BxTxKxH.astype(cache["k"].dtype), start, axis=1)
      v_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
          cache["v"], v_BxTxKxH.astype(cache["v"].dtype), start, axis=1)
      cache = {"k": k_BxSxKxH, "v": v_BxSxKxH}
    else:  # no cache: the keys are the queries' own tokens, S = T
      k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
    k_BxSxKxH = k_BxSxKxH.astype(cfg.dtype)
    v_BxSxKxH = v_BxSxKxH.astype(cfg.dtype)

    if (cfg.attention_impl == "cudnn" and cache is None
        and segment_ids_BxT is None):
      # cuDNN flash attention: causal + window in-kernel; padding must be on
      # the right, expressed as sequence lengths.
      lengths_B = jnp.sum(key_valid_BxS, axis=-1, dtype=jnp.int32)
      window = (None if cfg.sliding_window is None
                else (cfg.sliding_window - 1, 0))
      out_BxTxNxH = jax.nn.dot_product_attention(
          q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True,
          local_window_size=window,
          query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
          implementation="cudnn")
    else:
      mask_Bx1xTxS = attention_mask(key_valid_BxS, query_index_T,
                                    cfg.sliding_window, segment_ids_BxT,
                                    branch_ids_BxT, positions_BxT)
      out_BxTxNxH = masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                     mask_Bx1xTxS,
                                     packed_pairs=branch_ids_BxT is not None)
    return self.o_proj(out_BxTxNxH.reshape(b, t, n * h)), cache


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg, rngs):
    d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.gate_proj = Dense(cfg, d, f, ("embed", "mlp"), rngs, bias)
    self.up_proj = Dense(cfg, d, f, ("embed", "mlp"), rngs, bias)
    self.down_proj = Dense(cfg, f, d, ("mlp", "embed"), rngs, bias)

  def __call__(self, x_BxTxD):
    mlp = BTD[:2] + ("act_mlp",)
    gate_BxTxF = pin(self.gate_proj(x_BxTxD), mlp)
    up_BxTxF = pin(self.up_proj(x_BxTxD), mlp)
    return self.down_proj(jax.nn.silu(gate_BxTxF) * up_BxTxF)


class Block(nnx.Module):
  """Pre-norm decoder block: attention then MLP, each with a residual."""

  def __init__(self, cfg, rngs):
    self.input_layernorm = RMSNorm(cfg, rngs)
    self.self_attn = Attention(cfg, rngs)
    self.post_attention_layernorm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxTxD, positions_BxT, key_valid_BxS, query_index_T,
               cache=None, segment_ids_BxT=None, branch_ids_BxT=None):
    # Named scopes label the ops in profiles (benchmarks/profiling.py).
    with jax.named_scope("attention"):
      attn_BxTxD, cache = self.self_attn(
          self.input_layernorm(x_BxTxD), positions_BxT, key_valid_BxS,
          query_index_T, cache, segment_ids_BxT, branch_ids_BxT)
    x_BxTxD = x_BxTxD + attn_BxTxD
    with jax.named_scope("mlp"):
      return (x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)),
              cache)


def _run_block(block, x_BxTxD, positions_BxT, key_valid_BxS, query_index_T,
               cache, segment_ids_BxT, branch_ids_BxT):
  return block(x_BxTxD, positions_BxT, key_valid_BxS, query_index_T, cache,
               segment_ids_BxT, branch_ids_BxT)


class Mistral(nnx.Module):
  """The decoder stack; :meth:`__call__` returns final (normed) hidden states."""

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = nnx.Module()
    self.embed_tokens.embedding = _param(
        rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    self.layers = nnx.List([Block(cfg, rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(cfg, cfg.hidden_size, cfg.vocab_size,
                           ("embed", "vocab"), rngs)

  def __call__(self, input_ids_BxT, positions_BxT, key_valid_BxS,
               query_index_T, caches=None, segment_ids_BxT=None,
               branch_ids_BxT=None):
    with jax.named_scope("embed"):
      x_BxTxD = jnp.take(self.embed_tokens.embedding[...], input_ids_BxT,
                         axis=0)
      x_BxTxD = pin(x_BxTxD.astype(self.cfg.dtype), BTD)
    run = _run_block
    if self.cfg.remat:
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if self.cfg.remat_policy == "dots" else None)
      run = nnx.remat(_run_block, prevent_cse=True, policy=policy)
    new_caches = []
    for i, block in enumerate(self.layers):
      x_BxTxD, cache = run(block, x_BxTxD, positions_BxT, key_valid_BxS,
                           query_index_T,
                           None if caches is None else caches[i],
                           segment_ids_BxT, branch_ids_BxT)
      x_BxTxD = pin(x_BxTxD, BTD)
      new_caches.append(cache)
    return (pin(self.norm(x_BxTxD), BTD),
            None if caches is None else new_caches)

  def unembedding(self):
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.embedding[...].T
    return self.lm_head.kernel[...]


# --------------------------------------------------------------------------- #
# Functional surface: params are a plain nested dict of arrays.
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=16)
def _graphdef(cfg: MistralConfig):
  return nnx.split(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))[0]


def bind(cfg: MistralConfig, params) -> Mistral:
  """The module graph of ``cfg`` holding ``params`` (no copy)."""
  return nnx.merge(_graphdef(cfg), params)


def init_params(cfg: MistralConfig, rng):
  """Random parameters as a nested dict (normal(initializer_range) weights).

  Jit it with ``out_shardings`` to create a large model directly sharded.
  """
  model = Mistral(cfg, rngs=nnx.Rngs(params=rng))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: MistralConfig):
  """Shapes and dtypes of the params, without allocating them."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: MistralConfig):
  """The params' logical axis names: a dict of tuples of the same structure."""
  abstract = nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0)))
  axes = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(var.get_metadata()["out_sharding"])
  return axes


def param_path(path) -> str:
  """'layers/0/mlp/down_proj/kernel' for a jax key path into params."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def match_params(params, pattern: str):
  """Bool pytree: True where the leaf's path matches the regex ``pattern``."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: bool(regex.search(param_path(p))), params)


def default_positions(attention_mask_BxT):
  """Position ids that skip padding: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), -1) - 1,
                     0)


def segment_positions(segment_ids_BxT):
  """Position ids that restart at 0 where each packed segment starts."""
  index_1xT = jnp.arange(segment_ids_BxT.shape[1])[None, :]
  starts_BxT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxT[:, :1], bool),
       segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
  start_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_1xT, 0), axis=1)
  return index_1xT - start_BxT


def _prepare(input_ids, attention_mask, positions, segment_ids):
  if segment_ids is not None and attention_mask is None:
    attention_mask = segment_ids > 0
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = (default_positions(attention_mask) if segment_ids is None
                 else segment_positions(segment_ids))
  return attention_mask, positions


def apply_hidden(cfg, params, input_ids, attention_mask=None, positions=None,
                 segment_ids=None, branch_ids=None):
  """Final hidden states [B, T, D] (after the last RMSNorm).

  Args:
    cfg: the MistralConfig.
    params: nested dict from :func:`init_params` or :func:`load_hf`.
    input_ids: [B, T] int token ids.
    attention_mask: optional [B, T], True/1 on real tokens (left or right
      padding both work).
    positions: optional [B, T] position ids; by default counted over the real
      tokens of each row, so left padding does not shift RoPE.
    segment_ids: optional [B, T] ids of sequences packed into one row (0 =
      padding): tokens attend only within their segment, and default
      positions restart at each segment.
    branch_ids: optional [B, T] with ``segment_ids`` and explicit
      ``positions``: packed preference pairs (``data.packing``), 0 on a
      pair's prompt, 1 on its chosen and 2 on its rejected branch; a branch
      attends to the prompt and itself.

  Returns:
    [B, T, D] hidden states in ``cfg.dtype``; multiply by :func:`unembedding`
    (or use ``logprobs.chunked_sequence_logps``) for log-probs.
  """
  attention_mask, positions = _prepare(input_ids, attention_mask, positions,
                                       segment_ids)
  if branch_ids is not None and (segment_ids is None or positions is None):
    raise ValueError("branch_ids need segment_ids and explicit positions")
  hidden_BxTxD, _ = bind(cfg, params)(input_ids, positions, attention_mask,
                                      jnp.arange(input_ids.shape[1]),
                                      segment_ids_BxT=segment_ids,
                                      branch_ids_BxT=branch_ids)
  return hidden_BxTxD


def unembedding(cfg, params):
  """The [D, V] output matrix: ``lm_head`` or the tied embedding transposed."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def apply(cfg, params, input_ids, attention_mask=None, positions=None,
          segment_ids=None, branch_ids=None):
  """Next-token logits [B, T, V] in float32; see :func:`apply_hidden`."""
  hidden_BxTxD = apply_hidden(cfg, params, input_ids, attention_mask,
                              positions, segment_ids, branch_ids)
  w_DxV = unembedding(cfg, params).astype(cfg.dtype)
  return jnp.dot(hidden_BxTxD, w_DxV, preferred_element_type=jnp.float32)
