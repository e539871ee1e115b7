"""Reading rows of a source: local JSON/JSONL/parquet, or the Hugging Face Hub."""

from __future__ import annotations

import glob
import json
import os

# Hub defaults: split of each dataset the paper uses.
DEFAULT_SPLITS = {"ultrachat": "train_sft", "ultrafeedback": "train_prefs",
                  "pku_saferlhf": "train"}


class DataError(ValueError):
  """A source that cannot be used at all (one line, names the file)."""


def _read_jsonl(path):
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object per line")
      rows.append(row)
  return rows


def _read_json(path):
  """A JSON list of objects (or ``{"data": [...]}``); JSON lines in a .json
  file are read too, as ``datasets``' json loader reads them."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      if e.msg == "Extra data":
        return _read_jsonl(path)
      raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})"
                      ) from None
  if isinstance(data, dict) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
    raise DataError(f"{path}: expected a JSON list of objects")
  return data


def _read_parquet(path):
  import pyarrow.parquet as pq

  try:
    return pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several types for corrupt files
    raise DataError(f"{path}: not a readable parquet file ({e})") from None


_READERS = {".jsonl": _read_jsonl, ".json": _read_json,
            ".parquet": _read_parquet}


def _local_files(path, split):
  if os.path.isfile(path):
    return [path]
  files = sorted(f for ext in _READERS
                 for f in glob.glob(os.path.join(path, "**", f"*{ext}"),
                                    recursive=True))
  if split:
    matching = [f for f in files if split in os.path.basename(f)]
    files = matching or files
  if not files:
    raise DataError(f"{path}: no .jsonl, .json or .parquet files")
  return files


def read_rows(spec) -> list[dict]:
  """Rows of a local file/folder, or of a hub dataset when online.

  ``spec`` has ``kind``, ``path``, ``split`` and ``revision`` (a
  :class:`~bfpo_jax.data.sources.SourceSpec`).
  """
  if os.path.exists(spec.path):
    rows = []
    for file in _local_files(spec.path, spec.split):
      ext = os.path.splitext(file)[1]
      if ext not in _READERS:
        raise DataError(f"{file}: unsupported file type {ext!r} "
                        "(use .jsonl, .json or .parquet)")
      rows.extend(_READERS[ext](file))
    return rows
  if spec.path.startswith((".", "/", "~")) or spec.path.endswith(
      tuple(_READERS)):
    raise DataError(f"{spec.path}: file does not exist")
  import datasets

  split = spec.split or DEFAULT_SPLITS.get(spec.kind, "train")
  try:
    ds = datasets.load_dataset(spec.path, split=split, revision=spec.revision)
  except Exception as e:  # network, missing dataset or split: one line
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"{spec.path}: cannot load split {split!r} from the hub "
                    f"({first})") from None
  return list(ds)
