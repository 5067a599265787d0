"""Tests for d2v_jax/targets.py against an independent float64 numpy implementation (spec §1.3)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import targets

EPS = 1e-5
B, T, D, L = 3, 11, 6, 5
VALID = (11, 7, 3)


def np_instance_norm(x, valid=None):
  """Per example and channel over (valid) time; biased variance; eps 1e-5 (F.instance_norm)."""
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    n = x.shape[1] if valid is None else valid[b]
    seg = x[b, :n]
    out[b, :n] = (seg - seg.mean(0)) / np.sqrt(seg.var(0) + EPS)
  return out


def np_layer_norm(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)


def np_norm(kind, x, valid):
  return {
    "instance": lambda: np_instance_norm(x, valid),
    "layer": lambda: np_layer_norm(x),
    "none": lambda: np.asarray(x, np.float64),
  }[kind]()


def np_targets(layers, valid, top_k, output, layer_norm, final_norm):
  chosen = [layers[i][output] for i in range(len(layers) - top_k, len(layers))]
  y = np.mean([np_norm(layer_norm, t, valid) for t in chosen], axis=0)
  return np_norm(final_norm, y, valid)


def make_layers(seed=0):
  """L blocks; block i has mean i and scale 1 + i per channel, so the layers are told apart."""
  rng = np.random.default_rng(seed)
  layers = []
  for i in range(L):
    scale = (1 + i) * rng.uniform(0.5, 2.0, (1, 1, D))
    layers.append(
      {
        "ffn": (i + scale * rng.standard_normal((B, T, D))).astype(np.float32),
        "block": (-i + scale * rng.standard_normal((B, T, D))).astype(np.float32),
      }
    )
  return layers


def valid_frames(valid):
  return np.arange(T)[None, :] < np.asarray(valid)[:, None]


def padding_mask(valid):
  return jnp.asarray(~valid_frames(valid))


@pytest.mark.parametrize(
  "top_k,output,layer_norm,final_norm",
  [
    (3, "ffn", "instance", "none"),  # audio v1
    (5, "ffn", "layer", "none"),  # text v1 (all blocks)
    (2, "block", "layer", "layer"),  # vision v1
    (1, "ffn", "none", "instance"),
    (4, "block", "instance", "layer"),
  ],
)
def test_build_targets_matches_numpy(top_k, output, layer_norm, final_norm):
  layers = make_layers()
  got = np.asarray(
    targets.build_targets(
      [{k: jnp.asarray(v) for k, v in r.items()} for r in layers],
      padding_mask(VALID),
      top_k=top_k,
      layer_output=output,
      layer_norm_kind=layer_norm,
      final_norm=final_norm,
    )
  )
  want = np_targets(layers, VALID, top_k, output, layer_norm, final_norm)
  assert got.dtype == np.float32 and got.shape == (B, T, D)
  v = valid_frames(VALID)
  np.testing.assert_allclose(got[v], want[v], rtol=1e-5, atol=1e-5)


def test_top_k_takes_the_last_blocks():
  """Blocks are constant per block (value = block index) plus noise: with 'none' norms the
  average of the last K blocks has mean L - (K+1)/2, not (K-1)/2."""
  rng = np.random.default_rng(3)
  layers = [{"ffn": jnp.asarray(i + 0.01 * rng.standard_normal((1, T, D)))} for i in range(L)]
  for k in range(1, L + 1):
    y = targets.build_targets(
      layers, jnp.zeros((1, T), bool), top_k=k, layer_norm_kind="none", final_norm="none"
    )
    np.testing.assert_allclose(float(jnp.mean(y)), L - (k + 1) / 2, atol=1e-2)


def test_unpadded_instance_norm_is_torch_instance_norm():
  """No mask (or an all-valid mask) = F.instance_norm on [B, D, T]: biased variance, eps 1e-5."""
  rng = np.random.default_rng(1)
  x = (3 + 2 * rng.standard_normal((2, 9, 4))).astype(np.float32)
  mean = x.mean(axis=1, keepdims=True, dtype=np.float64)
  var = ((x - mean) ** 2).mean(axis=1, keepdims=True)  # biased, as torch's instance norm
  want = (x - mean) / np.sqrt(var + 1e-5)
  for mask in (None, jnp.zeros((2, 9), bool)):
    got = np.asarray(targets.instance_norm(jnp.asarray(x), mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # eps matters for a near-constant channel: output is (x - mean) / sqrt(var + eps), not 0/0.
  c = np.zeros((1, 4, 1), np.float32)
  c[0, 0, 0] = 1e-3
  got = np.asarray(targets.instance_norm(jnp.asarray(c)))[0, :, 0]
  m = 1e-3 / 4
  v = ((c[0, :, 0] - m) ** 2).mean()
  np.testing.assert_allclose(got, (c[0, :, 0] - m) / np.sqrt(v + 1e-5), rtol=1e-4)


def test_padded_instance_norm_equals_the_cropped_sequence():
  """Statistics over valid frames only: padded targets at valid frames = unpadded targets."""
  layers = make_layers(seed=5)
  padded = targets.build_targets(
    [{"ffn": jnp.asarray(r["ffn"])} for r in layers], padding_mask(VALID), top_k=3
  )
  for b, n in enumerate(VALID):
    alone = targets.build_targets(
      [{"ffn": jnp.asarray(r["ffn"][b : b + 1, :n])} for r in layers], None, top_k=3
    )
    np.testing.assert_allclose(np.asarray(padded)[b, :n], np.asarray(alone)[0], atol=2e-5)
  # Garbage in the padding does not change valid targets.
  noisy = [
    {"ffn": jnp.asarray(np.where(valid_frames(VALID)[..., None], r["ffn"], 1e3))} for r in layers
  ]
  again = targets.build_targets(noisy, padding_mask(VALID), top_k=3)
  v = valid_frames(VALID)
  np.testing.assert_allclose(np.asarray(again)[v], np.asarray(padded)[v], atol=2e-5)


def test_bf16_layers_give_float32_targets():
  layers = make_layers(seed=6)
  y = targets.build_targets(
    [{"ffn": jnp.asarray(r["ffn"], jnp.bfloat16)} for r in layers], padding_mask(VALID), top_k=2
  )
  assert y.dtype == jnp.float32
  want = np_targets(
    [{"ffn": np.asarray(jnp.asarray(r["ffn"], jnp.bfloat16), np.float32)} for r in layers],
    VALID,
    2,
    "ffn",
    "instance",
    "none",
  )
  v = valid_frames(VALID)
  np.testing.assert_allclose(np.asarray(y)[v], want[v], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [0, -1, L + 1])
def test_invalid_top_k_raises(top_k):
  layers = [{"ffn": jnp.zeros((1, T, D))} for _ in range(L)]
  with pytest.raises(ValueError, match="top_k"):
    targets.build_targets(layers, None, top_k=top_k)


@pytest.mark.parametrize("which", ["layer_norm_kind", "final_norm"])
def test_unknown_normalisation_raises(which):
  layers = [{"ffn": jnp.zeros((1, T, D))} for _ in range(L)]
  with pytest.raises(ValueError, match="normalisation"):
    targets.build_targets(layers, None, top_k=2, **{which: "batch"})


def test_every_combination_runs_and_is_finite():
  layers = [{k: jnp.asarray(v) for k, v in r.items()} for r in make_layers(seed=7)]
  for output, ln, fn in itertools.product(
    ("ffn", "block"), ("instance", "layer", "none"), ("instance", "layer", "none")
  ):
    y = targets.build_targets(
      layers,
      padding_mask(VALID),
      top_k=2,
      layer_output=output,
      layer_norm_kind=ln,
      final_norm=fn,
    )
    assert np.isfinite(np.asarray(y)).all(), (output, ln, fn)
