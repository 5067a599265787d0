"""Regression losses between student predictions and teacher targets (spec §0.4, §0.6, §1.3).

fairseq sums the per-dimension loss over D, multiplies by a scale (1/√D for speech) and divides
the summed loss by the number of masked positions. `regression_loss` returns that mean directly.
"""

import jax.numpy as jnp


def smooth_l1(error, beta: float):
  """0.5·e²/β where |e| < β, else |e| − 0.5β; β = 0 gives plain squared error (fairseq)."""
  if beta == 0:
    return jnp.square(error)
  abs_error = jnp.abs(error)
  return jnp.where(abs_error < beta, 0.5 * jnp.square(error) / beta, abs_error - 0.5 * beta)


def regression_loss(
  pred,
  target,
  weights,
  *,
  beta: float = 0.0,
  scale: float | None = None,
  reduce_dims: str = "sum",
):
  """Mean over weighted positions of (sum or mean over D of the per-dim loss) × scale.

  Args:
    pred: [B, T, D] student predictions.
    target: [B, T, D] teacher targets.
    weights: [B, T] 1.0 at positions that count (masked, valid), else 0.0.
    beta: smooth-L1 β; 0 = L2.
    scale: multiplier of the per-position loss; None = 1/√D.
    reduce_dims: 'sum' over D (fairseq speech and text) or 'mean' (data2vec_vision).

  Returns:
    (loss, num_positions) as float32 scalars.
  """
  dim = pred.shape[-1]
  scale = dim**-0.5 if scale is None else scale
  if reduce_dims not in ("sum", "mean"):
    raise ValueError(f"config.loss.reduce_dims={reduce_dims!r}: use 'sum' or 'mean'")
  per_dim = smooth_l1(pred.astype(jnp.float32) - target, beta)  # [B, T, D]
  per_position = jnp.sum(per_dim, -1) if reduce_dims == "sum" else jnp.mean(per_dim, -1)  # [B, T]
  weights = weights.astype(jnp.float32)
  count = jnp.sum(weights)
  loss = jnp.sum(per_position * weights) * scale / jnp.maximum(count, 1.0)
  return loss, count


def masked_std(x, weights):
  """fairseq's `compute_var`: per-dimension std over weighted positions, averaged over D.

  Logged as `target_var` / `pred_var` (fairseq's names, although the value is a std) and used by
  the collapse guard of spec §0.7. x: [B, T, D]; weights: [B, T].
  """
  x = x.astype(jnp.float32)
  w = weights.astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(w), 2.0)
  mean = jnp.sum(x * w, axis=(0, 1)) / n
  var = jnp.sum(jnp.square(x - mean) * w, axis=(0, 1)) / (n - 1)  # unbiased, as torch.var
  return jnp.mean(jnp.sqrt(var + 1e-6))
