"""SafeHelp: the BFPO paper's benchmark as one run of harness tasks.

The suite is ``tasks/safehelp.yaml``: every task the reference evaluates, its
cell in the paper's 2x2 (helpfulness/harmlessness x discriminative/
generative), the metric its cell averages, whether its prompts go through the
chat template, and what it needs beyond data. :func:`run` loads the selected
tasks (a local copy of any task's data with ``--data TASK=FILE``; a task whose
data cannot be had, or that needs what is absent, is skipped with one line
and counted), runs them in at most two harness passes on one model (plain
prompts, then chat-template prompts, as the reference's two ``lm_eval``
commands), and returns the merged harness results and the skips;
:func:`scores` turns those into task scores and the four aggregates.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import yaml
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from bfpo_jax.data.tokenize import CHAT_TEMPLATE

logger = logging.getLogger(__name__)

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
SUITE_FILE = os.path.join(TASKS_DIR, "safehelp.yaml")
SUITE = "safehelp"
AXES = ("helpfulness", "harmlessness")
KINDS = ("discriminative", "generative")
CELLS = tuple(f"{a}/{k}" for a in AXES for k in KINDS)
# Data files --data reads, by extension, and the `datasets` builder for each.
BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".txt": "text"}
# Zephyr's chat template (HuggingFaceH4/zephyr-7b-beta), the format this
# project trains in: used when the model's tokenizer carries none.
ZEPHYR_CHAT_TEMPLATE = CHAT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class SuiteTask:
  name: str
  cell: str  # one of CELLS
  metric: str | None  # what the cell averages; None: produced, not scored
  chat_template: bool = False
  needs: str | None = None  # "classifier": a harm classifier judge

  @property
  def kind(self) -> str:
    return self.cell.split("/")[1]


def load_suite(path: str = SUITE_FILE) -> list[SuiteTask]:
  """The suite's tasks, in the order of the group file."""
  with open(path, encoding="utf-8") as f:
    group = yaml.safe_load(f)
  info = group["metadata"]["tasks"]
  tasks = []
  for name in group["task"]:
    fields = info[name]
    if fields["cell"] not in CELLS:
      raise ValueError(f"{path}: {name}: cell {fields['cell']!r} is not one "
                       f"of {', '.join(CELLS)}")
    tasks.append(SuiteTask(name, **fields))
  return tasks


def select(spec: str) -> list[SuiteTask]:
  """``safehelp``, ``safehelp:discriminative`` or ``safehelp:generative``."""
  name, _, kind = spec.partition(":")
  if name != SUITE or (kind and kind not in KINDS):
    raise ValueError(f"--suite: unknown suite {spec!r} (use {SUITE}, "
                     f"{SUITE}:discriminative or {SUITE}:generative)")
  return [t for t in load_suite() if not kind or t.kind == kind]


def parse_data(pairs: list[str], suite: list[SuiteTask]) -> dict[str, str]:
  """``TASK=FILE`` arguments -> {task: absolute file}, checked."""
  known = {t.name for t in suite}
  data = {}
  for pair in pairs:
    task, sep, path = pair.partition("=")
    if not sep or not task or not path:
      raise ValueError(f"--data {pair!r}: expected TASK=FILE")
    if task not in known:
      raise ValueError(f"--data {pair}: unknown task {task!r} (this suite's "
                       f"tasks: {', '.join(sorted(known))})")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--data {pair}: no such file")
    if os.path.splitext(path)[1].lower() not in BUILDERS:
      raise ValueError(f"--data {pair}: unsupported file type (use "
                       f"{', '.join(BUILDERS)})")
    data[task] = os.path.abspath(path)
  return data


def local_config(config: dict, path: str) -> dict:
  """A task config reading every split it names from the one file ``path``,
  in the dataset's own schema."""
  config = dict(config)
  for key in ("group", "tag"):  # index structure, not task fields
    config.pop(key, None)
  splits = {config.get(k) for k in ("training_split", "validation_split",
                                    "test_split", "fewshot_split")} - {None}
  config.update(dataset_path=BUILDERS[os.path.splitext(path)[1].lower()],
                dataset_name=None, custom_dataset=None,
                dataset_kwargs={"data_files": dict.fromkeys(splits, path)})
  return config


def task_manager(include_path=None) -> TaskManager:
  """The harness's tasks plus this package's (and ``include_path``'s)."""
  return TaskManager(include_path=[TASKS_DIR] + ([include_path]
                                                 if include_path else []))


def _first_line(error: Exception) -> str:
  if isinstance(error, KeyError):  # a document without a field the task reads
    return f"its rows lack the field {error.args[0]!r}"
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def load_tasks(suite: list[SuiteTask], manager: TaskManager,
               data: dict[str, str], judge) -> tuple[dict, dict[str, str]]:
  """Builds each task (its data downloaded or read).

  Returns:
    ``({name: Task}, {name: why it was skipped})``.

  Raises:
    ValueError: a ``--data`` file the task cannot read (one line).
  """
  loaded, skipped = {}, {}
  for task in suite:
    entry = manager.task_index.get(task.name)
    if entry is None:
      raise ValueError(f"task {task.name!r} of the suite is not known to the "
                       "harness")
    if task.needs == "classifier" and not judge.needs_model:
      skipped[task.name] = ("needs a harm classifier (--judge PATH): refusal "
                            "strings cannot judge a text continuation")
      continue
    spec = task.name
    if task.name in data:
      spec = local_config(load_yaml(entry.yaml_path), data[task.name])
    try:
      (loaded[task.name],) = manager.load([spec])["tasks"].values()
    except Exception as e:  # noqa: BLE001 (any failure to get a dataset)
      if task.name in data:
        raise ValueError(f"--data {task.name}={data[task.name]}: "
                         f"{_first_line(e)}") from None
      skipped[task.name] = (f"data unavailable ({_first_line(e)}); point at "
                            f"a local copy with --data {task.name}=FILE")
  for name, why in skipped.items():
    logger.warning("skipping %s: %s", name, why)
  return loaded, skipped


def _merge(results: dict | None, more: dict) -> dict:
  if results is None:
    return more
  for key, value in more.items():
    if isinstance(value, dict) and isinstance(results.get(key), dict):
      results[key].update(value)
  return results


def run(lm, suite: list[SuiteTask], loaded: dict, manager: TaskManager, *,
        limit=None, gen_kwargs=None, bootstrap_iters=1000) -> dict:
  """The loaded tasks through ``simple_evaluate`` on ``lm``: plain prompts
  first, then the chat-template ones; their results merged."""
  results = None
  for chat in (False, True):
    tasks = [loaded[t.name] for t in suite
             if t.name in loaded and t.chat_template == chat]
    if not tasks:
      continue
    if chat and not lm.tokenizer.chat_template:
      logger.warning("%s: the tokenizer has no chat template; using "
                     "Zephyr's, the format bfpo_jax trains in", lm.source)
      lm.tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    results = _merge(results, simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit,
        apply_chat_template=chat, gen_kwargs=gen_kwargs, log_samples=True,
        bootstrap_iters=bootstrap_iters))
  return results


def scores(results: dict, suite: list[SuiteTask]) -> dict:
  """Task scores and the 2x2 aggregates from harness ``results``.

  A cell's aggregate is the mean over its scored tasks of the score oriented
  so that higher is better (``1 - x`` for a lower-is-better metric, e.g.
  CrowS-Pairs' share of stereotyped choices); null when none ran.
  """
  tasks, details, cells = {}, {}, {cell: [] for cell in CELLS}
  for task in suite:
    details[task.name] = {"cell": task.cell, "metric": task.metric and
                          f"{task.metric},none", "samples": None}
    tasks[task.name] = None
    if task.name not in results["results"]:
      continue
    details[task.name]["samples"] = results["n-samples"][task.name]["effective"]
    if task.metric is None:
      continue
    value = results["results"][task.name].get(f"{task.metric},none")
    higher = results["higher_is_better"][task.name].get(task.metric, True)
    tasks[task.name] = value
    details[task.name]["higher_is_better"] = higher
    if value is not None:
      cells[task.cell].append(value if higher else 1 - value)
  aggregates = {cell: (sum(v) / len(v) if v else None)
                for cell, v in cells.items()}
  return {"tasks": tasks, "aggregates": aggregates, "task_details": details,
          "cell_tasks": {cell: [t.name for t in suite if t.cell == cell
                                and tasks[t.name] is not None]
                         for cell in CELLS}}
