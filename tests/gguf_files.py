"""Tiny GGUF files written the way llama.cpp's converter writes them, for tests.

A random ``transformers`` model's tensors go in under GGUF names, q/k rows of
Llama-family models permuted as ``convert_hf_to_gguf.py``'s ``permute`` does
(written here from that function, independently of the reader's inverse),
each quantized to a chosen type: with ``gguf.quants.quantize`` where it can,
and for the K-quants (which it cannot write) as random blocks whose float16
scale fields are set to small finite values.
"""

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
K_SCALES = {  # byte offsets of the float16 fields inside one block
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
    Q.Q6_K: (208,), Q.IQ4_NL: (0,),
}
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w, n_head, n_head_kv):
  """``convert_hf_to_gguf.LlamaModel.permute``."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf_name):
  if hf_name == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf_name == "model.norm.weight":
    return "output_norm.weight"
  if hf_name == "lm_head.weight":
    return "output.weight"
  _, _, layer, rest = hf_name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def quantized(x, qtype, rng):
  """``(data, raw_dtype)`` of ``x`` [rows, cols] stored as ``qtype``."""
  if qtype == Q.F32:
    return x.astype(np.float32), None
  if qtype == Q.F16:
    return x.astype(np.float16), None
  if qtype in K_SCALES:
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = x.shape
    data = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
      scale = rng.uniform(0.0001, 0.0004, (rows, cols // block)).astype(np.float16)
      data[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(
          rows, cols // block, 2)
    return data.reshape(rows, -1), qtype
  return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def write_gguf(path, hf_model, arch, types, *, seed=0, tokenizer=None,
               extra=None):
  """Writes ``hf_model`` (a random transformers model) as a GGUF file.

  Args:
    types: ``{substring of the HF name: GGMLQuantizationType}``, first match
      wins; unmatched tensors (norms, biases) are F32.
    tokenizer: optional ``callable(writer)`` adding tokenizer metadata.
    extra: optional ``callable(writer)`` adding anything else.
  """
  config = hf_model.config
  rng = np.random.default_rng(seed)
  writer = gguf.GGUFWriter(path, arch)
  writer.add_name("tiny test model")
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  head_dim = getattr(config, "head_dim", None) or (
      config.hidden_size // config.num_attention_heads)
  if arch == "qwen3":
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  else:
    writer.add_rope_dimension_count(head_dim)
  writer.add_vocab_size(config.vocab_size)
  writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
  if tokenizer:
    tokenizer(writer)
  if extra:
    extra(writer)
  for name, tensor in hf_model.state_dict().items():
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    x = tensor.detach().numpy().astype(np.float32)
    if arch == "llama" and ".q_proj." in name:
      x = llama_cpp_permute(x, config.num_attention_heads,
                            config.num_attention_heads)
    if arch == "llama" and ".k_proj." in name:
      x = llama_cpp_permute(x, config.num_attention_heads,
                            config.num_key_value_heads)
    qtype = next((t for key, t in types.items() if key in name), Q.F32)
    if x.ndim == 1:
      qtype = Q.F32
    data, raw = quantized(x, qtype, rng)
    writer.add_tensor(gguf_name(name), data, raw_dtype=raw)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path
