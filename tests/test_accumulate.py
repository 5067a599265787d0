"""Gradient accumulation (d2v_jax/accumulate.py, `config.loop.micro_batches`).

The mean of per-slice gradients equals the full batch's gradient for a per-row mean loss; the
slices are strided so each device keeps its rows; a real pretraining step with two slices makes
one update whose teacher still follows the EMA rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import accumulate
from tests import helpers


def _loss(params, batch, rng):
  del rng
  x, y = batch
  residual = x @ params["w"] + params["b"] - y  # [rows, 2]
  return jnp.mean(jnp.square(residual)), {"rows": jnp.asarray(x.shape[0], jnp.float32)}


def test_slices_average_to_the_full_batch_gradient():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.zeros(2)}
  batch = (jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8, 2))))
  key = jax.random.key(0)
  (full, _), full_grads = accumulate.value_and_grad(_loss, params, batch, key, 1)
  (loss, metrics), grads = jax.jit(accumulate.value_and_grad, static_argnums=(0, 4))(
    _loss, params, batch, key, 4
  )
  np.testing.assert_allclose(loss, full, rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(grads[name], full_grads[name], rtol=1e-5, atol=1e-7)
  assert float(metrics["rows"]) == 2.0  # each of the 4 slices held 2 rows


def test_slices_are_strided_and_get_their_own_keys():
  """Slice j holds rows j, j + k, ... (each device keeps its rows) and key fold_in(rng, j)."""

  def probe(params, batch, rng):
    return params * jnp.sum(batch), {"first": batch[0], "draw": jax.random.uniform(rng)}

  key = jax.random.key(1)
  (_, metrics), _ = accumulate.value_and_grad(probe, jnp.ones(()), jnp.arange(6.0), key, 3)
  assert float(metrics["first"]) == 1.0  # rows 0, 1, 2 open the slices (contiguous: 0, 2, 4)
  draws = [jax.random.uniform(jax.random.fold_in(key, j)) for j in range(3)]
  np.testing.assert_allclose(metrics["draw"], np.mean(draws), rtol=1e-6)
  with pytest.raises(ValueError, match="micro_batches=4 does not divide the batch of 6"):
    accumulate.value_and_grad(probe, jnp.ones(()), jnp.arange(6.0), key, 4)


def test_pretraining_step_with_two_slices_updates_once():
  setup = helpers.image_train_setup(4)
  config = setup.config.copy_and_resolve_references()
  config.loop.micro_batches = 2
  accumulated = helpers.TrainSetup(jax.devices(), config, setup.model, helpers.image_params())
  state, _ = accumulated.run(helpers.image_batch(), 1)
  state2, (metrics2,) = accumulated.run(helpers.image_batch(), 1, state)
  assert int(state2.step) == 2 and np.isfinite(float(metrics2["loss"]))
  tau = float(metrics2["ema_decay"])
  teacher1, teacher2 = helpers.flat(jax.device_get(state.teacher)), helpers.flat(state2.teacher)
  params2 = helpers.flat(jax.device_get(state2.params))
  for path, t2 in teacher2.items():  # one EMA update per step, not one per slice
    np.testing.assert_allclose(
      t2, tau * teacher1[path] + (1 - tau) * params2[path], rtol=1e-5, atol=1e-7
    )
