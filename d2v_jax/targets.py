"""Teacher layer outputs -> regression targets (spec §0.3, §1.3, §2.1.5).

targets = final_norm(mean_k norm(y_k)) over the top K blocks, where y_k is the chosen sublayer
(FFN output before the residual for v1 speech/text and all of v2; end of block for v1 vision) and
`norm` is an instance norm over time per channel or a LayerNorm over D, both without affine.

Padding: fairseq never pads speech batches (it crops to the shortest), so its instance norm runs
over all frames. We pad to fixed lengths, so statistics use valid frames only; the two agree
exactly when nothing is padded (spec §1.3, "Padding and the audio instance norm").
"""

import jax.numpy as jnp

EPS = 1e-5


def instance_norm(x, padding_mask=None, eps: float = EPS):
  """Normalises each channel over time (valid frames only): [B, T, D] -> [B, T, D]."""
  x = x.astype(jnp.float32)
  if padding_mask is None:
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.var(x, axis=1, keepdims=True)
  else:
    w = (~padding_mask)[..., None].astype(jnp.float32)  # [B, T, 1]
    n = jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    mean = jnp.sum(x * w, axis=1, keepdims=True) / n
    var = jnp.sum(jnp.square(x - mean) * w, axis=1, keepdims=True) / n
  return (x - mean) * jnp.reciprocal(jnp.sqrt(var + eps))


def layer_norm(x, eps: float = EPS):
  """LayerNorm over the last axis without affine parameters, in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jnp.reciprocal(jnp.sqrt(var + eps))


def _normalise(x, kind: str, padding_mask):
  if kind == "instance":
    return instance_norm(x, padding_mask)
  if kind == "layer":
    return layer_norm(x)
  if kind == "none":
    return x.astype(jnp.float32)
  raise ValueError(f"Unknown target normalisation {kind!r}; use 'instance', 'layer' or 'none'")


def build_targets(
  layer_results,
  padding_mask,
  *,
  top_k: int,
  layer_output: str = "ffn",
  layer_norm_kind: str = "instance",
  final_norm: str = "none",
):
  """Averages the normalised sublayer outputs of the top `top_k` blocks.

  Args:
    layer_results: list over blocks of dicts with the sublayer outputs, each [B, T, D].
    padding_mask: bool[B, T], True at padded positions (used by the instance norm).
    top_k: number of final blocks to average.
    layer_output: which sublayer to use, a key of each dict ('ffn' or 'block').
    layer_norm_kind: per-layer normalisation, 'instance' | 'layer' | 'none'.
    final_norm: normalisation of the average, 'instance' | 'layer' | 'none'.

  Returns:
    float32[B, T, D] targets.
  """
  if not 1 <= top_k <= len(layer_results):
    raise ValueError(
      f"targets.top_k={top_k} must be between 1 and the {len(layer_results)} blocks of the model"
    )
  top = [r[layer_output] for r in layer_results[-top_k:]]
  y = sum(_normalise(t, layer_norm_kind, padding_mask) for t in top) / top_k
  return _normalise(y, final_norm, padding_mask)
