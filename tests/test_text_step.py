"""The pretraining step on a tiny text model (data2vec 1.0 text, spec §1.2–§1.4).

Jitted with `d2v_jax/train.py`'s shardings on the 4 fake CPU devices of conftest.py. Checks: the
loss falls on a fixed batch (both masking schemes); the teacher EMAs the encoder and copies the
embeddings; targets equal a float64 numpy reference from the teacher's FFN outputs; the loss is
taken where the released code takes it; 1 and 4 devices agree.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import steps
from tests import helpers

NUM_STEPS = 30


@functools.cache
def fitted():
  return helpers.text_train_setup(4).run(helpers.text_batch(), NUM_STEPS)


def test_loss_falls_on_a_fixed_batch():
  _, history = fitted()
  loss = np.array([float(m["loss"]) for m in history])
  first, last = loss[:5].mean(), loss[-5:].mean()
  assert last < 0.7 * first, f"loss did not fall: first-5 {first:.4f}, last-5 {last:.4f}\n{loss}"
  batch = helpers.text_batch()
  assert all(m["valid_inputs"] == (~batch["padding_mask"]).sum() for m in history)  # tokens


def test_loss_falls_with_bert_masking_too():
  config = helpers.text_step_config("bert")
  setup = helpers.TrainSetup(jax.devices()[:1], config, helpers.text_model(), helpers.text_params())
  _, history = setup.run(helpers.text_batch(), 20)
  loss = np.array([float(m["loss"]) for m in history])
  assert loss[-5:].mean() < 0.8 * loss[:5].mean(), loss


def test_teacher_emas_the_encoder_and_copies_the_embeddings():
  setup = helpers.text_train_setup(4)
  state1, _ = setup.run(helpers.text_batch(), 2)
  state2, (metrics,) = setup.run(helpers.text_batch(), 1, state1)
  state1, state2 = jax.device_get((state1, state2))
  assert set(state2.teacher) == {"frontend", "encoder"}  # the regression head is the student's
  tau = float(metrics["ema_decay"])
  teacher1, teacher2 = helpers.flat(state1.teacher), helpers.flat(state2.teacher)
  params1, params2 = helpers.flat(state1.params), helpers.flat(state2.params)
  for path, t2 in teacher2.items():
    if path.startswith("frontend/"):
      np.testing.assert_array_equal(t2, params2[path], err_msg=path)  # copied: shared
    else:
      want = tau * teacher1[path] + (1 - tau) * params2[path]
      np.testing.assert_allclose(t2, want, rtol=1e-5, atol=1e-7, err_msg=path)
  # The update really moved the student, so neither rule passes by standing still.
  assert all(np.any(params2[p] != params1[p]) for p in teacher2 if "embedding" in p)


def _np_layer_norm(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def test_targets_match_a_numpy_reference_from_the_teachers_ffn_outputs():
  """Top-K FFN outputs (before the residual), each LayerNorm'd, averaged (spec §1.3 text)."""
  setup = helpers.text_train_setup(1)
  config, model = setup.config, setup.model
  batch = helpers.text_batch()
  teacher, _ = fitted()  # trained weights, so the blocks differ
  teacher = jax.device_get(teacher.teacher)
  tokens, padding = batch["tokens"], batch["padding_mask"]
  _, aux = helpers.fast_jit(
    lambda p: model.apply({"params": p}, tokens, padding, method=model.__call__)
  )({**teacher, "final_proj": helpers.text_params()["final_proj"]})
  top = [np.asarray(layer["ffn"]) for layer in aux["layers"][-config.targets.top_k :]]
  want = np.mean([_np_layer_norm(y) for y in top], axis=0)

  def targets_of(teacher_params):
    return steps.teacher_targets(model, config, teacher_params, tokens, padding, None, None)

  got = np.asarray(helpers.fast_jit(targets_of)(teacher))
  valid = ~padding
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
  # Sensitive to K and to the sublayer: the end-of-block outputs give other targets.
  blocks = np.mean([_np_layer_norm(layer["block"]) for layer in aux["layers"][-2:]], axis=0)
  assert np.abs(blocks - want)[valid].max() > 0.1


@pytest.mark.parametrize("loss_on_mask_only", [True, False])
def test_bert_loss_positions_follow_the_switch(loss_on_mask_only):
  """Released code: loss only where the input became <mask>; else at every selected position."""
  config = helpers.text_step_config("bert")
  config.masking.loss_on_mask_only = loss_on_mask_only
  batch = helpers.text_batch()
  tokens, padding = jnp.asarray(batch["tokens"]), jnp.asarray(batch["padding_mask"])
  corrupted, selected, loss_mask = steps.mask_token_ids(jax.random.key(3), tokens, padding, config)
  corrupted, selected, loss_mask = map(np.asarray, (corrupted, selected, loss_mask))
  became_mask = corrupted == config.masking.mask_id
  if loss_on_mask_only:
    np.testing.assert_array_equal(loss_mask, became_mask)
    assert selected.sum() > loss_mask.sum()  # the random/unchanged 10% + 10% get no loss
  else:
    np.testing.assert_array_equal(loss_mask, selected)
  assert not selected[np.isin(np.asarray(tokens), (0, 1, 2))].any()  # never <s>, <pad>, </s>


def test_one_device_and_four_device_meshes_agree():
  batch = helpers.text_batch()
  runs = {n: jax.device_get(helpers.text_train_setup(n).run(batch, 2)) for n in (1, 4)}
  (s1, h1), (s4, h4) = runs[1], runs[4]
  for a, b in zip(h1, h4, strict=True):
    for k in ("loss", "grad_norm", "target_var", "pred_var", "num_masked"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  for u, v in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
