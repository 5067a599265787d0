"""Tests for d2v_jax/steps.py: the jitted pretraining step on a tiny audio model (spec §0).

The step is jitted with the in/out shardings of `d2v_jax/train.py` on a 4-device mesh (the fake
CPU devices of conftest.py) and shared with test_teacher.py through `tests/helpers.py`.
"""

import functools

import jax
import numpy as np
import pytest

from d2v_jax.models import audio
from tests import helpers

NUM_STEPS = 30
METRICS = ("loss", "target_var", "pred_var", "ema_decay", "lr", "grad_norm")


@functools.cache
def fitted():
  """30 steps on one fixed batch: (final state, per-step metrics)."""
  return helpers.train_setup(4).run(helpers.step_batch(), NUM_STEPS)


def test_loss_falls_on_a_fixed_batch():
  _, history = fitted()
  loss = np.array([float(m["loss"]) for m in history])
  first, last = loss[:5].mean(), loss[-5:].mean()
  assert last < 0.7 * first, f"loss did not fall: first-5 {first:.3f}, last-5 {last:.3f}\n{loss}"


def test_step_compiles_once():
  setup = helpers.train_setup(4)
  state, _ = fitted()
  state, _ = setup.run(helpers.step_batch(), 2, state)  # resumes from a previous step's output
  assert setup.num_traces == 1
  assert setup.step._cache_size() == 1
  assert int(state.step) == NUM_STEPS + 2


def fairseq_tri_stage(step, peak, total, phases=(0.03, 0.9, 0.07), init=0.01, final=0.01):
  warmup, hold, decay = (int(total * p) for p in phases)
  if step < warmup:
    return peak * init + (peak - peak * init) / warmup * step
  if step < warmup + hold:
    return peak
  if step <= warmup + hold + decay:
    return peak * np.exp(np.log(final) / decay * (step - warmup - hold))
  return peak * final


def test_metrics_are_complete_finite_and_follow_the_schedules():
  setup = helpers.train_setup(4)
  config = setup.config
  _, history = fitted()
  assert set(METRICS) <= set(history[0]), sorted(history[0])
  for step, m in enumerate(history):
    for k in METRICS:
      assert np.isfinite(m[k]), (step, k, m[k])
    assert m["target_var"] > 0 and m["pred_var"] > 0 and m["grad_norm"] > 0
    want_decay = config.ema.end_decay - (config.ema.end_decay - config.ema.decay) * (
      1 - min(step / config.ema.anneal_steps, 1.0)
    )
    np.testing.assert_allclose(m["ema_decay"], want_decay, rtol=1e-6)
    np.testing.assert_allclose(
      m["lr"],
      fairseq_tri_stage(
        step,
        config.optim.lr,
        config.loop.total_steps,
        phases=(config.optim.warmup_frac, config.optim.hold_frac, config.optim.decay_frac),
      ),
      rtol=1e-5,
    )
    # Same masked count in every row (require_same_masks), masks only at valid frames.
    frames = audio.output_lengths(np.array(helpers.STEP_VALID))
    assert m["num_masked"] % len(frames) == 0
    assert 0 < m["num_masked"] / len(frames) < frames.min()
    assert m["valid_inputs"] == sum(helpers.STEP_VALID)


def _max_abs_diff(a, b):
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree.leaves(diffs))


def test_one_device_and_four_device_meshes_agree():
  """The same global batch gives the same update on 1 device and on 4 (batch split 1 per device):
  gradients are all-reduced, and masks and dropout do not depend on the sharding."""
  batch = helpers.step_batch()
  runs = {}
  for n in (1, 4):
    setup = helpers.train_setup(n)
    state, history = setup.run(batch, 2)
    assert len(state.params["final_proj"]["kernel"].sharding.device_set) == n
    runs[n] = jax.device_get((state, history))
  (s1, h1), (s4, h4) = runs[1], runs[4]
  for a, b in zip(h1, h4, strict=True):
    for k in METRICS:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
    assert a["num_masked"] == b["num_masked"]
  for name in ("params", "teacher", "opt_state"):
    x, y = getattr(s1, name), getattr(s4, name)
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=name)
  print(
    f"max abs diff 1 vs 4 devices after 2 steps: params {_max_abs_diff(s1.params, s4.params):.3g}"
  )


def test_padded_samples_do_not_contribute():
  """Changing audio inside the padded region changes neither the loss nor the update."""
  setup = helpers.train_setup(4)
  batch = helpers.step_batch()
  noisy = dict(batch)
  rng = np.random.default_rng(7)
  noisy["audio"] = np.where(
    batch["padding_mask"], 50 * rng.standard_normal(batch["audio"].shape), batch["audio"]
  ).astype(np.float32)
  assert (noisy["audio"] != batch["audio"]).sum() > 10_000
  (s_a, (m_a,)), (s_b, (m_b,)) = (setup.run(b, 1) for b in (batch, noisy))
  for k in ("loss", "grad_norm", "target_var", "pred_var", "num_masked"):
    np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-6, err_msg=k)
  for u, v in zip(jax.tree.leaves(s_a.params), jax.tree.leaves(s_b.params), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-9)
  for u, v in zip(jax.tree.leaves(s_a.teacher), jax.tree.leaves(s_b.teacher), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("row", [1, 2])
def test_padding_is_actually_exercised(row):
  """Guards the fixture: rows 1 and 2 are padded at the frame level too."""
  frames = audio.output_lengths(helpers.STEP_VALID[row])
  assert 0 < frames < audio.output_lengths(helpers.STEP_LENGTH)
