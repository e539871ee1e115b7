"""Linear weight merges of two models of one architecture (model soups, P-SACPO).

    python -m bfpo_jax.merge A B --weight W --out DIR [--only REGEX]
        [--dtype bfloat16]

writes ``(1 - W) * A + W * B`` as a Hugging Face folder: W is B's weight, so
``--weight 0`` gives A exactly and ``--weight 1`` gives B exactly. A and B
are HF folders, Hub ids, or training workdirs (a workdir means its
``hf_export/``, as ``--config.init_from`` reads it). ``--only REGEX``
interpolates only the tensors whose parameter path matches (``re.search``
over paths like ``layers/3/mlp/down_proj/kernel``, as ``trainable.pattern``;
e.g. ``'mlp/down_proj/kernel$'`` for two selective runs) and takes every
other tensor from A. Tensors are mixed in float32 and written in ``--dtype``
(default: A's dtype). The tokenizer and generation files come from A; the
model card (README.md) names both parents and W.

P-SACPO (Wachi et al., NeurIPS 2024; line/sacpo config/merge/linear_*.yaml)
is this merge with A the helpfulness-DPO model and B the stepwise
(helpfulness then safety) one, W in {0.25, 0.5, 0.75}, in bfloat16.

Refuses, in one line with exit code 2, folders whose architectures or shapes
differ, a weight outside [0, 1] and a pattern that matches no tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys

import jax
import jax.numpy as jnp

from bfpo_jax import model_card
from bfpo_jax.model import hf_io, param_path
from bfpo_jax.model_source import EXPORT_DIR

# MistralConfig fields that say how a model runs or names special tokens,
# not what its weights are: they may differ between parents.
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "remat", "remat_policy",
                     "attention_impl", "initializer_range", "bos_token_id",
                     "eos_token_id", "pad_token_id")
# A's files that are not weights, config or card: copied as they are.
_REWRITTEN = re.compile(r"(\.safetensors|\.safetensors\.index\.json|"
                        r"^config\.json|^README\.md)$")
_DTYPES = ("float32", "bfloat16", "float16")


class MergeError(ValueError):
  """Parents that cannot be merged, or a bad argument (one line)."""


def _mix(a, b, weight, dtype):
  """``(1 - weight) * a + weight * b`` computed in float32, as ``dtype``; a
  parent itself at weight 0 or 1 (exact, whatever the other holds)."""
  if weight == 0:
    return a.astype(dtype)
  if weight == 1:
    return b.astype(dtype)
  return ((1.0 - weight) * a.astype(jnp.float32)
          + weight * b.astype(jnp.float32)).astype(dtype)


def _check_weight(weight):
  if not 0.0 <= weight <= 1.0:
    raise MergeError(f"--weight {weight:g}: must be in [0, 1] (the weight of "
                     "B; 0 gives A, 1 gives B)")


def merge_params(params_a, params_b, weight: float, *, only: str | None = None):
  """Linear interpolation of two param trees of one shape: B's weight is W.

  Args:
    params_a: param tree of A (nested dicts of arrays).
    params_b: param tree of B, with A's structure and shapes.
    weight: W in [0, 1]; each merged leaf is ``(1 - W) * a + W * b``,
      computed in float32 and cast to A's dtype. W = 0 returns A's leaves
      and W = 1 B's (cast to A's dtype) exactly.
    only: optional regex over parameter paths (``layers/0/mlp/down_proj/
      kernel``); leaves that do not match are A's.

  Returns:
    The merged tree.

  Raises:
    MergeError: trees of different structure or shapes, W outside [0, 1],
      or ``only`` matching no leaf.
  """
  _check_weight(weight)
  paths_a = _paths_and_shapes(params_a)
  paths_b = _paths_and_shapes(params_b)
  if paths_a != paths_b:
    raise MergeError("A and B have different parameters: "
                     f"{_first_difference(paths_a, paths_b)}")
  selected = _selection(params_a, only)
  return jax.tree.map(
      lambda a, b, take: _mix(a, b, weight, a.dtype) if take else a,
      params_a, params_b, selected)


def _paths_and_shapes(params):
  return {param_path(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _first_difference(a: dict, b: dict) -> str:
  for name in sorted(set(a) | set(b)):
    if name not in b:
      return f"{name} only in A"
    if name not in a:
      return f"{name} only in B"
    if a[name] != b[name]:
      return f"{name} is {list(a[name])} in A, {list(b[name])} in B"
  return "none"


def _selection(params, only):
  """Bool tree: which leaves are interpolated."""
  if only is None:
    return jax.tree.map(lambda _: True, params)
  try:
    regex = re.compile(only)
  except re.error as e:
    raise MergeError(f"--only {only!r}: not a regular expression ({e})") from None
  selected = jax.tree_util.tree_map_with_path(
      lambda p, _: bool(regex.search(param_path(p))), params)
  if not any(jax.tree.leaves(selected)):
    raise MergeError(f"--only {only!r} matches no parameter (paths look like "
                     "layers/0/mlp/down_proj/kernel)")
  return selected


def model_folder(path: str) -> str:
  """A parent as given -> its HF folder (a workdir means its hf_export/)."""
  if os.path.isdir(os.path.join(path, EXPORT_DIR)):
    return os.path.join(path, EXPORT_DIR)
  return path


def _architecture(cfg) -> dict:
  fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in _NOT_ARCHITECTURE}
  fields["head_dim"] = cfg.dim_per_head  # None means the default
  return fields


def _check_same_architecture(cfg_a, cfg_b):
  a, b = _architecture(cfg_a), _architecture(cfg_b)
  diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]
  if diff:
    raise MergeError(f"A and B have different architectures "
                     f"({', '.join(diff)})")


def stored_dtype(folder: str) -> str:
  """The dtype a folder's ``config.json`` says its weights are in."""
  with open(os.path.join(hf_io.resolve_model(folder), "config.json")) as f:
    raw = json.load(f)
  name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
  return name if name in _DTYPES else "float32"


def _load_config(role, path):
  try:
    return hf_io.load_config(path)
  except (FileNotFoundError, ValueError) as e:
    raise MergeError(f"{role} ({path}): {e}") from None


def _side_files(folder: str) -> list[str]:
  """A folder's tokenizer, generation and other non-weight files."""
  return [name for name in sorted(os.listdir(folder))
          if os.path.isfile(os.path.join(folder, name))
          and not _REWRITTEN.search(name)]


def _differing_side_files(a: str, b: str) -> list[str]:
  def content(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      return None
    with open(path, "rb") as f:
      return f.read()
  names = sorted(set(_side_files(a)) | set(_side_files(b)))
  return [n for n in names if content(a, n) != content(b, n)]


def merge_folders(a: str, b: str, weight: float, out: str, *,
                  only: str | None = None, dtype: str | None = None,
                  command: str = "") -> dict:
  """Merges two HF folders (or workdirs) into ``out``; see the module doc.

  Returns:
    A summary: parents, folders, weight, pattern, dtype, tensors merged,
    and the tokenizer files in which B differs from A.

  Raises:
    MergeError: one line, for parents that cannot be merged.
  """
  _check_weight(weight)
  if dtype is not None and dtype not in _DTYPES:
    raise MergeError(f"--dtype {dtype!r}: not one of {', '.join(_DTYPES)}")
  folder_a, folder_b = model_folder(a), model_folder(b)
  for role, folder in (("A", folder_a), ("B", folder_b)):
    if os.path.abspath(out) == os.path.abspath(folder):
      raise MergeError(f"--out {out}: is {role}'s folder; write elsewhere")
  cfg_a, cfg_b = _load_config("A", folder_a), _load_config("B", folder_b)
  _check_same_architecture(cfg_a, cfg_b)
  out_dtype = jnp.dtype(dtype or stored_dtype(folder_a))
  try:
    _, params_a = hf_io.load_hf(folder_a, dtype=jnp.dtype(stored_dtype(folder_a)))
    _, params_b = hf_io.load_hf(folder_b, dtype=jnp.dtype(stored_dtype(folder_b)))
  except (FileNotFoundError, ValueError) as e:
    raise MergeError(str(e)) from None
  selected = _selection(params_a, only)
  # Leaf by leaf, dropping each parent's leaf once mixed: the peak is about
  # the two parents, not three models.
  flat_a, treedef = jax.tree.flatten(params_a)
  flat_b, flat_take = treedef.flatten_up_to(params_b), jax.tree.leaves(selected)
  del params_a, params_b
  merged = []
  for i, take in enumerate(flat_take):
    merged.append(_mix(flat_a[i], flat_b[i], weight, out_dtype) if take
                  else flat_a[i].astype(out_dtype))
    flat_a[i] = flat_b[i] = None
  hf_io.save_hf(out, cfg_a, jax.tree.unflatten(treedef, merged))
  local_a, local_b = hf_io.resolve_model(folder_a), hf_io.resolve_model(folder_b)
  for name in _side_files(out):  # an earlier merge's, which A may not have
    os.remove(os.path.join(out, name))
  for name in _side_files(local_a):
    shutil.copyfile(os.path.join(local_a, name), os.path.join(out, name))
  summary = {"a": a, "b": b, "folder_a": folder_a, "folder_b": folder_b,
             "weight": weight, "only": only, "dtype": str(out_dtype),
             "tensors": len(flat_take), "merged": int(sum(flat_take)),
             "b_differs_in": _differing_side_files(local_a, local_b)}
  _write_card(out, summary, command)
  return summary


def _write_card(out: str, summary: dict, command: str) -> str:
  from huggingface_hub import ModelCardData

  bases, licenses = [], []
  for role in ("a", "b"):
    base, license_id = model_card.base_model_and_license(
        summary[role], summary[f"folder_{role}"])
    if base and base not in bases:
      bases.append(base)
    licenses.append(license_id)
  license_id = licenses[0] if licenses[0] and len(set(licenses)) == 1 else ""
  data = ModelCardData(base_model=bases or None, license=license_id or "unknown",
                       library_name="transformers", pipeline_tag="text-generation",
                       tags=["merge", "bfpo-jax"])
  w = summary["weight"]
  which = (f"the tensors whose path matches `{summary['only']}` "
           f"({summary['merged']} of {summary['tensors']}; the others are A's)"
           if summary["only"] else f"every tensor ({summary['tensors']})")
  lines = [
      "# Linear merge", "",
      f"`(1 - W) * A + W * B` with **W = {w:g}** (the weight of B) over "
      f"{which}, mixed in float32 and written in {summary['dtype']}.", "",
      "| parent | model | weight |", "|---|---|---|",
      f"| A | `{summary['a']}` | {1 - w:g} |",
      f"| B | `{summary['b']}` | {w:g} |", "",
      "The tokenizer and generation settings are A's."
      + (f" B's differ in {', '.join(summary['b_differs_in'])}."
         if summary["b_differs_in"] else ""), ""]
  if command:
    lines += ["Made with:", "", "```bash", command, "```", ""]
  path = os.path.join(out, model_card.CARD_FILE)
  with open(path, "w") as f:
    f.write(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m bfpo_jax.merge", description=__doc__.splitlines()[0])
  parser.add_argument("a", help="model A: HF folder, Hub id or run workdir")
  parser.add_argument("b", help="model B: HF folder, Hub id or run workdir")
  parser.add_argument("--weight", type=float, required=True,
                      help="W, the weight of B in [0, 1]: 0 gives A, 1 gives B")
  parser.add_argument("--out", required=True, help="output HF folder")
  parser.add_argument("--only", default=None,
                      help="regex over parameter paths: interpolate only these "
                           "tensors, the others are A's (default: all)")
  parser.add_argument("--dtype", default=None, choices=_DTYPES,
                      help="dtype written (default: A's)")
  args = parser.parse_args(argv)
  command = shlex.join(["python", "-m", "bfpo_jax.merge",
                        *(sys.argv[1:] if argv is None else argv)])
  try:
    summary = merge_folders(args.a, args.b, args.weight, args.out,
                            only=args.only, dtype=args.dtype, command=command)
  except MergeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"merged {summary['merged']} of {summary['tensors']} tensors: "
        f"{1 - args.weight:g} x {args.a} + {args.weight:g} x {args.b} -> "
        f"{args.out} ({summary['dtype']})")
  for name in summary["b_differs_in"]:
    print(f"note: {name} differs between A and B; the merge carries A's")
  return summary


if __name__ == "__main__":
  main()
