"""Check data before a long run: read, validate, tokenize, report, dump.

    REV=ff7ba91063016c78a225b0f74e1c0860bb18230f
    python -m bfpo_jax.data \\
        --source "pku_saferlhf:PKU-Alignment/PKU-SafeRLHF?revision=$REV&take=0.2" \\
        --source ultrafeedback:data/uf.jsonl --tokenizer mistral --report r.json

Prints a table per source (rows in the split, read, kept, used, skipped by
reason, token lengths) and writes it as JSON. ``--dump OUT.jsonl`` writes
every example as the model sees it, after tokenization and truncation and
before padding (see :func:`bfpo_jax.data.tokenize.dump_record`): preference
``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (response
tokens only), ``chosen_labels_mask``, ``rejected_labels_mask``,
``chosen_is_safe``, ``rejected_is_safe``; SFT ``input_ids`` and
``loss_mask``. A source that cannot be read stops with one line naming it and
exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bfpo_jax.data.sources import FILTER_NOTE, KINDS, DataError, SourceSpec
from bfpo_jax.data.tokenize import SFT_LOSSES, TEMPLATES, TRUNCATIONS, dump_record
from bfpo_jax.hub import HubError


def format_report(report) -> str:
  lines = [f"{'source':44s} {'split':>7s} {'read':>7s} {'kept':>7s} "
           f"{'used':>7s}  skipped"]
  for name, r in report.items():
    skipped = ", ".join(f"{k}={v}" for k, v in r["rows_skipped"].items()) or "-"
    lines.append(f"{name[:44]:44s} {r['rows_total']:7d} {r['rows_read']:7d} "
                 f"{r['rows_kept']:7d} {r['rows_used']:7d}  {skipped}")
    if "pairs" in r:
      lines.append(f"    {r['pairs']} {r.get('role', 'train')} examples per "
                   "epoch")
    for part, stats in r["token_lengths"].items():
      if stats:
        lines.append(f"    {part:9s} tokens: min {stats['min']}, mean "
                     f"{stats['mean']}, p95 {stats['p95']}, max {stats['max']}")
  lines.append(f"split: rows before take; {FILTER_NOTE}")
  return "\n".join(lines)


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", action="append", required=True,
                      help=f"KIND:PATH_OR_HUB_NAME[?revision=R&split=S&take=T"
                      f"&chosen=better|safer], "
                      f"KIND in {', '.join(KINDS)}")
  parser.add_argument("--tokenizer", default="mistral",
                      help="model/tokenizer folder, Hub id (owner/name[@rev]) "
                      "or 'mistral' (bundled)")
  parser.add_argument("--report", help="write the report here as JSON")
  parser.add_argument("--dump", help="write every tokenized example here "
                      "(JSON lines)")
  parser.add_argument("--task", choices=["preference", "sft"], default=None,
                      help="default: each kind's own (sft for ultrachat)")
  parser.add_argument("--split", default=None)
  parser.add_argument("--revision", default=None)
  parser.add_argument("--limit", type=int, default=None)
  parser.add_argument("--max_prompt_length", type=int, default=512)
  parser.add_argument("--max_length", type=int, default=1024)
  parser.add_argument("--template", choices=TEMPLATES, default="reference")
  parser.add_argument("--truncation", choices=TRUNCATIONS, default="trl")
  parser.add_argument("--sft_loss", choices=SFT_LOSSES, default="all")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_workers", type=int, default=0)
  args = parser.parse_args(argv)

  from bfpo_jax.data.pipeline import prepare
  from bfpo_jax.tokenizer import load_tokenizer

  try:
    specs = [SourceSpec.parse(s, task=args.task, split=args.split,
                              revision=args.revision, limit=args.limit)
             for s in args.source]
    tokenizer = load_tokenizer(args.tokenizer)
    report, dumped = {}, []
    for task in ("preference", "sft"):
      task_specs = [s for s in specs if s.task == task]
      if not task_specs:
        continue
      examples, part = prepare(
          task_specs, tokenizer, task=task,
          max_prompt_length=args.max_prompt_length,
          max_length=args.max_length, seed=args.seed,
          num_workers=args.num_workers, template=args.template,
          truncation=args.truncation, sft_loss=args.sft_loss)
      report.update(part)
      dumped += [dump_record(e, task) for source in examples for e in source]
  except (DataError, FileNotFoundError, HubError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  if args.report:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.report}")
  if args.dump:
    _write_jsonl(args.dump, dumped)
    print(f"wrote {len(dumped)} examples to {args.dump}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
