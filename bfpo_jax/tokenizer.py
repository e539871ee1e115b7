"""Tokenizers: from a model folder or Hub id, or offline the real Mistral-7B-v0.1
one.

A top-level module (re-exported by :mod:`bfpo_jax.model`) so that
:mod:`bfpo_jax.data` tokenizes without importing the model package.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from bfpo_jax.hub import resolve_model

MISTRAL_COMMON_TOKENIZER = "tokenizer.model.v1"  # Mistral-7B-v0.1, 32k pieces


def mistral_tokenizer_dir(cache_dir: str | None = None) -> str:
  """A folder holding the Mistral-7B-v0.1 ``tokenizer.model``.

  The SentencePiece model ships inside the PyPI package ``mistral-common``;
  it is copied once into ``cache_dir`` (default: a per-user temp folder) so
  ``LlamaTokenizer.from_pretrained`` can read it with no network.
  """
  import mistral_common

  source = os.path.join(os.path.dirname(mistral_common.__file__), "data",
                        MISTRAL_COMMON_TOKENIZER)
  if not os.path.isfile(source):
    raise FileNotFoundError(f"{source}: mistral-common does not ship "
                            f"{MISTRAL_COMMON_TOKENIZER}; upgrade it")
  cache_dir = cache_dir or os.path.join(tempfile.gettempdir(),
                                        f"bfpo_jax_tokenizer_{os.getuid()}")
  target = os.path.join(cache_dir, "tokenizer.model")
  if not os.path.isfile(target):
    os.makedirs(cache_dir, exist_ok=True)
    partial = f"{target}.{os.getpid()}.tmp"
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # atomic: parallel callers never see half
  return cache_dir


def load_tokenizer(path: str | None = None):
  """Loads a ``transformers`` tokenizer.

  Args:
    path: a model folder with tokenizer files, a Hub id (``owner/name[@rev]``,
      see :mod:`bfpo_jax.hub`), a ``.gguf`` file (its tokenizer rebuilt from
      the metadata), or None (or "mistral") for the Mistral-7B-v0.1
      tokenizer bundled in ``mistral-common`` (offline).

  Returns:
    A tokenizer with ``bos_token_id``/``eos_token_id`` set. It is loaded
    without ``trust_remote_code``. Callers add BOS/EOS ids themselves.

  Raises:
    FileNotFoundError: no such folder; HubError: a Hub id cannot be fetched.
  """
  import transformers

  if path is None or path == "mistral":
    return transformers.LlamaTokenizer.from_pretrained(mistral_tokenizer_dir())
  if str(path).lower().endswith(".gguf"):  # rebuilt from the file's metadata
    from bfpo_jax.model.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(path)
  path = resolve_model(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: tokenizer folder does not exist")
  return transformers.AutoTokenizer.from_pretrained(path,
                                                    trust_remote_code=False)
