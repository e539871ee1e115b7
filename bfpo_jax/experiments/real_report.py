"""SafeHelp-real results as Markdown tables and a helpful x harmless plot."""

from __future__ import annotations

import json

from bfpo_jax.experiments import refusal, report

LABELS = {"start": "SmolLM2-135M-Instruct (start)",
          "dpo_helpful": "DPO, helpfulness", "dpo_safety": "DPO, safety",
          "dpo_mix": "DPO, naive mix", "ipo_mix": "IPO, naive mix",
          "bfpo": "BFPO", "sacpo": "SACPO (DPO helpful, then safety)",
          "p_sacpo": "P-SACPO (merge, W 0.5)"}
KINDS = {"harmful_eval": "harmful (AdvBench + Do-Not-Answer)",
         "harmbench_eval": "harmful (HarmBench, never trained on)",
         "benign_eval": "benign", "xstest_eval": "over-refusal (XSTest-style)"}


def _rows(results):
  return [("start", results["start"])] + list(results["models"].items())


def table(results: dict) -> str:
  lines = ["| model | harmless | harmless (HarmBench) | helpful | "
           "over-refusal | benign drift |", "|---|---|---|---|---|---|"]
  for name, e in _rows(results):
    lines.append(
        f"| {LABELS.get(name, name)} | {e['harmless_rate']:.2f} | "
        f"{e['harmless_rate_harmbench']:.2f} | {e['helpful_rate']:.2f} | "
        f"{e['over_refusal_rate']:.2f} | {e['benign_drift']:+.2f} |")
  n = results["data"]["prompts"]
  lines += ["", f"Harmless: share of the {n['harmful_eval']} held-out "
            f"AdvBench + Do-Not-Answer prompts (and {n['harmbench_eval']} "
            "HarmBench ones) not complied with; helpful: share of the "
            f"{n['benign_eval']} held-out benign prompts complied with; "
            f"over-refusal: share of the {n['xstest_eval']} XSTest-style "
            "benign prompts refused; benign drift: mean log-prob per token "
            "of the model's benign answers under the start model (the start's "
            "own answers score the first row)."]
  return "\n".join(lines)


def verdict_table(results: dict) -> str:
  head = " | ".join(f"{k.split('_')[0]} {v}" for k in KINDS
                    for v in refusal.VERDICTS)
  lines = [f"| model | {head} |",
           "|---" * (1 + len(KINDS) * len(refusal.VERDICTS)) + "|"]
  for name, e in _rows(results):
    counts = [e["verdicts"][k].get(v, 0) for k in KINDS
              for v in refusal.VERDICTS]
    lines.append(f"| {LABELS.get(name, name)} | "
                 + " | ".join(map(str, counts)) + " |")
  return "\n".join(lines)


def margins_table(results: dict) -> str:
  """Margins (beta x log-ratio difference) by safety group at the last
  training step, against each group's BFPO target."""
  groups = ("safe_safe", "unsafe_safe")
  lines = ["| model | step | " + " | ".join(
      f"margin {g}" for g in groups) + " | helpfulness-batch margin | loss |",
           "|---|---|---|---|---|---|"]
  for name, e in results["models"].items():
    last = (e.get("training") or {}).get("last", {})
    cells = [f"{last.get(f'rewards/margins/{g}', float('nan')):+.3f}"
             for g in groups]
    buffer = last.get("buffer/rewards/margins/safe_safe")
    lines.append(f"| {LABELS.get(name, name)} | {last.get('step')} | "
                 + " | ".join(cells) + " | "
                 + ("-" if buffer is None else f"{buffer:+.3f}")
                 + f" | {last.get('loss', float('nan')):.4g} |")
  return "\n".join(lines)


def write_markdown(results: dict, path: str) -> None:
  judge = results["judge"]
  parts = ["# SafeHelp-real results", "", table(results), "",
           f"Judge (refusal / compliance rules) on the held-out half of "
           f"pyrit's human-labelled responses: accuracy {judge['accuracy']:.3f}"
           f", precision {judge['precision']:.3f}, recall "
           f"{judge['recall']:.3f} (n = {judge['n']}).", "",
           "## Verdicts on the held-out prompts", "", verdict_table(results),
           "", "## Training: last-step margins by safety group", "",
           margins_table(results), "", "## Data", "",
           "```json", json.dumps(results["data"], indent=2),
           "```", "", "## Sample generations (greedy)", ""]
  for name, e in _rows(results):
    parts += [f"**{LABELS.get(name, name)}**", ""]
    for kind, samples in e["samples"].items():
      for s in samples:
        response = s["response"].replace("|", "\\|").replace("\n", " ")
        parts.append(f"- ({kind}) *{s['prompt']}* -> {response or '(empty)'} "
                     f"`[{s['verdict']}]`")
    parts.append("")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))


def plot(results: dict, path: str) -> None:
  """Every model in the helpful x harmless plane, like the paper's Figure 1."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8.5, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  start = results["start"]
  ax.scatter([start["helpful_rate"]], [start["harmless_rate"]], marker="x",
             color="black", s=70, label=LABELS["start"])
  for color, (name, e) in zip(colors, results["models"].items()):
    ax.scatter([e["helpful_rate"]], [e["harmless_rate"]], color=color, s=60,
               label=LABELS.get(name, name))
    ax.scatter([e["helpful_rate"]], [e["harmless_rate_harmbench"]],
               color=color, s=40, marker="^", alpha=0.5)
  report.finish_plane(
      fig, ax, path,
      "SafeHelp-real: SmolLM2-135M-Instruct (triangles: HarmBench)",
      "helpful rate (held-out benign prompts answered)",
      "harmless rate (held-out harmful prompts not complied with)")
