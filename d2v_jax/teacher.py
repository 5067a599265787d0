"""The EMA teacher: decay schedule and update (spec §0.5, §1.4, §2.3).

The teacher is a parameter pytree holding the student subtrees named in `config.ema.teacher_params`
(audio: just `encoder`; the CNN and projection are shared, so the teacher reads the student's
features). Inside it, leaves whose path matches a regex in `config.ema.copy_params` are copied from
the student every step (audio: the positional convolution, fairseq's `ema_layers_only`); every
other leaf moves by θ_t ← τ·θ_t + (1 − τ)·θ_s.
"""

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util


def ema_decay(step, *, decay: float, end_decay: float, anneal_steps: int):
  """τ at `step`: linear from `decay` to `end_decay` over `anneal_steps`, then constant.

  fairseq's `get_annealed_rate`: τ = τe − (τe − τ0)·(1 − step/τn) for step < τn. With
  anneal_steps == 0 or decay == end_decay the decay is constant.
  """
  if anneal_steps <= 0 or decay == end_decay:
    return jnp.asarray(end_decay, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return end_decay - (end_decay - decay) * (1.0 - frac)


def teacher_subtree(params, names: Sequence[str]):
  """The part of the student that the teacher mirrors, e.g. {"encoder": ...}."""
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(
      f"config.ema.teacher_params names {missing}, not in the model's top-level "
      f"parameters {sorted(params)}"
    )
  return {n: params[n] for n in names}


def copy_mask(teacher, patterns: Sequence[str]):
  """Pytree of bools like `teacher`: True where a leaf is copied from the student, not EMA'd."""
  regexes = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(teacher, sep="/")
  return traverse_util.unflatten_dict({k: any(r.search(k) for r in regexes) for k in flat}, sep="/")


def init_teacher(params, names: Sequence[str]):
  """The teacher starts as an exact copy of the student (spec §0.2)."""
  return jax.tree.map(jnp.copy, teacher_subtree(params, names))


def ema_update(teacher, params, decay, *, names: Sequence[str], copied):
  """One EMA step after the optimiser update. `copied` is a `copy_mask` pytree (static bools)."""
  student = teacher_subtree(params, names)

  def update(t, s, is_copied):
    if is_copied:
      return s
    s = s.astype(t.dtype)
    return t * decay + s * (1.0 - decay)

  return jax.tree.map(update, teacher, student, copied)
