"""Mixup and cutmix with label smoothing for image fine-tuning (spec §1.6, "ImageNet, v1").

data2vec's ImageNet fine-tuning (like BEiT's and DeiT's) mixes every batch with timm's `Mixup` in
its "batch" mode: mixup 0.8, cutmix 1.0, switch probability 0.5, label smoothing 0.1. This module
gives the same law as a pure function of a `jax.random` key, to run inside the jitted step:

  - with probability `prob` the batch is mixed, else it is left as it is;
  - when both alphas are > 0, cutmix is chosen with probability `switch_prob`, else mixup;
  - lam ~ Beta(alpha, alpha) of the chosen method, one lam for the whole batch;
  - the partner of row i is row B-1-i (the batch reversed);
  - mixup: x = lam·x + (1 - lam)·partner;
  - cutmix: a box (timm's `rand_bbox`: side ⌊S·√(1 - lam)⌋ rounded down to even, centre uniform
    over the pixels, clipped to the image) is pasted from the partner, and lam becomes the share
    of pixels kept (timm's `correct_lam`), so the targets weigh exactly what the pixels show;
  - targets: lam·smooth(y) + (1 - lam)·smooth(partner's y), smoothing off = s/K, on = 1 - s + s/K.

Shapes are static: the box is a mask from iota comparisons, and both the mixed and the pasted
batch are computed and one is selected (two cheap elementwise passes).
"""

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """Label-smoothed one-hot targets, timm's values.

  Args:
    labels: int[B] class ids in [0, num_classes).
    num_classes: K.
    smoothing: s in [0, 1].

  Returns:
    float32[B, K]: 1 - s + s/K at the label, s/K elsewhere (each row sums to 1).
  """
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  is_label = labels[:, None] == jnp.arange(num_classes)[None, :]  # [B, K]
  return jnp.where(is_label, on_value, off_value).astype(jnp.float32)


def cutmix_bounds(lam, center_y, center_x, height: int, width: int):
  """timm's `rand_bbox` for a given centre: the box that replaces a share ~1 - lam of the image.

  The cut is ⌊height·√(1 - lam)⌋ by ⌊width·√(1 - lam)⌋; the box spans centre ± half of it
  (integer halves, so an odd cut loses a pixel, as in timm), clipped to the image.

  Args:
    lam: scalar, the Beta draw.
    center_y, center_x: int scalars, the centre pixel (row in [0, height), column in [0, width)).
    height, width: the image size.

  Returns:
    (top, bottom, left, right) int32 scalars, half-open: rows [top, bottom), cols [left, right).
  """
  ratio = jnp.sqrt(1.0 - lam)
  half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
  half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
  top = jnp.clip(center_y - half_h, 0, height)
  bottom = jnp.clip(center_y + half_h, 0, height)
  left = jnp.clip(center_x - half_w, 0, width)
  right = jnp.clip(center_x + half_w, 0, width)
  return top, bottom, left, right


def box_mask(bounds, height: int, width: int):
  """bool[H, W], True inside the half-open box (top, bottom, left, right)."""
  top, bottom, left, right = bounds
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)  # [H, W]
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def _check_args(images, labels, num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, smooth):
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must be [B] = [{images.shape[0]}], got shape {labels.shape}")
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if alpha < 0:
      raise ValueError(f"{name} must be >= 0 (0 = off), got {alpha}")
  for name, p in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", smooth)):
    if not 0 <= p <= 1:
      raise ValueError(f"{name} must lie in [0, 1], got {p}")


def mix_batch(
  key,
  images,
  labels,
  num_classes: int,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
  label_smoothing: float,
  prob: float = 1.0,
  switch_prob: float = 0.5,
):
  """Mixes a batch with its reverse by mixup or cutmix (timm `Mixup`, mode "batch").

  The hyperparameters are Python numbers (static under jit); only `key`, `images` and `labels`
  are traced. With both alphas 0 or `prob` 0 the images are returned as they are and the
  targets are only smoothed.

  Args:
    key: a `jax.random` key; the same key gives the same mixing.
    images: float[B, H, W, C].
    labels: int[B] class ids.
    num_classes: K.
    mixup_alpha: Beta parameter of mixup's lam; 0 turns mixup off (spec: 0.8).
    cutmix_alpha: Beta parameter of cutmix's lam; 0 turns cutmix off (spec: 1.0).
    label_smoothing: s of `smooth_one_hot` (spec: 0.1).
    prob: probability that the batch is mixed at all.
    switch_prob: probability of cutmix rather than mixup when both are on.

  Returns:
    (images float[B, H, W, C] in the input dtype, soft targets float32[B, K]).
  """
  _check_args(
    images, labels, num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing
  )
  targets = smooth_one_hot(labels, num_classes, label_smoothing)  # [B, K]
  if prob == 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
    return images, targets
  _, height, width, _ = images.shape
  k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
  apply = jax.random.uniform(k_apply) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # Draws for an alpha of 0 are never selected; 1.0 stands in so that Beta(0, 0) is never asked.
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  center_y = jax.random.randint(k_y, (), 0, height)
  center_x = jax.random.randint(k_x, (), 0, width)
  box = box_mask(cutmix_bounds(lam_cut, center_y, center_x, height, width), height, width)
  # timm's correct_lam: the targets weigh the pixels actually kept, not the drawn lam.
  lam_kept = 1.0 - jnp.sum(box, dtype=jnp.float32) / (height * width)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_kept, lam_mix), 1.0).astype(jnp.float32)

  partner = images[::-1]
  pasted = jnp.where(box[None, :, :, None], partner, images)  # [B, H, W, C]
  blended = lam * images.astype(jnp.float32) + (1.0 - lam) * partner.astype(jnp.float32)
  mixed = jnp.where(use_cutmix, pasted, blended.astype(images.dtype))
  # Selected rather than relied on lam = 1: 0·partner would turn an inf in the partner into NaN.
  mixed = jnp.where(apply, mixed, images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
