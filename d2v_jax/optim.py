"""Optimisers and learning-rate schedules (spec §1.5, §1.6, §2.3).

- Adam with decoupled weight decay, as fairseq's `adam` (and timm's AdamW for vision).
- Schedules: fairseq's tri-stage (linear warm-up from `init_lr_scale`, hold, exponential decay
  to `final_lr_scale`), cosine with linear warm-up, and linear warm-up + linear decay (fairseq's
  `polynomial_decay`, RoBERTa's GLUE fine-tuning).
- Optional global-norm gradient clipping (`clip_norm` 0 = off, fairseq's default).
- Fine-tuning (§1.6): BEiT's layer-wise LR decay, parameters frozen for the whole run (fairseq's
  `feature_grad_mult=0`) or for the first N updates (`freeze_finetune_updates`).
"""

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

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


def linear_schedule(peak: float, total_steps: int, *, warmup_steps: int, end_lr: float = 0.0):
  """fairseq `polynomial_decay` with power 1: linear warm-up from 0, linear decay to `end_lr`."""
  warmup_steps = max(warmup_steps, 1)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, warmup_steps),
      optax.linear_schedule(peak, end_lr, max(total_steps - warmup_steps, 1)),
    ],
    [warmup_steps],
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
  if optim_cfg.schedule == "linear":
    return linear_schedule(
      optim_cfg.lr, total_steps, warmup_steps=optim_cfg.warmup_steps, end_lr=optim_cfg.end_lr
    )
  if optim_cfg.schedule == "constant":
    return optax.constant_schedule(optim_cfg.lr)
  raise ValueError(
    f"config.optim.schedule={optim_cfg.schedule!r}: use tri_stage, cosine, linear or constant"
  )


def _path_name(path) -> str:
  """The `/`-joined name of a pytree key path, e.g. `encoder/blocks/layer_00/fc1/kernel`."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def decay_mask(params, decay_1d: bool, no_decay: Sequence[str] = ()):
  """Weight decay on every leaf, or (decay_1d=False) only on weight matrices and kernels.

  Biases are excluded by name as well as by rank: attention q/k/v biases are [heads, head_dim].
  Leaves whose `/`-joined path matches a regex of `no_decay` are never decayed (vision: the
  relative position table, 2-D but a position table).
  """
  regexes = [re.compile(p) for p in no_decay]

  def decays(path, p):
    name = _path_name(path)
    if any(r.search(name) for r in regexes):
      return False
    return decay_1d or (p.ndim > 1 and getattr(path[-1], "key", None) != "bias")

  return jax.tree_util.tree_map_with_path(decays, params)


# Layer-wise LR decay (spec §1.6, vision fine-tuning), after BEiT's `get_num_layer_for_vit`.
# Every rule also matches below a prefix, so a fine-tuning model that nests the backbone
# (`backbone/encoder/...`) gets the same ids.
_BLOCK = re.compile(r"(?:^|/)encoder/blocks/layer_(\d+)(?:/|$)")
# BEiT puts the shared relative-position table (`rel_pos_bias.*`) in the top group
# (num_max_layer - 1 = num_layers + 1, scale 1), not with the embeddings; so do we.
_TOP = re.compile(r"(?:^|/)encoder/rel_pos_bias(?:/|$)")
# The embedding side: patch/token/position embeddings and everything else in the frontend
# (audio CNN and projection), the CLS and mask tokens, and what audio runs before block 0
# (positional conv, encoder LayerNorm).
_EMBEDDING = re.compile(
  r"(?:^|/)(?:frontend/|mask_emb$|encoder/cls_token$|encoder/pos_conv/|encoder/layer_norm/)"
)


def layer_id(path: str, num_layers: int) -> int:
  """Layer-decay group of a `/`-joined parameter path: 0 embeddings, i+1 block i, L+1 the rest.

  "The rest" (L = num_layers) is the final norm, the shared relative-position table and any
  head (`head`, `fc_norm`, `final_proj`): those train at the full learning rate.
  """
  block = _BLOCK.search(path)
  if block:
    index = int(block.group(1))
    if index >= num_layers:
      raise ValueError(
        f"parameter {path!r} belongs to block {index}, but num_layers={num_layers}: "
        "pass the model's config.model.num_layers"
      )
    return index + 1
  if _TOP.search(path):
    return num_layers + 1
  if _EMBEDDING.search(path):
    return 0
  return num_layers + 1


def layer_decay_scales(params, num_layers: int, decay: float):
  """Pytree of Python floats: the LR multiplier decay ** (num_layers + 1 - layer_id) per leaf."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: decay ** (num_layers + 1 - layer_id(_path_name(path), num_layers)), params
  )


def scale_by_layer_decay(num_layers: int, decay: float) -> optax.GradientTransformation:
  """Multiplies each leaf's (final) update by its layer-decay scale; stateless.

  Applied after the learning rate, so the whole step, decoupled weight decay included, shrinks:
  timm/BEiT scale the param group's lr, and torch's AdamW multiplies the decay by that lr.
  """

  def update_fn(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, num_layers, decay)
    updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class SkipUntilState(NamedTuple):
  count: jax.Array  # int32 []: updates seen so far, frozen or not
  inner_state: optax.OptState


def skip_until(num_steps: int, inner: optax.GradientTransformation):
  """Zero updates for the first `num_steps` updates, then `inner`.

  While skipping, `inner`'s state is kept as it was at init (zero Adam moments, zero count), so
  `inner` starts afterwards exactly like a fresh optimiser: torch's Adam counts steps per
  parameter and fairseq never steps the parameters it freezes. The switch is a `jnp.where` on
  the counter in the state, so it works inside a jitted step.
  """

  def init_fn(params):
    return SkipUntilState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None):
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    active = state.count >= num_steps
    updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), inner_updates)
    inner_state = jax.tree.map(
      lambda new, old: jnp.where(active, new, old), inner_state, state.inner_state
    )
    return updates, SkipUntilState(optax.safe_int32_increment(state.count), inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


TRAIN, DELAYED, FROZEN = "train", "delayed", "frozen"


def freeze_labels(params, freeze: Sequence[str] = (), delayed: Sequence[str] = ()):
  """Labels each leaf 'frozen' (matches a `freeze` regex), 'delayed' (a `delayed` one) or 'train'.

  `freeze` wins over `delayed`. A regex that matches no leaf is an error: a typo would otherwise
  silently train what was meant to be frozen.
  """
  names = [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for field, patterns in (("freeze", freeze), ("freeze_until_patterns", delayed)):
    for pattern in patterns:
      if not any(re.search(pattern, name) for name in names):
        raise ValueError(f"config.optim.{field}: {pattern!r} matches no parameter")

  def label(path, _):
    name = _path_name(path)
    if any(re.search(p, name) for p in freeze):
      return FROZEN
    if any(re.search(p, name) for p in delayed):
      return DELAYED
    return TRAIN

  return jax.tree_util.tree_map_with_path(label, params)


def _adam_direction(optim_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`optax.adamw` without its learning-rate step: Adam's direction plus decoupled decay."""
  return optax.chain(
    optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
    optax.add_decayed_weights(
      optim_cfg.weight_decay,
      mask=lambda params: decay_mask(params, optim_cfg.decay_1d, optim_cfg.no_decay),
    ),
  )


def _adam_with_frozen_leaves(optim_cfg, schedule, freeze, delayed, freeze_steps):
  """AdamW where 'frozen' leaves never move and 'delayed' ones move from update `freeze_steps`.

  Frozen leaves (fairseq `feature_grad_mult=0`, run under no_grad) get no optimiser state at
  all; delayed leaves (fairseq `freeze_finetune_updates`) get their own Adam, held at its init
  state (zero moments, zero count) while frozen. Both get zero weight decay while frozen. Their
  gradients are zeroed before clipping, so the clipping norm covers only what trains, as in
  fairseq where frozen parameters have no gradient.
  """

  def labels(params):
    return freeze_labels(params, freeze, delayed)

  def labelled(name):
    return lambda params: jax.tree.map(lambda label: label == name, labels(params))

  gate = [
    optax.masked(optax.set_to_zero(), labelled(FROZEN)),
    optax.masked(skip_until(freeze_steps, optax.identity()), labelled(DELAYED)),
  ]
  if optim_cfg.clip_norm > 0:
    gate.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  groups = {
    TRAIN: _adam_direction(optim_cfg),
    DELAYED: skip_until(freeze_steps, _adam_direction(optim_cfg)),
    FROZEN: optax.set_to_zero(),
  }
  return optax.chain(*gate, optax.partition(groups, labels), optax.scale_by_learning_rate(schedule))


def _patterns(optim_cfg: ml_collections.ConfigDict, field: str) -> tuple[str, ...]:
  patterns = optim_cfg.get(field, ())
  if isinstance(patterns, str):  # tuple("^enc") would be one regex per character
    raise ValueError(f"config.optim.{field}={patterns!r}: give a tuple of regexes")
  return tuple(patterns)


def make_optimizer(
  optim_cfg: ml_collections.ConfigDict, total_steps: int, num_layers: int | None = None
):
  """Returns (optax transformation, schedule).

  Fine-tuning fields (spec §1.6; absent in pretraining configs, which then get plain AdamW):
    layer_decay: < 1 scales block i's updates by layer_decay ** (num_layers - i) (needs
      `num_layers`); see `layer_id`.
    freeze: regexes on `/`-joined parameter paths that never update.
    freeze_steps, freeze_until_patterns: matching leaves stay fixed for the first
      `freeze_steps` updates (steps 0 … freeze_steps − 1).
  """
  if optim_cfg.name != "adam":
    raise ValueError(f"config.optim.name={optim_cfg.name!r}: only 'adam' is supported")
  layer_decay = optim_cfg.get("layer_decay", 1.0)
  freeze = _patterns(optim_cfg, "freeze")
  freeze_steps = optim_cfg.get("freeze_steps", 0)
  delayed = _patterns(optim_cfg, "freeze_until_patterns")
  if not 0 < layer_decay <= 1:
    raise ValueError(f"config.optim.layer_decay={layer_decay}: must be in (0, 1]")
  if layer_decay < 1 and num_layers is None:
    raise ValueError(
      f"config.optim.layer_decay={layer_decay} < 1 needs make_optimizer(num_layers=...)"
    )
  if freeze_steps < 0:
    raise ValueError(f"config.optim.freeze_steps={freeze_steps}: must be >= 0")
  if freeze_steps > 0 and not delayed:
    raise ValueError(
      f"config.optim.freeze_steps={freeze_steps} but config.optim.freeze_until_patterns is "
      "empty: name the parameters to hold (e.g. '^encoder/')"
    )

  schedule = make_schedule(optim_cfg, total_steps)
  if freeze or freeze_steps > 0:
    tx = _adam_with_frozen_leaves(
      optim_cfg, schedule, freeze, delayed if freeze_steps > 0 else (), freeze_steps
    )
  else:
    # Pretraining: unchanged, so its optimiser state and numbers stay as they were.
    tx = optax.adamw(
      schedule,
      b1=optim_cfg.b1,
      b2=optim_cfg.b2,
      eps=optim_cfg.eps,
      weight_decay=optim_cfg.weight_decay,
      mask=lambda params: decay_mask(params, optim_cfg.decay_1d, optim_cfg.no_decay),
    )
    if optim_cfg.clip_norm > 0:
      tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), tx)
  if layer_decay < 1:
    tx = optax.chain(tx, scale_by_layer_decay(num_layers, layer_decay))
  return tx, schedule
