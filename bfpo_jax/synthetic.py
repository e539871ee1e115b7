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
METHODS = ("bfpo", "dpo", "ipo")

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


def _loss(method, logits_J, batch, beta, alpha):
  logp_J = jax.nn.log_softmax(logits_J)
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


@functools.partial(jax.jit, static_argnames=("method", "steps", "batch_size"))
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
  optimizer = optax.adam(lr)
  logits_J = jnp.zeros(len(CATEGORIES), jnp.float32)
  arrays = {k: jnp.asarray(v) for k, v in data.items() if k != "probs"}
  probs = jnp.asarray(data["probs"])

  def step(carry, key):
    logits_J, opt_state = carry
    index_B = jax.random.choice(key, probs.shape[0], (batch_size,), p=probs)
    batch = {k: v[index_B] for k, v in arrays.items()}
    grads = jax.grad(functools.partial(_loss, method))(logits_J, batch, beta,
                                                       alpha)
    updates, opt_state = optimizer.update(grads, opt_state, logits_J)
    logits_J = optax.apply_updates(logits_J, updates)
    return (logits_J, opt_state), jax.nn.softmax(logits_J)

  keys = jax.random.split(jax.random.key(seed), steps)
  _, history = jax.lax.scan(step, (logits_J, optimizer.init(logits_J)), keys)
  return jnp.concatenate([jax.nn.softmax(logits_J)[None], history])


def ranking(probs_J):
  """Category names from most to least likely."""
  return [CATEGORIES[i] for i in np.argsort(-np.asarray(probs_J), kind="stable")]


def run(seeds=(0, 1, 2, 3, 4), steps=1800, helpfulness_share=0.5):
  """Runs every method over every seed.

  Returns:
    ``(results, histories)``: ``results[method]`` holds the final probability
    of each category (mean over seeds), the ``ranking`` from that mean, and the
    ranking of each seed; ``histories[method]`` is [seeds, steps + 1, 4].
  """
  data = preference_set(helpfulness_share)
  results, histories = {}, {}
  for method in METHODS:
    history = np.asarray(jax.vmap(
        lambda s, m=method: train(m, s, data, steps=steps))(jnp.asarray(seeds)))
    final = history[:, -1].mean(axis=0)
    histories[method] = history
    results[method] = {
        "final_probs": dict(zip(CATEGORIES, map(float, final))),
        "ranking": ranking(final),
        "ranking_per_seed": [ranking(h[-1]) for h in history],
    }
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
    print(f"{method:5s} {' > '.join(result['ranking'])}\n      {probs}")
  print(f"wrote {args.out}/results.json and {args.out}/synthetic.png")


if __name__ == "__main__":
  main()
