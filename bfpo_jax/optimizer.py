"""Optimizer and learning-rate schedule from config (optax)."""

from __future__ import annotations

import math

import optax

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(learning_rate: float, total_steps: int, warmup_ratio=0.1,
                  schedule="cosine"):
  """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps (as the
  reference's transformers Trainer counts them), then ``schedule``."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warmup = math.ceil(total_steps * warmup_ratio)
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(total_steps, warmup + 1))
  decay_to = 0.0 if schedule == "linear" else learning_rate
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
       optax.linear_schedule(learning_rate, decay_to,
                             max(total_steps - warmup, 1))], [warmup])


def make_optimizer(learning_rate: float, total_steps: int, *, name="adamw",
                   schedule="cosine", warmup_ratio=0.1, weight_decay=0.0,
                   b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0):
  """Global-norm clipping then AdamW or RMSprop on the scheduled rate.

  The paper's BFPO recipe: lr 5e-7, cosine, warmup ratio 0.1 (the reference
  trainer used RMSprop for some runs; both are here).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  lr = make_schedule(learning_rate, total_steps, warmup_ratio, schedule)
  if name == "adamw":
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  else:
    tx = optax.chain(optax.scale_by_rms(eps=eps),
                     optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(lr))
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*parts, tx)
