"""Model cards (``README.md``) for a run's exports, from its own records.

The Hub reads the YAML front matter (``base_model``, ``datasets``,
``license``, ``tags``, ``library_name``, ``pipeline_tag``); the body gives
the recipe as the run's config says it ran (stage, trainable set, the
effective loss settings, optimizer, batch, steps), the data it used (pairs
per source from ``data_report.json``) and its final evaluation metrics (from
the run's summary).

``base_model`` and ``license`` come from the model the run started from: a
Hub id is its own base model; a local folder whose card names a
``base_model`` (an earlier run's export, a Hub download) passes that on.
"""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

from bfpo_jax.config import describe_loss
from bfpo_jax.data.sources import SourceSpec
from bfpo_jax.hub import parse_hub_id
from bfpo_jax.trainable import DEFAULT_LORA_PATTERN, PAPER_SELECTIVE_PATTERN

CARD_FILE = "README.md"
TAGS = ("bfpo", "preference-optimization", "safety", "alignment", "jax",
        "flax")
CITATION = """@inproceedings{zhang2025bfpo,
  title={Bi-Factorial Preference Optimization: Balancing Safety-Helpfulness
         in Language Models},
  author={Zhang, Wenxuan and Torr, Philip H. S. and Elhoseiny, Mohamed and
          Bibi, Adel},
  booktitle={International Conference on Learning Representations},
  year={2025}
}"""


def _source_card(folder: str) -> ModelCardData | None:
  path = os.path.join(folder, CARD_FILE) if folder else ""
  if not os.path.isfile(path):
    return None
  try:
    return ModelCard.load(path).data
  except (OSError, ValueError):  # a card without valid metadata says nothing
    return None


def base_model_and_license(source: str, folder: str) -> tuple[str, str]:
  """``(base_model, license)`` for a run started from ``source`` (a Hub id
  or folder as named) read from ``folder`` (its local copy); "" if unknown."""
  parsed = parse_hub_id(source) if source else None
  data = _source_card(folder)
  base = parsed[0] if parsed else (data.base_model if data else None) or ""
  if isinstance(base, list):
    base = base[0] if base else ""
  return base, (data.license if data and data.license else "") or ""


def hub_datasets(config) -> list[str]:
  """Hub dataset ids among the run's sources (local files are not listed)."""
  names = []
  for field in ("sources", "buffer_sources", "eval_sources"):
    for text in config.data[field]:
      path = SourceSpec.parse(text).path
      if not os.path.exists(path) and path not in names:
        names.append(path)
  return names


def _trainable_line(config) -> str:
  t = config.trainable
  if t.mode == "full":
    return "full (every parameter)"
  pattern = t.pattern or (PAPER_SELECTIVE_PATTERN if t.mode == "selective"
                          else DEFAULT_LORA_PATTERN)
  if t.mode == "lora":
    return (f"LoRA rank {t.lora_rank}, alpha {t.lora_alpha:g} on `{pattern}`")
  return f"selective: `{pattern}`"


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|")  # a bare | would end the cell


def render(config, *, source: str, base_model: str, license_id: str,
           summary: dict | None, report: dict | None,
           library: str = "transformers") -> str:
  """The card's text.

  Args:
    config: the run's config (effective values are printed).
    source: the model the run started from as named ("" = random init).
    base_model: Hub id for the metadata ("" = none).
    license_id: license id ("" = unknown).
    summary: the run's summary (``step``, ``steps``, ``eval``), or None.
    report: the run's data report (per source: ``role``, ``pairs``,
      ``rows_skipped``), or None.
    library: ``transformers`` for the merged export, ``peft`` for adapters.
  """
  data = ModelCardData(
      base_model=base_model or None, datasets=hub_datasets(config) or None,
      license=license_id or "unknown", library_name=library,
      pipeline_tag="text-generation",
      tags=[*TAGS, config.stage] + (["lora"] if config.trainable.mode == "lora"
                                    else []))
  summary, report = summary or {}, report or {}
  o, b = config.optimizer, config.batch
  steps = (f"{summary['step']} of {summary['steps']}" if "step" in summary
           else "see the run's checkpoints")
  rows = [
      ("stage", config.stage),
      ("loss", describe_loss(config)),
      ("started from", source or f"random init ({config.model.preset})"),
      ("trainable", _trainable_line(config)),
      ("optimizer", f"{o.name}, lr {o.learning_rate:g}, {o.schedule} schedule, "
                    f"warmup {o.warmup_ratio:g}, weight decay "
                    f"{o.weight_decay:g}, clip {o.clip_norm:g}"),
      ("batch", f"{b.global_size} per step = {b.per_device} per device x "
                f"{b.accumulation} microbatches"),
      ("steps", steps),
      ("precision", f"compute {config.model.dtype}, frozen weights "
                    f"{config.model.param_dtype}"),
      ("seed", str(config.seed)),
  ]
  lines = [f"# BFPO-JAX {config.stage} model", "",
           "Fine-tuned with [bfpo-jax](https://arxiv.org/abs/2408.15313), a "
           "JAX port of Bi-Factorial Preference Optimization (Zhang et al., "
           "ICLR 2025), which trains for helpfulness and harmlessness in one "
           "supervised stage.", "", "## Recipe", "", "| | |", "|---|---|"]
  lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
  if report:
    lines += ["", "## Data", "", "| source | role | pairs per epoch | held out "
              "| rows skipped |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(f'`{name}`')} | {v.get('role', '')} | "
              f"{v.get('pairs', '')} | "
              f"{v.get('eval', 0) if v.get('role') == 'train' else ''} | "
              f"{sum(v.get('rows_skipped', {}).values())} |"
              for name, v in report.items()]
  evaluation = summary.get("eval") or {}
  lines += ["", "## Final evaluation", ""]
  if evaluation:
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(evaluation.items())]
  else:
    lines.append("None recorded.")
  lines += ["", "## Use", ""]
  if library == "peft":
    lines += ["```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE"}")',
              'model = PeftModel.from_pretrained(base, "THIS_FOLDER")', "```"]
  else:
    lines += ["```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
              'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
              "```", "",
              "The tokenizer carries the chat template the model was trained "
              "on (`apply_chat_template`): " + (
                  "the base model's own." if config.data.template == "tokenizer"
                  else "Zephyr's, as the BFPO reference trainer uses it.")]
  lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
  return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write(folder: str, config, *, source: str, source_folder: str,
          summary: dict | None, report: dict | None,
          library: str = "transformers") -> str:
  """Writes ``folder/README.md``; returns its path.

  ``config.export_license`` wins over the license of the model the run
  started from (read from ``source_folder``'s card).
  """
  base, inherited = base_model_and_license(source, source_folder)
  path = os.path.join(folder, CARD_FILE)
  os.makedirs(folder, exist_ok=True)
  with open(path, "w") as f:
    f.write(render(config, source=source, base_model=base,
                   license_id=config.export_license or inherited,
                   summary=summary, report=report, library=library))
  return path
