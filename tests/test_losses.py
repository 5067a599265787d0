"""Tests for d2v_jax/losses.py against numpy references (spec §0.4, §0.6, §0.7, §1.3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import losses


def np_smooth_l1(e, beta):
  """torch's smooth_l1_loss (reduction='none'); fairseq uses plain MSE when beta == 0."""
  e = np.asarray(e, np.float64)
  if beta == 0:
    return e**2
  a = np.abs(e)
  return np.where(a < beta, 0.5 * e**2 / beta, a - 0.5 * beta)


def test_smooth_l1_values_on_both_sides_of_beta():
  beta = 2.0
  e = jnp.array([0.0, 0.5, -1.0, 1.999, 2.0, -2.0, 3.0, -7.5])
  got = np.asarray(losses.smooth_l1(e, beta))
  # By hand: 0.5 e²/β below β, |e| − β/2 from β on.
  want = [0.0, 0.0625, 0.25, 0.5 * 1.999**2 / 2, 1.0, 1.0, 2.0, 6.5]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, np_smooth_l1(e, beta), rtol=1e-6)
  # Continuous at |e| = β.
  near = np.asarray(losses.smooth_l1(jnp.array([beta - 1e-4, beta + 1e-4]), beta))
  assert abs(near[0] - near[1]) < 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.5, 4.0])
def test_smooth_l1_matches_numpy(beta):
  e = np.random.default_rng(0).normal(scale=3.0, size=(5, 7)).astype(np.float32)
  np.testing.assert_allclose(
    np.asarray(losses.smooth_l1(jnp.asarray(e), beta)), np_smooth_l1(e, beta), rtol=1e-5
  )


def test_beta_zero_is_squared_error():
  e = jnp.array([-3.0, -0.1, 0.0, 0.2, 5.0])
  np.testing.assert_allclose(np.asarray(losses.smooth_l1(e, 0.0)), np.square(e), rtol=1e-6)


def np_regression_loss(pred, target, weights, beta, scale):
  per = np_smooth_l1(pred - target, beta).sum(-1)  # [B, T]
  sel = weights > 0
  return (per[sel] * weights[sel]).sum() * scale / max(weights.sum(), 1.0), weights.sum()


@pytest.mark.parametrize("beta,scale", [(0.0, None), (4.0, 1.0), (2.0, 0.3)])
def test_regression_loss_matches_numpy(beta, scale):
  rng = np.random.default_rng(1)
  b, t, d = 3, 8, 16
  pred = rng.normal(size=(b, t, d)).astype(np.float32)
  target = rng.normal(scale=2, size=(b, t, d)).astype(np.float32)
  weights = (rng.random((b, t)) < 0.5).astype(np.float32)
  weights[0, 0] = 1.0
  loss, count = losses.regression_loss(
    jnp.asarray(pred), jnp.asarray(target), jnp.asarray(weights), beta=beta, scale=scale
  )
  want, want_count = np_regression_loss(
    pred, target, weights, beta, d**-0.5 if scale is None else scale
  )
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(count) == want_count


def test_regression_loss_is_mean_over_masked_positions_of_sum_over_dims_over_sqrt_d():
  """Hand-computable case: two counted positions with errors 1 and 2 on every one of D=4 dims."""
  pred = np.zeros((1, 3, 4), np.float32)
  target = np.zeros((1, 3, 4), np.float32)
  target[0, 0] = 1.0  # counted: sum over D of e² = 4
  target[0, 1] = 2.0  # counted: 16
  target[0, 2] = 100.0  # not counted
  weights = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, count = losses.regression_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(weights))
  np.testing.assert_allclose(float(loss), (4 + 16) / 2 / np.sqrt(4), rtol=1e-6)
  assert float(count) == 2


def test_zero_weight_positions_do_not_count():
  rng = np.random.default_rng(2)
  pred = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  weights = jnp.asarray([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1]], jnp.float32)
  base, _ = losses.regression_loss(pred, target, weights)
  # Changing predictions (even to huge values) where the weight is 0 changes nothing ...
  junk = jnp.where(weights[..., None] > 0, pred, 1e6)
  np.testing.assert_allclose(float(losses.regression_loss(junk, target, weights)[0]), float(base))
  # ... and their gradient is exactly zero.
  grad = jax.grad(lambda p: losses.regression_loss(p, target, weights)[0])(pred)
  assert not np.asarray(grad)[np.asarray(weights) == 0].any()
  assert np.asarray(grad)[np.asarray(weights) == 1].any()


def test_no_counted_position_gives_zero_not_nan():
  loss, count = losses.regression_loss(jnp.ones((1, 3, 4)), jnp.zeros((1, 3, 4)), jnp.zeros((1, 3)))
  assert float(loss) == 0.0 and float(count) == 0.0


def np_masked_std(x, weights):
  """fairseq compute_var: x[mask] -> torch.sqrt(y.var(dim=0) + 1e-6).mean() (unbiased var)."""
  sel = np.asarray(x, np.float64)[weights > 0]  # [N, D]
  return np.sqrt(sel.var(axis=0, ddof=1) + 1e-6).mean()


def test_masked_std_matches_numpy():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(3, 10, 5)) * np.arange(1, 6) + 7).astype(np.float32)
  weights = (rng.random((3, 10)) < 0.4).astype(np.float32)
  x_junk = np.where(weights[..., None] > 0, x, 1e4).astype(np.float32)
  got = float(losses.masked_std(jnp.asarray(x_junk), jnp.asarray(weights)))
  np.testing.assert_allclose(got, np_masked_std(x, weights), rtol=1e-5)


def test_masked_std_of_a_constant_is_sqrt_eps():
  x = jnp.full((2, 4, 3), 5.0)
  got = float(losses.masked_std(x, jnp.ones((2, 4))))
  np.testing.assert_allclose(got, 1e-3, rtol=1e-3)


def test_vision_loss_is_smooth_l1_mean_over_tokens_and_dims():
  """data2vec_vision: smooth-L1(β=2) averaged over masked tokens and dimensions, no scale."""
  pred = np.zeros((1, 3, 4), np.float32)
  target = np.zeros((1, 3, 4), np.float32)
  target[0, 0] = [1.0, -1.0, 3.0, 0.0]  # 0.25, 0.25, 3 − 1 = 2, 0
  target[0, 1] = 0.5  # 4 × 0.0625
  target[0, 2] = 9.0  # not counted
  weights = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, _ = losses.regression_loss(
    jnp.asarray(pred),
    jnp.asarray(target),
    jnp.asarray(weights),
    beta=2.0,
    scale=1.0,
    reduce_dims="mean",
  )
  want = np.mean([np.mean([0.25, 0.25, 2.0, 0.0]), 0.0625])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  with pytest.raises(ValueError, match="reduce_dims"):
    losses.regression_loss(
      jnp.asarray(pred), jnp.asarray(target), jnp.asarray(weights), reduce_dims="max"
    )
