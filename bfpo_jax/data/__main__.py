"""Check data before a long run: read, validate, tokenize, report.

    python -m bfpo_jax.data --source pku_saferlhf:PKU-Alignment/PKU-SafeRLHF \
        --source ultrafeedback:data/uf.jsonl --tokenizer mistral --report r.json

Prints a table per source (rows read, kept, used, skipped by reason, token
lengths) and writes it as JSON. A source that cannot be read stops with one
line naming it and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bfpo_jax.data.sources import KINDS, DataError, SourceSpec


def format_report(report) -> str:
  lines = [f"{'source':44s} {'read':>7s} {'kept':>7s} {'used':>7s}  skipped"]
  for name, r in report.items():
    skipped = ", ".join(f"{k}={v}" for k, v in r["rows_skipped"].items()) or "-"
    lines.append(f"{name[:44]:44s} {r['rows_read']:7d} {r['rows_kept']:7d} "
                 f"{r['rows_used']:7d}  {skipped}")
    for part, stats in r["token_lengths"].items():
      if stats:
        lines.append(f"    {part:9s} tokens: min {stats['min']}, mean "
                     f"{stats['mean']}, p95 {stats['p95']}, max {stats['max']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", action="append", required=True,
                      help=f"KIND:PATH_OR_HUB_NAME, KIND in {', '.join(KINDS)}")
  parser.add_argument("--tokenizer", default="mistral",
                      help="model/tokenizer folder, or 'mistral' (bundled)")
  parser.add_argument("--report", help="write the report here as JSON")
  parser.add_argument("--task", choices=["preference", "sft"], default=None,
                      help="default: each kind's own (sft for ultrachat)")
  parser.add_argument("--split", default=None)
  parser.add_argument("--revision", default=None)
  parser.add_argument("--limit", type=int, default=None)
  parser.add_argument("--max_prompt_length", type=int, default=512)
  parser.add_argument("--max_length", type=int, default=1024)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_workers", type=int, default=0)
  args = parser.parse_args(argv)

  from bfpo_jax.data.pipeline import prepare
  from bfpo_jax.model.tokenizer import load_tokenizer

  try:
    specs = [SourceSpec.parse(s, task=args.task, split=args.split,
                              revision=args.revision, limit=args.limit)
             for s in args.source]
    tasks = {s.task for s in specs}
    tokenizer = load_tokenizer(args.tokenizer)
    report = {}
    for task in sorted(tasks):
      _, part = prepare([s for s in specs if s.task == task], tokenizer,
                        task=task, max_prompt_length=args.max_prompt_length,
                        max_length=args.max_length, seed=args.seed,
                        num_workers=args.num_workers)
      report.update(part)
  except (DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_report(report))
  if args.report:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.report}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
