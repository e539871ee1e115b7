"""SafeHelp-mini results as a Markdown table and a helpful x harmless plot."""

from __future__ import annotations

from bfpo_jax.experiments.judge import VERDICTS

LABELS = {"sft": "SFT (start of every run)", "dpo_helpful": "DPO, helpfulness only",
          "dpo_safety": "DPO, safety only", "dpo_mix": "DPO, naive mix",
          "ipo_mix": "IPO, naive mix", "bfpo": "BFPO, naive mix"}


def _cell(entry, key):
  std = entry.get(f"{key}_std")
  return f"{entry[key]:.2f}" + ("" if std is None else f" ± {std:.2f}")


def table(results: dict) -> str:
  """Markdown table: rates as mean ± sample std over seeds."""
  n = len(results["settings"]["seeds"])
  lines = ["| model | harmless rate | helpful rate | mean | harmful requests "
           "answered | answer log-odds, benign / harmful |",
           "|---|---|---|---|---|---|"]
  rows = [("sft", results["sft"])] + list(results["models"].items())
  for name, entry in rows:
    lines.append(
        f"| {LABELS[name]} | {_cell(entry, 'harmless_rate')} | "
        f"{_cell(entry, 'helpful_rate')} | {_cell(entry, 'mean')} | "
        f"{_cell(entry, 'harmful_answer_rate')} | "
        f"{entry['log_odds_answer_benign']:+.1f} / "
        f"{entry['log_odds_answer_harmful']:+.1f} |")
  lines.append("")
  lines.append(f"Preference models: mean ± sample std over {n} seed(s). "
               "Harmless rate: share of held-out harmful requests refused; "
               "helpful rate: share of held-out benign requests answered; "
               "harmful requests answered: share given steps naming the "
               "harmful topic (the rest of the unrefused are off-topic or "
               "broken); log-odds: log P(answer) - log P(refusal), mean over "
               "held-out topics.")
  return "\n".join(lines)


def verdict_table(results: dict) -> str:
  """Markdown table of the judge's verdicts, summed over seeds."""
  head = " | ".join(f"{kind} {v}" for kind in ("benign", "harmful")
                    for v in VERDICTS)
  lines = [f"| model | {head} |", "|---" * (1 + 2 * len(VERDICTS)) + "|"]
  rows = [("sft", [results["sft"]])] + [
      (name, entry["per_seed"]) for name, entry in results["models"].items()]
  for name, runs in rows:
    counts = [sum(r[f"verdicts_{kind}"][v] for r in runs)
              for kind in ("benign", "harmful") for v in VERDICTS]
    lines.append(f"| {LABELS[name]} | " + " | ".join(map(str, counts)) + " |")
  return "\n".join(lines)


def write_markdown(results: dict, path: str):
  parts = ["# SafeHelp-mini results", "", table(results), "",
           "## Verdicts on the held-out requests (all seeds)", "",
           verdict_table(results), "",
           "## Sample generations (greedy, held-out requests, first seed)", ""]
  rows = [("sft", results["sft"])] + list(results["models"].items())
  for name, entry in rows:
    parts.append(f"**{LABELS[name]}**")
    parts.append("")
    for s in entry["samples"]:
      response = s["response"].replace("|", "\\|") or "(empty)"
      parts.append(f"- *{s['request']}* -> {response} `[{s['verdict']}]`")
    parts.append("")
  with open(path, "w") as f:
    f.write("\n".join(parts))


def plot(results: dict, path: str):
  """Every model in the helpful x harmless plane: seeds as dots, the mean
  as a labelled marker; the SFT start as a cross."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8.5, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  sft = results["sft"]
  ax.scatter([sft["helpful_rate"]], [sft["harmless_rate"]], marker="x",
             color="black", s=60, label=LABELS["sft"])
  for color, (name, entry) in zip(colors, results["models"].items()):
    seeds = entry["per_seed"]
    ax.scatter([r["helpful_rate"] for r in seeds],
               [r["harmless_rate"] for r in seeds], color=color, alpha=0.35,
               s=18)
    ax.errorbar(entry["helpful_rate"], entry["harmless_rate"],
                xerr=entry["helpful_rate_std"], yerr=entry["harmless_rate_std"],
                fmt="o", color=color, markersize=8, capsize=3,
                label=LABELS[name])
  ax.axhline(0.5, color="grey", lw=0.5)
  ax.axvline(0.5, color="grey", lw=0.5)
  finish_plane(fig, ax, path, "SafeHelp-mini: helpful and harmless?",
               "helpful rate (held-out benign requests answered)",
               "harmless rate (held-out harmful requests refused)")


def finish_plane(fig, ax, path, title, xlabel, ylabel):
  """The helpful x harmless plane's limits, labels, quadrant names and
  legend; saves ``fig`` to ``path`` (SafeHelp-mini's and -real's plots)."""
  import matplotlib.pyplot as plt

  ax.set_xlim(-0.05, 1.05)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  for x, y, text in ((0.98, 0.98, "helpful and harmless"),
                     (0.98, 0.02, "helpful, harmful"),
                     (0.02, 0.98, "harmless, unhelpful")):
    ax.text(x, y, text, transform=ax.transAxes, color="grey", fontsize=8,
            ha="right" if x > 0.5 else "left", va="top" if y > 0.5 else "bottom")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
