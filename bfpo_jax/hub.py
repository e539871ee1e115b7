"""Hugging Face Hub ids wherever a model folder is accepted.

``owner/name`` or ``owner/name@revision`` (a branch, tag or commit) that is
not an existing local path is fetched once with
``huggingface_hub.snapshot_download`` into the Hub cache (``HF_HOME``,
``HF_HUB_CACHE``) and its snapshot folder is used as the model folder. Only
what loading needs is fetched (:data:`ALLOW_PATTERNS`): safetensors weights
and their index, the config, tokenizer files, a PEFT adapter's files and the
model card. Never PyTorch pickles (``*.bin``, ``*.pt``, ``*.pth``), never
Python files (remote code). With ``HF_HUB_OFFLINE=1`` the cache alone
answers; without network and cache the error is one line.

Kept out of :mod:`bfpo_jax.model` so that the tokenizer (and with it
:mod:`bfpo_jax.data`) can resolve ids without importing the model.
"""

from __future__ import annotations

import functools
import os
import re

ALLOW_PATTERNS = (
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "adapter_model.safetensors", "adapter_config.json",
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
    "README.md",  # the model card: its license carries over to our exports
)
"""Files fetched for a Hub id (``fnmatch`` patterns on repository paths)."""

_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                     r"(?:@(?P<revision>[\w./-]+))?")


class HubError(ValueError):
  """A Hub id that cannot be fetched (one line: the id and why)."""


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
  """``(repo_id, revision)`` when ``name`` reads as a Hub model id.

  An existing local path is never a Hub id, nor is anything with more than
  one ``/`` before the ``@`` or starting with ``.``, ``/`` or ``~``.

  Examples:
    >>> parse_hub_id("mistralai/Mistral-7B-v0.1@main")
    ('mistralai/Mistral-7B-v0.1', 'main')
    >>> parse_hub_id("runs/sft/hf_export") is None
    True
  """
  if not name or os.path.exists(name):
    return None
  match = _HUB_ID.fullmatch(name)
  if match is None or ".." in match["repo"]:
    return None
  return match["repo"], match["revision"]


def is_hub_id(name: str) -> bool:
  return parse_hub_id(name) is not None


@functools.cache
def resolve_model(name: str) -> str:
  """The local folder for a model folder or Hub id.

  Args:
    name: a folder (returned unchanged, as is anything that is not a Hub
      id: callers report missing folders themselves) or
      ``owner/name[@revision]``.

  Returns:
    A folder path; for a Hub id, its snapshot in the Hub cache.

  Raises:
    HubError: the id cannot be fetched (offline and not cached, unknown or
      gated repository, unknown revision); one line.
  """
  parsed = parse_hub_id(name)
  if parsed is None:
    return name
  repo_id, revision = parsed
  from huggingface_hub import errors, snapshot_download

  try:
    return snapshot_download(repo_id, revision=revision,
                             allow_patterns=list(ALLOW_PATTERNS))
  except errors.GatedRepoError:
    reason = (f"gated on the Hub: accept its terms at https://huggingface.co/"
              f"{repo_id} and log in (hf auth login)")
  except errors.RepositoryNotFoundError:
    reason = ("no such local folder, and no such model on the Hugging Face Hub "
              "(a private one needs hf auth login)")
  except errors.RevisionNotFoundError:
    reason = f"the Hub has no revision {revision!r} of {repo_id}"
  except errors.LocalEntryNotFoundError:
    reason = ("no such local folder; as a Hub id it is not in the local Hugging "
              "Face cache and the Hub cannot be reached (offline or "
              "HF_HUB_OFFLINE=1): download it once online, or pass a folder")
  except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
    reason = f"cannot fetch from the Hugging Face Hub: {_first_line(e)}"
  raise HubError(f"{name}: {reason}")


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__
