"""The GPU check (issue 28): every figure in one call, each part in its own
process and time limit, all written to ``OUT_DIR/gpu_suite.json``.

    bash benchmarks/gpu_suite.sh OUT_DIR            # installs .whl/, runs this
    bash benchmarks/gpu_suite.sh --dry-run OUT_DIR  # CPU, tiny shapes

Parts, in the order they run (``group.name`` in the JSON):

* ``environment``: every module imports with the JAX found (gpu_checks env);
* ``plan``: the card, its memory and bf16 peak, a measured matmul rate, and
  how many Mistral-7B layers of each planned step fit its memory by the
  project's estimate (gpu_checks plan);
* ``correctness.logits``, ``correctness.dtype_losses``: the Flax logits
  against transformers on this device; bf16 against float32 losses of the
  tiny config's first 10 steps (gpu_checks logits / dtype);
* ``packing``: packed against padded pairs/s (benchmarks/packing.py);
* ``mfu.dots``: the 7B-shaped BFPO step (random weights, bf16, selective
  ``down_proj``, reference forward, packed pairs of the paper's length mix),
  ``remat_policy=dots``, traced for ``profile`` (benchmarks/mfu.py);
* ``profile``: that trace by phase and op (benchmarks/profiling.py);
* ``attention.cudnn_packed``: the packed step compiled (one layer) with
  ``attention_impl=cudnn``: how many cuDNN attention calls it makes (packed
  rows carry segment ids, for which the model runs XLA's attention);
* ``attention.cudnn_padded``: the same pairs padded, with cuDNN's fused
  attention (which applies to right-padded rows);
* ``mfu.full``: ``mfu.dots`` with ``remat_policy=full``;
* ``attention.xla_padded``: the padded pairs with XLA's attention (XLA on
  packed rows is ``mfu.dots``).

Each part records ``status`` (ok, error, timeout, skipped), ``seconds``,
``limit_s``, its ``command``, and ``figures`` and/or ``error`` (a failing
part is a figure: its error). The JSON is rewritten after every part.

Time: the parts share a budget (``--budget_s``: 470 s on the device, so the
call ends within 8 minutes; 300 s dry, a ceiling a dry run on an idle
2-core CPU stays well under). A part gets its own limit, or what is left;
the 7B-shaped runs share what the other parts leave, in proportion to their
limits (:func:`parts`). They take the most layers that fit (``plan``,
capped by ``--max_layers``); once one has run, a later one that would not
finish in its limit at the seconds per layer seen so far gets fewer layers
(``layers_rule`` says which rule set them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOG_TAIL = 200_000  # characters of each part's output kept in the log
MIN_LIMIT_S = 5.0  # a part given less (its own limit permitting) is skipped
_RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b.*")

MODEL = {  # mfu.py arguments of the 7B-shaped step; dry: the tiny one
    False: ["--config", "configs/a100x4.py", "--preset", "mistral_7b",
            "--pairs_per_device", "16", "--warmup", "1", "--reps", "3"],
    True: ["--config", "configs/tiny.py", "--preset", "tiny",
           "--pairs_per_device", "2", "--seq_len", "64", "--warmup", "1",
           "--reps", "1"]}
RUNS = {  # name: (JSON group, mfu.py arguments)
    "dots": ("mfu", ["--layout", "packed", "--remat_policy", "dots",
                     "--attention_impl", "xla"]),
    "xla_padded": ("attention", ["--layout", "padded", "--remat_policy",
                                 "dots", "--attention_impl", "xla"]),
    "cudnn_padded": ("attention", ["--layout", "padded", "--remat_policy",
                                   "dots", "--attention_impl", "cudnn"]),
    "full": ("mfu", ["--layout", "packed", "--remat_policy", "full",
                     "--attention_impl", "xla"])}
PACKING = {False: ["--steps", "4", "--pairs", "16"],  # few shapes to compile
           True: ["--steps", "1", "--pairs", "1", "--hidden_size", "32",
                  "--intermediate_size", "64", "--num_hidden_layers", "1",
                  "--num_attention_heads", "4", "--num_key_value_heads", "2",
                  "--vocab_size", "512"]}


@dataclasses.dataclass
class Part:
  group: str
  name: str | None  # None: the part is the group
  argv: list  # after the Python interpreter
  limit_s: float  # on the device; the CPU of a dry run has its own below
  figures: str | None = None  # the JSON file the child writes
  layered: bool = False  # a 7B-shaped mfu.py run: --layers set here
  env: dict = dataclasses.field(default_factory=dict)

  @property
  def key(self):
    return self.group if self.name is None else f"{self.group}.{self.name}"


def parts(dry, work, smollm2=None):
  """The suite's parts, in order (see the module docstring).

  Limits, in seconds, ``(device, dry run)``. The 7B-shaped runs come last
  and share what the budget leaves, in proportion to their limits, so that
  each gets figures, with fewer layers if need be; the XLA-on-padded-rows
  run is the last, the one to lose first.
  """
  out = lambda name: os.path.join(work, f"{name}.json")  # noqa: E731
  checks = os.path.join(HERE, "gpu_checks.py")
  mfu = [os.path.join(HERE, "mfu.py")] + MODEL[dry]
  shared_gpu = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # torch, or small
  runs = {n: mfu[1:] + a for n, (_, a) in RUNS.items()}
  with open(out("plan_runs"), "w") as f:
    json.dump(runs, f)
  plan = [checks, "plan", "--json", out("plan"), "--runs", out("plan_runs")]
  if dry:
    plan += ["--device_memory_gib", "1", "--matmul_n", "256"]
  logits = [checks, "logits", "--json", out("logits")]
  if smollm2:
    logits += ["--smollm2", smollm2]
  limit = lambda device, dry_run: dry_run if dry else device  # noqa: E731
  mfu_part = lambda name, seconds, extra=(): Part(  # noqa: E731
      RUNS[name][0], name, mfu + RUNS[name][1] + ["--json", out(name)]
      + list(extra), limit(*seconds), out(name), layered=True)
  return [
      Part("environment", None, [checks, "env", "--json", out("env")],
           limit(40, 30), out("env"), env=shared_gpu),
      # As the 7B-shaped runs, so the memory it reads is theirs.
      Part("plan", None, plan, limit(40, 20), out("plan")),
      Part("correctness", "logits", logits, limit(45, 40), out("logits"),
           env=shared_gpu),
      Part("correctness", "dtype_losses",
           [checks, "dtype", "--json", out("dtype"), "--steps",
            "2" if dry else "10"], limit(75, 60), out("dtype"), env=shared_gpu),
      Part("packing", None, [os.path.join(HERE, "packing.py"), "--json",
                             out("packing")] + PACKING[dry], limit(90, 60),
           out("packing")),
      mfu_part("dots", (200, 30), ["--profile", os.path.join(work, "profile")]),
      Part("profile", None, [os.path.join(HERE, "profiling.py"),
                             os.path.join(work, "profile"), "--json",
                             out("profile")], limit(20, 10), out("profile")),
      Part("attention", "cudnn_packed",
           mfu + ["--layout", "packed", "--remat_policy", "dots",
                  "--attention_impl", "cudnn", "--compile_only", "--layers",
                  "1", "--json", out("cudnn_packed")], limit(30, 20),
           out("cudnn_packed")),
      mfu_part("cudnn_padded", (100, 20)),
      mfu_part("full", (100, 25)),
      mfu_part("xla_padded", (100, 25)),
  ]


class Layers:
  """Layer counts of the 7B-shaped runs: memory first, then time."""

  def __init__(self, fit, cap):
    self.fit = fit if not cap or (fit and fit < cap) else cap
    self.rule = (f"memory: {fit} layers fit (plan)" if fit == self.fit else
                 f"--max_layers {cap} (plan: {fit} fit)")
    self.s_per_layer = 0.0

  def choose(self, limit_s):
    if self.fit is None:
      return None, "plan failed: the preset's layer count"
    if self.s_per_layer:
      by_time = int(0.8 * limit_s / self.s_per_layer)
      if by_time < self.fit:
        return max(1, by_time), (
            f"time: {by_time} layers in {limit_s:.0f} s at "
            f"{self.s_per_layer:.1f} s per layer seen (memory: {self.fit})")
    return self.fit, self.rule

  def observe(self, layers, seconds):
    if layers:
      self.s_per_layer = max(self.s_per_layer, seconds / layers)


def run_child(argv, limit_s, env, log_path):
  """``(returncode or None on timeout, seconds, output tail)``; the child
  and everything it started are ended at the limit (its own process group)."""
  tick = time.monotonic()
  with open(log_path, "w") as out:
    proc = subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      rc = None
      for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
          os.killpg(proc.pid, sig)
          proc.wait(timeout=wait)
          break
        except (subprocess.TimeoutExpired, ProcessLookupError):
          continue
  with open(log_path, errors="replace") as f:
    text = f.read()
  return rc, time.monotonic() - tick, text[-LOG_TAIL:]


def _error_of(text, lines=25):
  """The last exception line of a child's output, then its last lines."""
  tail = [x for x in text.strip().splitlines() if x.strip()]
  raised = [x for x in tail if _RAISED.match(x)]
  return "\n".join(raised[-1:] + tail[-lines:])[-3000:]


class Suite:
  def __init__(self, args):
    self.args = args
    self.out_json = os.path.join(args.out, "gpu_suite.json")
    self.log = open(os.path.join(args.out, "gpu_suite.log"), "a")
    self.start = time.monotonic()
    self.deadline = self.start + args.budget_s
    self.result = {"suite": {
        "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(), "python": platform.python_version(),
        "command": " ".join(sys.argv), "budget_s": args.budget_s,
        "max_layers": args.max_layers or None,
        "parts_selected": args.parts or "all"}}
    self.result["install"] = self.install_record()

  def install_record(self):
    a = self.args
    record = {"status": a.install_status or "not run (gpu_suite.py was "
              "called without gpu_suite.sh)", "seconds": a.install_s,
              "wheels": a.install_wheels, "target": a.install_target}
    if a.install_status == "error" and a.install_log and os.path.exists(
        a.install_log):
      with open(a.install_log, errors="replace") as f:
        record["error"] = _error_of(f.read()) or a.install_status
    return record

  def say(self, line):
    print(line, flush=True)
    self.log.write(line + "\n")
    self.log.flush()

  def store(self, part, record):
    if part.name is None:
      self.result[part.group] = record
    else:
      self.result.setdefault(part.group, {})[part.name] = record
    self.result["suite"]["wall_s"] = round(time.monotonic() - self.start, 1)
    with open(self.out_json + ".tmp", "w") as f:
      json.dump(self.result, f, indent=2)
    os.replace(self.out_json + ".tmp", self.out_json)

  def selected(self, part):
    chosen = self.args.parts.split(",") if self.args.parts else None
    return chosen is None or part.key in chosen or part.group in chosen

  def run(self, todo):
    env = dict(os.environ)
    layers = None
    for i, part in enumerate(todo):
      if not self.selected(part):
        self.store(part, {"status": "skipped", "error": "not in --parts"})
        continue
      left = self.deadline - time.monotonic()
      rest = [p for p in todo[i + 1:] if self.selected(p)]
      if part.layered:  # what the other parts may need is kept for them
        left -= sum(p.limit_s for p in rest if not p.layered)
        pool = part.limit_s + sum(p.limit_s for p in rest if p.layered)
        left *= part.limit_s / pool
      limit = max(0.0, min(part.limit_s, left))
      record = {"limit_s": round(limit, 1)}
      argv = list(part.argv)
      if part.layered:
        if layers is None:
          fit = (self.result.get("plan", {}).get("figures") or {}).get("layers")
          layers = Layers(fit or None, self.args.max_layers)
        count, record["layers_rule"] = layers.choose(limit)
        if count:
          argv += ["--layers", str(count)]
        record["layers"] = count
      record["command"] = " ".join(["python"] + [os.path.relpath(a, ROOT)
                                                 if a.startswith(ROOT) else a
                                                 for a in argv])
      if limit < min(MIN_LIMIT_S, part.limit_s):
        self.store(part, {**record, "status": "skipped", "error":
                          f"out of time: {left:.0f} s of the suite's "
                          f"{self.args.budget_s:.0f} s left"})
        self.say(f"[{part.key}] skipped: out of time")
        continue
      if part.figures and os.path.exists(part.figures):
        os.remove(part.figures)
      self.say(f"[{part.key}] start, limit {limit:.0f} s: {record['command']}")
      rc, seconds, text = run_child(argv, limit, {**env, **part.env},
                                    os.path.join(self.args.work, "part.log"))
      self.log.write(f"----- {part.key} output -----\n{text}\n")
      record["seconds"] = round(seconds, 1)
      figures = None
      if part.figures and os.path.exists(part.figures):
        with open(part.figures) as f:
          figures = json.load(f)
        record["figures"] = figures
      if rc is None:
        record["status"] = "timeout"
        record["error"] = (f"timed out after {limit:.0f} s; output tail:\n"
                           + _error_of(text))
      elif (rc != 0 or (part.figures and figures is None)
            or "error" in (figures or {})):
        record["status"] = "error"
        record["error"] = (figures or {}).get("error") or (
            f"exit code {rc}: " + _error_of(text))
      else:
        record["status"] = "ok"
      if part.layered and layers is not None and (rc is None or figures):
        layers.observe(record["layers"] or (figures or {}).get("layers"),
                       seconds)
      self.store(part, record)
      self.say(f"[{part.key}] {record['status']} in {seconds:.0f} s")
    self.say(summary(self.result))


def _get(d, *path):
  for p in path:
    d = d.get(p) if isinstance(d, dict) else None
  return d


def summary(result):
  """A short table of the headline figures (the device reply's tail)."""
  lines = ["", f"{'part':<26} {'status':<8} figures"]
  gib = lambda b: f"{b / 2**30:.1f}" if b else "-"  # noqa: E731
  for group in ("environment", "plan", "correctness", "packing", "mfu",
                "attention", "profile"):
    entry = result.get(group, {})
    items = entry.items() if "status" not in entry else [(None, entry)]
    for name, part in items:
      f = part.get("figures") or {}
      if group in ("mfu", "attention") and "median_step_s" not in f:
        text = (f"compiled only ({f.get('layers')} layers, "
                f"{f.get('compile_s') or 0:.0f} s), cudnn calls "
                f"{f.get('cudnn_fmha_calls')}")
      elif group in ("mfu", "attention"):
        text = (f"layers {f.get('layers')}, {f.get('tokens_per_s') or 0:,.0f} "
                f"tok/s, {f.get('pairs_per_s') or 0:.2f} pairs/s, MFU "
                f"{f.get('mfu')}, peak {gib(_get(f, 'memory', 'peak_device_bytes'))}"
                f" / est {gib(_get(f, 'memory', 'estimate_bytes'))} GiB, "
                f"cudnn calls {f.get('cudnn_fmha_calls')}")
      elif group == "plan":
        text = (f"{f.get('device_kind')}, {gib(f.get('device_memory_bytes'))} "
                f"GiB, {f.get('layers')} layers fit, bf16 matmul "
                f"{f.get('measured_bf16_matmul_tflops') or 0:.3g} TFLOP/s")
      elif name == "dtype_losses":
        text = f"max rel diff bf16/f32 {f.get('max_rel_diff')}"
      elif name == "logits":
        text = "rel err f32 {} bf16 {}; smollm2 {}".format(
            _get(f, "random_mistral", "float32_default", "rel_err"),
            _get(f, "random_mistral", "bfloat16", "rel_err"),
            _get(f, "smollm2", "float32_default", "rel_err")
            or _get(f, "smollm2", "skipped") and "skipped")
      elif group == "packing":
        text = f"packed/padded {f.get('ratio')}"
      elif group == "profile":
        text = ", ".join(f"{p['phase']}/{p['component']} {p['share']:.0%}"
                         for p in f.get("parts", [])[:4])
      else:
        text = f"jax {_get(f, 'versions', 'jax')}, {f.get('devices')}"
      key = group if name is None else f"{group}.{name}"
      error = (part.get("error") or "").strip().splitlines()
      lines.append(f"{key:<26} {part.get('status', '?'):<8} "
                   + (text if f else (error[0] if error else "")[:100]))
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="gpu_suite.json and .log go here")
  p.add_argument("--work", required=True, help="scratch folder (traces, runs)")
  p.add_argument("--dry-run", dest="dry_run", action="store_true")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="seconds for all parts (default 470, dry 300)")
  p.add_argument("--max_layers", type=int, default=0,
                 help="at most this many layers in the 7B-shaped runs")
  p.add_argument("--parts", default="",
                 help="comma list of parts or groups to run (default all)")
  p.add_argument("--smollm2", default=os.environ.get("BFPO_SMOLLM2_DIR"),
                 help="converted SmolLM2-135M-Instruct folder (optional)")
  for name, kind in (("status", str), ("s", float), ("wheels", int),
                     ("target", str), ("log", str)):
    p.add_argument(f"--install_{name}", default=None, type=kind,
                   help="what gpu_suite.sh's wheel install did")
  args = p.parse_args(argv)
  args.budget_s = args.budget_s or (300.0 if args.dry_run else 470.0)
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.work, exist_ok=True)
  suite = Suite(args)
  suite.run(parts(args.dry_run, args.work, args.smollm2))


if __name__ == "__main__":
  main()
