"""Where a step's time goes: a jax.profiler trace, summarised by model part.

    python benchmarks/profiling.py runs/profile        # summarise a trace
    python benchmarks/step_throughput.py --profile runs/profile   # make one
    python benchmarks/mfu.py --config configs/a100x4.py --profile runs/profile

:func:`compile_and_dump` compiles a jitted step ahead of time and writes its
optimised HLO next to the trace; :func:`summarize` then reads the trace
(``*.trace.json.gz``), takes the self time of every XLA op of that module
(time not spent in ops nested inside it: a ``while`` or ``cond`` counts only
its own bookkeeping), and files each op under

* a phase: policy forward, backward, remat recompute, reference forward,
  optimizer, other (loss glue, gradient norm, the NaN guard);
* a component, from the named scopes the model and step put on their ops:
  attention (with its norm), mlp (with its norm), embed, logps (unembedding
  and log-softmax), other.

On a GPU only device (kernel) events count; on a CPU, the XLA worker threads'.
Shares are of the summed op time, which on a multi-threaded CPU can exceed
the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

HLO_FILE = "hlo.txt"
COMPONENTS = ("attention", "mlp", "embed", "logps")
_COMPONENT = re.compile(r"\b(" + "|".join(COMPONENTS) + r")\b")
_OP = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?'
                 r'op_name="([^"]*)"')


def compile_and_dump(jitted, args, out_dir):
  """``jitted.lower(*args).compile()``; its HLO goes to ``out_dir/hlo.txt``."""
  compiled = jitted.lower(*args).compile()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, HLO_FILE), "w") as f:
    f.write(compiled.as_text())
  return compiled


def op_names(hlo_text):
  """``(module name, {instruction: op_name metadata})`` of an HLO dump."""
  module = re.search(r"^HloModule ([\w.\-]+)", hlo_text, re.M)
  names = {}
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return (module.group(1) if module else None), names


def classify(op_name):
  """``(phase, component)`` of an op from its ``op_name`` metadata.

  ``op_name`` reads like ``jit(train_step)/while/body/transpose(jvp(policy))/
  mlp/...``: the first segment naming a scope of the step (policy,
  reference, optimizer) or a transpose (backward) sets the phase.
  """
  path = op_name.split(";")[0].lstrip("(")
  phase = "other"
  for part in path.split("/")[1:]:  # the first scope or transform decides
    if "optimizer" in part:
      phase = "optimizer"
    elif part.startswith("transpose("):
      phase = ("remat recompute" if "rematted_computation" in path
               else "backward")
    elif "reference" in part:
      phase = "reference forward"
    elif "policy" in part:
      phase = "policy forward"
    else:
      continue
    break
  found = _COMPONENT.findall(path)
  return phase, (found[-1] if found else "other")


def self_times(events):
  """{event index: self time in us} for nested complete events of one thread."""
  order = sorted(range(len(events)),
                 key=lambda i: (events[i]["ts"], -events[i]["dur"]))
  child = collections.Counter()
  stack = []
  for i in order:
    start = events[i]["ts"]
    while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= start:
      stack.pop()
    if stack:
      child[stack[-1]] += events[i]["dur"]
    stack.append(i)
  return {i: max(events[i]["dur"] - child[i], 0.0) for i in order}


def _load_trace(trace_dir):
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                           recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    return json.load(f)["traceEvents"]


def summarize(trace_dir, steps, top=12):
  """Per-step op time by (phase, component), and the top ops, as a dict."""
  hlo_path = os.path.join(trace_dir, HLO_FILE)
  if not os.path.exists(hlo_path):
    raise FileNotFoundError(f"{hlo_path} missing: make the trace with "
                            "compile_and_dump (e.g. step_throughput.py --profile)")
  with open(hlo_path) as f:
    module, names = op_names(f.read())
  events = _load_trace(trace_dir)
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and e.get("args", {}).get("hlo_module", module) == module
         and e.get("args", {}).get("hlo_op", e["name"]) in names]
  on_device = [e for e in ops
               if processes.get(e["pid"], "").startswith("/device:")]
  ops = on_device or ops
  by_thread = collections.defaultdict(list)
  for e in ops:
    by_thread[(e["pid"], e["tid"])].append(e)
  parts, per_op = collections.Counter(), collections.Counter()
  for thread_events in by_thread.values():
    for i, us in self_times(thread_events).items():
      op = thread_events[i].get("args", {}).get("hlo_op", thread_events[i]["name"])
      parts[classify(names[op])] += us
      per_op[op] += us
  total = sum(parts.values()) or 1.0
  ms = lambda us: us / 1e3 / steps  # noqa: E731
  return {
      "module": module, "steps": steps, "device_events": bool(on_device),
      "op_ms_per_step": ms(total),
      "parts": [{"phase": p, "component": c, "ms_per_step": ms(us),
                 "share": us / total}
                for (p, c), us in parts.most_common()],
      "top_ops": [{"op": op, "op_name": names[op], "ms_per_step": ms(us),
                   "share": us / total} for op, us in per_op.most_common(top)],
  }


def format_summary(summary):
  lines = [f"{summary['module']}: {summary['op_ms_per_step']:.1f} ms of op time "
           f"per step ({'device' if summary['device_events'] else 'CPU threads'})",
           f"{'phase':<18} {'component':<10} {'ms/step':>9} {'share':>7}"]
  for row in summary["parts"]:
    lines.append(f"{row['phase']:<18} {row['component']:<10} "
                 f"{row['ms_per_step']:9.1f} {row['share']:7.1%}")
  lines.append("top ops:")
  for row in summary["top_ops"]:
    lines.append(f"  {row['ms_per_step']:9.1f} ms {row['share']:6.1%}  "
                 f"{row['op']}  {row['op_name'][-90:]}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, default=0,
                      help="steps in the trace (default: from steps.json)")
  parser.add_argument("--json", help="write the summary here too")
  args = parser.parse_args(argv)
  steps = args.steps
  if not steps:
    with open(os.path.join(args.trace_dir, "steps.json")) as f:
      steps = json.load(f)["steps"]
  try:
    summary = summarize(args.trace_dir, steps)
  except FileNotFoundError as e:
    sys.exit(f"error: {e}")
  print(format_summary(summary))
  if args.json:
    write_json(summary, args.json)


def write_json(result, path):
  """Writes ``result`` to ``path`` (folders created) as indented JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def trace(step, state, batch, out_dir, steps=3):
  """Runs ``steps`` more steps under jax.profiler into ``out_dir``.

  Records the step count in ``out_dir/steps.json``, prints the summary and
  returns the last ``(state, metrics)``. Run it after the timed steps:
  tracing slows the traced ones down.
  """
  import jax

  jax.profiler.start_trace(out_dir)
  try:
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
  finally:
    jax.profiler.stop_trace()
  write_json({"steps": steps}, os.path.join(out_dir, "steps.json"))
  summary = summarize(out_dir, steps)
  write_json(summary, os.path.join(out_dir, "summary.json"))
  print(format_summary(summary), file=sys.stderr)
  return state, metrics


if __name__ == "__main__":
  main()
