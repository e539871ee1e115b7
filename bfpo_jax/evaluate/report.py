"""SafeHelp reports: ``safehelp.json``/``.md``/``.png``, AlpacaEval's
``model_outputs.json``, and one table and plot comparing several runs."""

from __future__ import annotations

import datetime
import json
import os

from bfpo_jax.evaluate.suite import CELLS

REPORT_FILE = "safehelp.json"
TABLE_FILE = "safehelp.md"
PLOT_FILE = "safehelp.png"
ALPACA_FILE = "model_outputs.json"
ALPACA_TASK = "alpaca_eval"
# The paper's table columns, in its order.
COLUMNS = (("helpfulness/generative", "Helpfulness Gen."),
           ("helpfulness/discriminative", "Helpfulness Disc."),
           ("harmlessness/discriminative", "Harmlessness Disc."),
           ("harmlessness/generative", "Harmlessness Gen."))
ALPACA_NOTE = ("not scored here: AlpacaEval judges with an LLM. Run "
               "`alpaca_eval --model_outputs {path}` on the exported answers")


def build(scored: dict, results: dict, *, name: str, model: str, judge: str,
          suite: str, skipped: dict, chat_template: str | None,
          limit=None, alpaca_outputs: str | None = None) -> dict:
  """The contents of ``safehelp.json``."""
  report = {
      "suite": suite, "name": name, "model": model, "judge": judge,
      "chat_template": chat_template,
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "limit": limit,
      "tasks": scored["tasks"], "aggregates": scored["aggregates"],
      "cell_tasks": scored["cell_tasks"],
      "task_details": scored["task_details"],
      "task_versions": {t: results["versions"][t] for t in scored["tasks"]
                        if t in results.get("versions", {})},
      "skipped": skipped,
      "alpaca_eval": (ALPACA_NOTE.format(path=alpaca_outputs)
                      if alpaca_outputs else None),
  }
  return report


def alpaca_outputs(samples: list[dict], generator: str) -> list[dict]:
  """AlpacaEval's ``model_outputs.json`` rows from the alpaca_eval samples."""
  rows = []
  for sample in sorted(samples, key=lambda s: s["doc_id"]):
    doc = sample["doc"]
    rows.append({"instruction": doc["instruction"],
                 "output": sample["filtered_resps"][0],
                 "generator": generator, "dataset": doc.get("dataset")})
  return rows


def _fmt(value) -> str:
  return "–" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
  """The paper's table layout, one row for this model, then each task."""
  head = "| Model | " + " | ".join(c[1] for c in COLUMNS) + " |"
  lines = [f"# SafeHelp: {report['name']}", "",
           head, "|---" * (len(COLUMNS) + 1) + "|",
           f"| {report['name']} | "
           + " | ".join(_fmt(report["aggregates"][c[0]]) for c in COLUMNS)
           + " |", "",
           f"Model `{report['model']}`, judge `{report['judge']}`, "
           f"{report['date']}"
           + (f", limit {report['limit']} per task" if report["limit"] else "")
           + ". Higher is better everywhere; a cell averages its tasks' "
           "scores, lower-is-better metrics counted as 1 - score.", "",
           "| Task | Cell | Metric | Score | Version |", "|---|---|---|---|---|"]
  for task, score in report["tasks"].items():
    detail = report["task_details"][task]
    shown = ("not run" if detail["samples"] is None
             else "not scored here" if detail["metric"] is None
             else _fmt(score))
    lines.append(f"| {task} | {detail['cell']} | {detail['metric'] or ''} | "
                 f"{shown} | {report['task_versions'].get(task, '')} |")
  if report["skipped"]:
    lines += ["", "Skipped:", ""]
    lines += [f"- {t}: {why}" for t, why in report["skipped"].items()]
  if report["alpaca_eval"]:
    lines += ["", f"Helpfulness Gen. (AlpacaEval): {report['alpaca_eval']}."]
  return "\n".join(lines) + "\n"


def table(reports: list[dict]) -> str:
  """One markdown table of several runs' aggregates."""
  lines = ["| Model | " + " | ".join(c[1] for c in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  for r in reports:
    lines.append(f"| {r['name']} | "
                 + " | ".join(_fmt(r["aggregates"][c[0]]) for c in COLUMNS)
                 + " |")
  return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: str) -> None:
  """Grouped bars: one group per 2x2 cell, one bar per run (none when a cell
  was not run)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  width = 0.8 / len(reports)
  fig, ax = plt.subplots(figsize=(2 + 2 * len(COLUMNS), 4))
  for i, r in enumerate(reports):
    xs = [j + (i - (len(reports) - 1) / 2) * width
          for j in range(len(COLUMNS))]
    values = [r["aggregates"][c[0]] for c in COLUMNS]
    bars = ax.bar([x for x, v in zip(xs, values) if v is not None],
                  [v for v in values if v is not None], width,
                  label=r["name"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    for x, v in zip(xs, values):
      if v is None:
        ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(COLUMNS)), [c[1] for c in COLUMNS])
  ax.set_ylim(0, 1)
  ax.set_ylabel("score (higher is better)")
  ax.set_title("SafeHelp")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def read(directory: str) -> dict:
  """A run's ``safehelp.json``; ValueError (one line) when it is not one."""
  path = os.path.join(directory, REPORT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--compare {directory}: no {REPORT_FILE} (run "
                            "--suite safehelp with --out there first)")
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    missing = set(CELLS) - set(report["aggregates"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"--compare {path}: not a SafeHelp report ({e})") from None
  if missing:
    raise ValueError(f"--compare {path}: aggregates lack {sorted(missing)}")
  return report
