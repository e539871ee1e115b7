"""Run lm-evaluation-harness tasks, or the SafeHelp suite, on the JAX model.

    python -m bfpo_jax.evaluate --model runs/bfpo --tasks hellaswag,arc_easy \\
        --out runs/bfpo/eval [--include_path DIR] [--limit N] [--batch_size N] \\
        [--apply_chat_template] [--model_args dtype=bfloat16,fsdp=4]
    python -m bfpo_jax.evaluate --model runs/bfpo --suite safehelp \\
        --judge models/HarmBench-Llama-2-13b-cls|refusal \\
        [--data advbench=harmful_behaviors.csv ...] --out runs/bfpo/safehelp
    python -m bfpo_jax.evaluate --compare runs/sft/safehelp runs/bfpo/safehelp \\
        --out runs/compare

``--model`` is an HF folder or a training workdir. The harness's
``simple_evaluate`` runs with the ``bfpo_jax`` backend; ``--out`` gets
``results.json`` (the harness's results) and ``samples_<task>.jsonl`` (one
line per request: document, arguments, responses, metrics, judge verdicts).
``--suite`` adds ``safehelp.json``/``.md``/``.png`` (task scores and the
paper's four aggregates) and AlpacaEval's ``model_outputs.json``;
``--compare`` prints one table of several such runs and plots them in
``--out``/safehelp.png. Bad arguments, an unknown task, a missing data file,
a judge folder that is not a model or an unreadable model stop with one line
(exit code 2) before anything is written. On several hosts every process
runs the same command, as for training, and process 0 writes (not yet tested
across processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import jax
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table, simple_parse_args_string

from bfpo_jax import distributed
from bfpo_jax.evaluate import judges, report, suite
from bfpo_jax.evaluate.backend import BfpoJaxLM

RESULTS_FILE = "results.json"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m bfpo_jax.evaluate",
      description="lm-evaluation-harness tasks on the JAX model.")
  p.add_argument("--model",
                 help="HF folder or training workdir (newest checkpoint or "
                 "hf_export/)")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--tasks",
                    help="comma-separated harness task or group names")
  what.add_argument("--suite",
                    help="safehelp, safehelp:discriminative or "
                    "safehelp:generative")
  what.add_argument("--compare", nargs="+", metavar="DIR",
                    help="--suite output folders to tabulate and plot")
  p.add_argument("--judge",
                 help="harm judge of the generative tasks: a classifier "
                 "folder or Hub id (HarmBench's Llama-2-13b) or 'refusal'")
  p.add_argument("--data", nargs="+", action="extend", default=[],
                 metavar="TASK=FILE",
                 help="a local copy of a suite task's data, in its schema")
  p.add_argument("--name", help="the model's name in reports (default: the "
                 "--model folder's name)")
  p.add_argument("--max_gen_toks", type=int, default=None,
                 help="cap every generation at this many tokens (quick runs)")
  p.add_argument("--include_path", default=None,
                 help="folder of extra task YAMLs")
  p.add_argument("--limit", type=float, default=None,
                 help="documents per task (a fraction if below 1)")
  p.add_argument("--num_fewshot", type=int, default=None)
  p.add_argument("--batch_size", default="8",
                 help="rows per data-parallel device")
  p.add_argument("--apply_chat_template", action="store_true",
                 help="render prompts with the tokenizer's chat template")
  p.add_argument("--model_args", default="",
                 help="more backend arguments, e.g. "
                 "dtype=bfloat16,max_length=2048,fsdp=4,packing=True")
  p.add_argument("--bootstrap_iters", type=int, default=1000,
                 help="bootstrap resamples for standard errors (0: none)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--coordinator_address", default=None,
                 help="host:port of process 0 (multi-process runs outside "
                 "SLURM/TPU pods, which are detected)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  return p


def task_manager_for(names: list[str], include_path=None) -> TaskManager:
  """A TaskManager that knows ``names``, else ValueError naming the first
  unknown one.

  This package's tasks (:data:`suite.TASKS_DIR`) are always known. Indexing
  the harness's ~15k built-in tasks takes seconds; when every name is a
  plain task of ``include_path`` (no group or tag, which may list built-in
  tasks), only that folder and this package's are indexed.
  """
  if include_path:
    local = TaskManager(include_path=[suite.TASKS_DIR, include_path],
                        include_defaults=False)
    entries = [local.task_index.get(n) for n in names]
    if all(e is not None and e.kind.name in ("TASK", "PY_TASK")
           for e in entries):
      return local
  task_manager = suite.task_manager(include_path)
  known = set(task_manager.all_tasks)
  for name in names:
    if name not in known and not os.path.isfile(name):
      raise ValueError(f"--tasks: unknown task {name!r} (list them with "
                       "`lm-eval ls tasks`; add your own with --include_path)")
  return task_manager


def make_model(model: str, batch_size, model_args: str = "") -> BfpoJaxLM:
  """The backend from CLI-style arguments; bad ones raise one-line errors."""
  kwargs = simple_parse_args_string(model_args)
  kwargs.update(pretrained=model, batch_size=batch_size)
  try:
    return BfpoJaxLM(**kwargs)
  except TypeError as e:  # an argument the backend does not take
    raise ValueError(f"--model_args: {e}") from None


def run(lm: BfpoJaxLM, tasks: list[str], *, task_manager: TaskManager,
        limit=None, num_fewshot=None, apply_chat_template=False,
        bootstrap_iters=1000) -> dict:
  """The harness's ``simple_evaluate`` with ``lm``; returns its results."""
  if apply_chat_template and not lm.tokenizer.chat_template:
    raise ValueError(f"--apply_chat_template: the tokenizer of {lm.source} "
                     "has no chat_template")
  return simple_evaluate(
      model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
      num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
      log_samples=True, bootstrap_iters=bootstrap_iters)


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _json_default(obj):
  """Judge verdicts (dataclasses) as objects; the rest as the harness does."""
  if dataclasses.is_dataclass(obj):
    return dataclasses.asdict(obj)
  return handle_non_serializable(obj)


def write_results(results: dict, out: str) -> list[str]:
  """``results.json`` and one ``samples_<task>.jsonl`` per task in ``out``."""
  results = dict(results)
  samples = results.pop("samples", {})
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, RESULTS_FILE)]
  _write(written[0], json.dumps(results, indent=2, ensure_ascii=False,
                                default=_json_default))
  for task, rows in samples.items():
    written.append(os.path.join(out, f"samples_{task}.jsonl"))
    _write(written[-1], "".join(
        json.dumps(row, ensure_ascii=False, default=_json_default) + "\n"
        for row in rows))
  return written


def run_suite(args) -> tuple[dict, dict] | None:
  """``--suite``: ``(harness results, SafeHelp report)`` (None off process 0)."""
  tasks = suite.select(args.suite)
  data = suite.parse_data(args.data, tasks)
  judge = None
  if args.judge:
    judge = judges.make_judge(args.judge)
  elif any(t.metric == "harmless" for t in tasks):
    raise ValueError(f"--suite {args.suite}: its generative tasks need "
                     "--judge PATH (a harm classifier folder) or --judge "
                     "refusal")
  judges.set_judge(judge)
  distributed.initialize(args.coordinator_address, args.num_processes,
                         args.process_id)
  manager = suite.task_manager(args.include_path)
  loaded, skipped = suite.load_tasks(tasks, manager, data, judge)
  if not loaded:
    raise ValueError(f"--suite {args.suite}: no task could be loaded")
  lm = make_model(args.model, args.batch_size, args.model_args)
  own_template = bool(lm.tokenizer.chat_template)
  gen_kwargs = ({"max_gen_toks": args.max_gen_toks} if args.max_gen_toks
                else None)
  results = suite.run(lm, tasks, loaded, manager, limit=args.limit,
                      gen_kwargs=gen_kwargs,
                      bootstrap_iters=args.bootstrap_iters)
  if jax.process_index() != 0:
    return None
  name = args.name or os.path.basename(os.path.normpath(args.model))
  chat = any(t.chat_template for t in tasks if t.name in loaded)
  alpaca = (os.path.join(args.out, report.ALPACA_FILE)
            if report.ALPACA_TASK in results["results"] else None)
  return results, report.build(
      suite.scores(results, tasks), results, name=name, model=lm.source,
      judge=judge.name if judge else None, suite=args.suite, skipped=skipped,
      chat_template=(None if not chat else "the tokenizer's" if own_template
                     else "Zephyr's (the tokenizer has none)"),
      limit=args.limit, alpaca_outputs=alpaca)


def write_suite(results: dict, safehelp: dict, out: str) -> None:
  samples = results.get("samples", {}).get(report.ALPACA_TASK)
  write_results(results, out)
  if samples is not None:
    _write(os.path.join(out, report.ALPACA_FILE), json.dumps(
        report.alpaca_outputs(samples, safehelp["name"]), indent=2,
        ensure_ascii=False))
  _write(os.path.join(out, report.REPORT_FILE),
         json.dumps(safehelp, indent=2, ensure_ascii=False))
  _write(os.path.join(out, report.TABLE_FILE), report.markdown(safehelp))
  report.plot([safehelp], os.path.join(out, report.PLOT_FILE))


def compare(dirs: list[str], out: str) -> str:
  """Reads each run's report, plots them in ``out``; returns the table."""
  reports = [report.read(d) for d in dirs]
  os.makedirs(out, exist_ok=True)
  report.plot(reports, os.path.join(out, report.PLOT_FILE))
  return report.table(reports)


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("bfpo_jax").setLevel(logging.INFO)
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    print(f"error: --out {args.out} is a file", file=sys.stderr)
    return 2
  try:
    if args.compare:
      print(compare(args.compare, args.out), end="")
      print(f"plot in {os.path.join(args.out, report.PLOT_FILE)}")
      return 0
    if not args.model:
      raise ValueError("--model is required with --tasks or --suite")
    if args.suite:
      ran = run_suite(args)
    else:
      if args.data:
        raise ValueError("--data applies to --suite tasks")
      if args.judge:
        judges.set_judge(judges.make_judge(args.judge))
      tasks = [t for t in args.tasks.split(",") if t]
      distributed.initialize(args.coordinator_address, args.num_processes,
                             args.process_id)
      task_manager = task_manager_for(tasks, args.include_path)
      lm = make_model(args.model, args.batch_size, args.model_args)
      results = run(lm, tasks, task_manager=task_manager, limit=args.limit,
                    num_fewshot=args.num_fewshot,
                    apply_chat_template=args.apply_chat_template,
                    bootstrap_iters=args.bootstrap_iters)
  except (FileNotFoundError, ValueError, distributed.DistributedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() != 0:
    return 0
  if args.suite:
    results, safehelp = ran
    write_suite(results, safehelp, args.out)
  else:
    write_results(results, args.out)
  print(make_table(results))
  if results.get("groups"):
    print(make_table(results, "groups"))
  if args.suite:
    print(report.table([safehelp]), end="")
    if safehelp["skipped"]:
      print(f"skipped {len(safehelp['skipped'])} tasks: "
            f"{', '.join(safehelp['skipped'])} (why: 'skipped' in "
            f"{os.path.join(args.out, report.REPORT_FILE)})")
  print(f"results and per-sample logs in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
