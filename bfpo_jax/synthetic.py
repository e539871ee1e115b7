"""The illustrative experiment of the BFPO paper (Sec. 3.4), in one scan.

A tabular policy -- a softmax over one logit per response -- is trained against
a uniform reference on a preference set mixed like the real one:

* helpfulness pairs (as in UltraFeedback): the chosen response is the more
  helpful one, whatever its safety; most pairs compare two safe responses;
* safety pairs (as in PKU-SafeRLHF): the chosen response is the safe one.

The four responses are the four categories of the paper's global ranking,
``helpful_safe > unhelpful_safe > unhelpful_unsafe > helpful_unsafe``. Both
sources together contradict each other pairwise (a helpful-unsafe answer wins
the helpfulness pairs and loses the safety pairs), so DPO and IPO, which only
see "chosen beats rejected", settle on a ranking set by the data proportions.
BFPO's labeling function reads the safety flags and recovers the global
ranking.

Two safety-aware baselines run on the same two sources:

* SACPO (Wachi et al., NeurIPS 2024): DPO on the helpfulness pairs, then DPO
  on the safety pairs from that policy, which is also the second stage's
  reference; ``sacpo_safety_first`` runs the two stages the other way round,
  as the authors also do. Each stage takes the experiment's 1800 steps. The
  safety stage's beta is a tenth of the helpfulness stage's (tau), the ratio
  of the authors' scripts (0.01 and 0.1; configs/sacpo.py).
* P-SACPO: the linear merge ``(1 - W) * helpful + W * stepwise`` of the two
  SACPO policies' parameters (here the logits), for the authors' W of 0.25,
  0.5 and 0.75 (line/sacpo config/merge/linear_*.yaml).

Run: ``python -m bfpo_jax.synthetic --out runs/synthetic`` (under a minute on a
CPU); writes ``results.json`` and ``synthetic.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bfpo_jax import losses

CATEGORIES = ("helpful_safe", "unhelpful_safe", "unhelpful_unsafe",
              "helpful_unsafe")
HS, US, UU, HU = range(4)
_SAFE = np.array([True, True, False, False])
METHODS = ("bfpo", "dpo", "ipo")  # one training run on the mixed set
STAGED = {  # two DPO runs in turn, each on one source: (first, second)
    "sacpo": ("helpfulness", "safety"),
    "sacpo_safety_first": ("safety", "helpfulness"),
}
MERGE_WEIGHTS = (0.25, 0.5, 0.75)  # P-SACPO: the stepwise model's weight
SAFETY_BETA_RATIO = 0.1  # safety-stage beta / helpfulness-stage beta

# (chosen, rejected, relative frequency). Helpfulness pairs rank by
# helpfulness only; safety pairs always prefer the safe response.
HELPFULNESS_PAIRS = ((HS, US, 0.7), (HU, US, 0.1), (HU, UU, 0.1),
                     (HS, UU, 0.1))
SAFETY_PAIRS = ((US, HU, 0.25), (HS, HU, 0.25), (US, UU, 0.25),
                (HS, UU, 0.25))


def preference_set(helpfulness_share=0.5):
  """The mixed synthetic preference set as arrays.

  Args:
    helpfulness_share: fraction of the sampling mass on helpfulness pairs; the
      rest goes to safety pairs (the paper mixes 30K + 30K, i.e. 0.5).

  Returns:
    dict with ``chosen``, ``rejected`` (response indices), ``chosen_is_safe``,
    ``rejected_is_safe`` and ``probs`` (sampling probability of each pair).
  """
  rows = ([(c, r, helpfulness_share * p) for c, r, p in HELPFULNESS_PAIRS]
          + [(c, r, (1 - helpfulness_share) * p) for c, r, p in SAFETY_PAIRS])
  chosen, rejected, probs = (np.array(col) for col in zip(*rows))
  return {
      "chosen": chosen.astype(np.int32),
      "rejected": rejected.astype(np.int32),
      "chosen_is_safe": _SAFE[chosen],
      "rejected_is_safe": _SAFE[rejected],
      "probs": (probs / probs.sum()).astype(np.float32),
  }


def source_set(data, source):
  """The rows of one source (``"helpfulness"`` or ``"safety"``) of a
  :func:`preference_set`, its sampling probabilities renormalised."""
  n_help = len(HELPFULNESS_PAIRS)
  rows = slice(0, n_help) if source == "helpfulness" else slice(n_help, None)
  out = {k: v[rows] for k, v in data.items()}
  out["probs"] = (out["probs"] / out["probs"].sum()).astype(np.float32)
  return out


def _loss(method, logits_J, batch, beta, alpha, ref_logp_J=None):
  logp_J = jax.nn.log_softmax(logits_J)
  if ref_logp_J is None:  # the uniform reference of the paper's experiment
    ref_logp_J = jnp.full_like(logp_J, -jnp.log(logp_J.shape[0]))
  chosen, rejected = logp_J[batch["chosen"]], logp_J[batch["rejected"]]
  ref_chosen, ref_rejected = ref_logp_J[batch["chosen"]], ref_logp_J[
      batch["rejected"]]
  if method == "bfpo":
    loss, _ = losses.bfpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                               batch["chosen_is_safe"],
                               batch["rejected_is_safe"], beta=beta,
                               alpha=alpha)
  elif method == "dpo":
    loss, _ = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                              beta=beta)
  elif method == "ipo":
    loss, _ = losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected,
                              beta=beta)
  else:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  return loss


def train(method, seed, data, *, steps=1800, batch_size=32, lr=0.01, beta=1.0,
          alpha=0.5):
  """Trains one tabular policy; the whole loop is a ``lax.scan``.

  Args:
    method: ``"bfpo"``, ``"dpo"`` or ``"ipo"``.
    seed: int or scalar array; vmap over it for several seeds.
    data: output of :func:`preference_set`.
    steps: optimizer steps (1800 in the paper).
    batch_size: pairs per step, sampled with replacement (32).
    lr: Adam learning rate (0.01).
    beta: tau of the paper (1.0).
    alpha: BFPO labeling shift (0.5).

  Returns:
    [steps + 1, 4] probabilities of each category, from initialisation on.
  """
  return train_from(method, seed, data, steps=steps, batch_size=batch_size,
                    lr=lr, beta=beta, alpha=alpha)[1]


@functools.partial(jax.jit, static_argnames=("method", "steps", "batch_size"))
def train_from(method, seed, data, init_logits=None, reference_logits=None, *,
               steps=1800, batch_size=32, lr=0.01, beta=1.0, alpha=0.5):
  """:func:`train` from given logits against a given reference.

  Args:
    init_logits: [4] logits to start from (None: zeros, the uniform policy).
    reference_logits: [4] logits of the frozen reference (None: uniform).
    The others as :func:`train`.

  Returns:
    ``(logits, history)``: the final [4] logits and the [steps + 1, 4]
    probabilities from the start on.
  """
  optimizer = optax.adam(lr)
  logits_J = (jnp.zeros(len(CATEGORIES), jnp.float32) if init_logits is None
              else jnp.asarray(init_logits, jnp.float32))
  ref_logp_J = (None if reference_logits is None
                else jax.nn.log_softmax(jnp.asarray(reference_logits)))
  arrays = {k: jnp.asarray(v) for k, v in data.items() if k != "probs"}
  probs = jnp.asarray(data["probs"])

  def step(carry, key):
    logits_J, opt_state = carry
    index_B = jax.random.choice(key, probs.shape[0], (batch_size,), p=probs)
    batch = {k: v[index_B] for k, v in arrays.items()}
    grads = jax.grad(functools.partial(_loss, method))(logits_J, batch, beta,
                                                       alpha, ref_logp_J)
    updates, opt_state = optimizer.update(grads, opt_state, logits_J)
    logits_J = optax.apply_updates(logits_J, updates)
    return (logits_J, opt_state), jax.nn.softmax(logits_J)

  keys = jax.random.split(jax.random.key(seed), steps)
  (final_J, _), history = jax.lax.scan(
      step, (logits_J, optimizer.init(logits_J)), keys)
  return final_J, jnp.concatenate([jax.nn.softmax(logits_J)[None], history])


def train_stepwise(seed, data, order=("helpfulness", "safety"), *, steps=1800,
                   beta=1.0, safety_beta_ratio=SAFETY_BETA_RATIO):
  """SACPO on the tabular policy: DPO on one source, then DPO on the other
  from (and against) the first stage's policy.

  Args:
    seed: int; the second stage draws its batches from ``seed + 1000``.
    data: output of :func:`preference_set`; each stage reads one source.
    order: the sources in training order.
    steps: optimizer steps of each stage.
    beta: the helpfulness stage's beta (tau).
    safety_beta_ratio: the safety stage's beta over ``beta``.

  Returns:
    ``(first_logits, final_logits, history)``: the [4] logits after each
    stage and the [2 * steps + 1, 4] probabilities over both.
  """
  betas = {"helpfulness": beta, "safety": beta * safety_beta_ratio}
  first, history_1 = train_from("dpo", seed, source_set(data, order[0]),
                                steps=steps, beta=betas[order[0]])
  final, history_2 = train_from("dpo", seed + 1000, source_set(data, order[1]),
                                first, first, steps=steps, beta=betas[order[1]])
  return first, final, jnp.concatenate([history_1, history_2[1:]])


def merged_probs(helpful_logits, stepwise_logits, weight):
  """P-SACPO: the policy of ``(1 - W) * helpful + W * stepwise`` logits."""
  return jax.nn.softmax((1.0 - weight) * jnp.asarray(helpful_logits)
                        + weight * jnp.asarray(stepwise_logits), axis=-1)


def ranking(probs_J):
  """Category names from most to least likely."""
  return [CATEGORIES[i] for i in np.argsort(-np.asarray(probs_J), kind="stable")]


def _result(final_per_seed):
  final = final_per_seed.mean(axis=0)
  log_probs = np.log(final_per_seed).mean(axis=0)  # orders the tiny ones
  return {"final_probs": dict(zip(CATEGORIES, map(float, final))),
          "mean_log_probs": dict(zip(CATEGORIES, map(float, log_probs))),
          "ranking": ranking(final),
          "ranking_per_seed": [ranking(p) for p in final_per_seed]}


def run(seeds=(0, 1, 2, 3, 4), steps=1800, helpfulness_share=0.5):
  """Runs every method over every seed.

  Returns:
    ``(results, histories)``: ``results[method]`` holds the final probability
    of each category (mean over seeds), the mean of its log over seeds, the
    ``ranking`` from the mean probabilities, and the ranking of each seed;
    ``histories[method]`` is [seeds, steps + 1, 4] ([seeds, 2 * steps + 1,
    4] for SACPO's two stages; merges have none).
  """
  data = preference_set(helpfulness_share)
  results, histories = {}, {}
  for method in METHODS:
    history = np.asarray(jax.vmap(
        lambda s, m=method: train(m, s, data, steps=steps))(jnp.asarray(seeds)))
    histories[method] = history
    results[method] = _result(history[:, -1])
  stepwise = {}
  for name, order in STAGED.items():
    first, final, history = (np.asarray(x) for x in jax.vmap(
        lambda s, o=order: train_stepwise(s, data, o, steps=steps))(
            jnp.asarray(seeds)))
    stepwise[name] = (first, final)
    histories[name] = history
    results[name] = _result(history[:, -1])
  helpful, steps_both = stepwise["sacpo"]
  for weight in MERGE_WEIGHTS:
    results[f"p_sacpo_{weight:g}"] = _result(np.asarray(
        merged_probs(helpful, steps_both, weight)))
  return results, histories


def plot(histories, path):
  """Saves probabilities over training, one panel per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3.2),
                           sharey=True)
  for ax, (method, history) in zip(axes, histories.items()):
    mean = history.mean(axis=0)
    for i, name in enumerate(CATEGORIES):
      ax.plot(mean[:, i], label=name)
    ax.set_title(method.upper())
    ax.set_xlabel("step")
  axes[0].set_ylabel("probability")
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/synthetic",
                      help="directory for results.json and synthetic.png")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=1800)
  parser.add_argument("--helpfulness_share", type=float, default=0.5)
  args = parser.parse_args(argv)
  if args.seeds < 1 or args.steps < 1:
    parser.error("--seeds and --steps must be positive")
  if not 0.0 < args.helpfulness_share < 1.0:
    parser.error("--helpfulness_share must be in (0, 1)")

  results, histories = run(tuple(range(args.seeds)), args.steps,
                           args.helpfulness_share)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot(histories, os.path.join(args.out, "synthetic.png"))
  for method, result in results.items():
    probs = " ".join(f"{k}={v:.3f}" for k, v in result["final_probs"].items())
    print(f"{method:18s} {' > '.join(result['ranking'])}\n{'':19s}{probs}")
  print(f"wrote {args.out}/results.json and {args.out}/synthetic.png")


if __name__ == "__main__":
  main()
