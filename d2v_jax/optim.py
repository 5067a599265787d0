"""Optimisers and learning-rate schedules (spec §1.5, §1.6, §2.3).

- Adam with decoupled weight decay, as fairseq's `adam` (and timm's AdamW for vision).
- Schedules: fairseq's tri-stage (linear warm-up from `init_lr_scale`, hold, exponential decay
  to `final_lr_scale`) and cosine with linear warm-up.
- Optional global-norm gradient clipping (`clip_norm` 0 = off, fairseq's default).
"""

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax


def tri_stage_schedule(
  peak: float,
  total_steps: int,
  *,
  warmup_frac: float,
  hold_frac: float,
  decay_frac: float,
  init_lr_scale: float,
  final_lr_scale: float,
):
  """fairseq `tri_stage`: phases are fractions of `total_steps`; constant at the final LR after."""
  warmup = max(int(total_steps * warmup_frac), 1)
  hold = int(total_steps * hold_frac)
  decay = max(int(total_steps * decay_frac), 1)
  init_lr, final_lr = peak * init_lr_scale, peak * final_lr_scale
  decay_rate = -math.log(final_lr_scale) / decay

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = init_lr + (peak - init_lr) * step / warmup
    decayed = peak * jnp.exp(-decay_rate * (step - warmup - hold))
    lr = jnp.where(step < warmup, warm, peak)
    lr = jnp.where(step >= warmup + hold, decayed, lr)
    return jnp.where(step >= warmup + hold + decay, final_lr, lr)

  return schedule


def cosine_schedule(peak: float, total_steps: int, *, warmup_steps: int, end_lr: float = 0.0):
  """Linear warm-up from 0 to `peak`, then cosine decay to `end_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
    0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end_lr
  )


def make_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int):
  if optim_cfg.schedule == "tri_stage":
    return tri_stage_schedule(
      optim_cfg.lr,
      total_steps,
      warmup_frac=optim_cfg.warmup_frac,
      hold_frac=optim_cfg.hold_frac,
      decay_frac=optim_cfg.decay_frac,
      init_lr_scale=optim_cfg.init_lr_scale,
      final_lr_scale=optim_cfg.final_lr_scale,
    )
  if optim_cfg.schedule == "cosine":
    return cosine_schedule(
      optim_cfg.lr, total_steps, warmup_steps=optim_cfg.warmup_steps, end_lr=optim_cfg.end_lr
    )
  if optim_cfg.schedule == "constant":
    return optax.constant_schedule(optim_cfg.lr)
  raise ValueError(
    f"config.optim.schedule={optim_cfg.schedule!r}: use tri_stage, cosine or constant"
  )


def decay_mask(params, decay_1d: bool, no_decay: Sequence[str] = ()):
  """Weight decay on every leaf, or (decay_1d=False) only on weight matrices and kernels.

  Biases are excluded by name as well as by rank: attention q/k/v biases are [heads, head_dim].
  Leaves whose `/`-joined path matches a regex of `no_decay` are never decayed (vision: the
  relative position table, 2-D but a position table).
  """
  regexes = [re.compile(p) for p in no_decay]

  def decays(path, p):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if any(r.search(name) for r in regexes):
      return False
    return decay_1d or (p.ndim > 1 and getattr(path[-1], "key", None) != "bias")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int):
  """Returns (optax transformation, schedule)."""
  if optim_cfg.name != "adam":
    raise ValueError(f"config.optim.name={optim_cfg.name!r}: only 'adam' is supported")
  schedule = make_schedule(optim_cfg, total_steps)
  adam = optax.adamw(
    schedule,
    b1=optim_cfg.b1,
    b2=optim_cfg.b2,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay,
    mask=lambda params: decay_mask(params, optim_cfg.decay_1d, optim_cfg.no_decay),
  )
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adam), schedule
  return adam, schedule
