"""Tests for d2v_jax/teacher.py: decay schedule, copy vs EMA, and the teacher after a real step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import audio as audio_config
from d2v_jax import teacher
from tests import helpers

AUDIO_EMA = dict(decay=0.999, end_decay=0.9999, anneal_steps=30_000)  # spec §1.4


def fairseq_decay(step, decay, end_decay, anneal_steps):
  """data2vec_audio.set_num_updates + get_annealed_rate."""
  if decay == end_decay:
    return end_decay
  if step >= anneal_steps:
    return end_decay
  r = end_decay - decay
  pct_remaining = 1 - step / anneal_steps
  return end_decay - r * pct_remaining


@pytest.mark.parametrize(
  "step,want",
  [
    (0, 0.999),
    (15_000, 0.99945),
    (7_500, 0.999225),
    (30_000, 0.9999),
    (29_999, None),
    (45_000, 0.9999),
    (10**7, 0.9999),
  ],
)
def test_ema_decay_audio_schedule(step, want):
  got = float(teacher.ema_decay(step, **AUDIO_EMA))
  ref = fairseq_decay(step, **AUDIO_EMA)
  if want is not None:
    assert ref == pytest.approx(want, abs=1e-12)
  assert got == pytest.approx(ref, abs=1e-7)


def test_ema_decay_is_linear_and_monotone_under_jit():
  steps = jnp.arange(0, 40_000, 500)
  got = np.asarray(jax.jit(jax.vmap(lambda s: teacher.ema_decay(s, **AUDIO_EMA)))(steps))
  want = [fairseq_decay(int(s), **AUDIO_EMA) for s in steps]
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert (np.diff(got) >= 0).all()


def test_ema_decay_constant_cases():
  assert float(teacher.ema_decay(123, decay=0.9998, end_decay=0.9998, anneal_steps=1000)) == (
    pytest.approx(0.9998)
  )
  assert float(teacher.ema_decay(0, decay=0.9998, end_decay=0.9998, anneal_steps=0)) == (
    pytest.approx(0.9998)
  )
  assert float(teacher.ema_decay(5, decay=0.99, end_decay=0.999, anneal_steps=0)) == (
    pytest.approx(0.999)
  )


def toy_params():
  rng = np.random.default_rng(0)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "frontend": {"projection": {"kernel": arr(4, 3)}},
    "mask_emb": arr(3),
    "encoder": {
      "pos_conv": {"conv_0": {"kernel": arr(5, 1, 3), "bias": arr(3)}},
      "layer_norm": {"scale": arr(3), "bias": arr(3)},
      "blocks": {"layer_00": {"fc1": {"kernel": arr(3, 6), "bias": arr(6)}}},
    },
    "final_proj": {"kernel": arr(3, 3), "bias": arr(3)},
  }


def test_init_teacher_is_an_exact_copy_of_the_encoder_only():
  params = toy_params()
  t = teacher.init_teacher(params, ("encoder",))
  assert set(t) == {"encoder"}
  assert jax.tree.structure(t["encoder"]) == jax.tree.structure(params["encoder"])
  for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(params["encoder"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="teacher_params"):
    teacher.init_teacher(params, ("decoder",))


def test_ema_update_moves_ema_leaves_and_copies_pos_conv():
  config = audio_config.get_config()
  names = tuple(config.ema.teacher_params)
  student = toy_params()
  t_old = teacher.init_teacher(student, names)
  # The student moves (as after an optimiser step).
  new_student = jax.tree.map(lambda p: p + 0.5 + p**2, student)
  copied = teacher.copy_mask(t_old, config.ema.copy_params)
  assert helpers.flat(copied) == {
    "encoder/pos_conv/conv_0/kernel": True,
    "encoder/pos_conv/conv_0/bias": True,
    "encoder/layer_norm/scale": False,
    "encoder/layer_norm/bias": False,
    "encoder/blocks/layer_00/fc1/kernel": False,
    "encoder/blocks/layer_00/fc1/bias": False,
  }
  tau = 0.75
  t_new = jax.jit(lambda t, s, d: teacher.ema_update(t, s, d, names=names, copied=copied))(
    t_old, new_student, jnp.float32(tau)
  )
  assert set(t_new) == {"encoder"}
  old, new, stu = helpers.flat(t_old), helpers.flat(t_new), helpers.flat(new_student)
  for k in old:
    s = stu[k]
    if "/pos_conv/" in k:
      np.testing.assert_array_equal(new[k], s, err_msg=k)
    else:
      np.testing.assert_allclose(new[k], tau * old[k] + (1 - tau) * s, rtol=1e-6, err_msg=k)
      assert not np.allclose(new[k], s) and not np.allclose(new[k], old[k])


def test_ema_update_keeps_teacher_float32_for_bf16_students():
  student = toy_params()
  t = teacher.init_teacher(student, ("encoder",))
  low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), student)
  copied = teacher.copy_mask(t, ())
  out = teacher.ema_update(t, low, 0.5, names=("encoder",), copied=copied)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_teacher_after_one_real_train_step():
  """Spec §1.4: after a step the student's CNN moved, the teacher has no CNN, its blocks and
  encoder LN moved by exactly (1−τ)(student_new − teacher_old), and pos_conv is the student's."""
  setup = helpers.train_setup(4)
  state0 = setup.state0
  state1, (metrics,) = setup.run(helpers.step_batch(), 1)
  tau = float(metrics["ema_decay"])
  assert tau == pytest.approx(setup.config.ema.decay)  # step 0

  assert set(state1.teacher) == {"encoder"}  # no frontend, mask_emb or final_proj
  p0, p1 = helpers.flat(state0.params), helpers.flat(state1.params)
  for k in p0:
    if k.startswith(("frontend/", "encoder/", "final_proj/")) or k == "mask_emb":
      assert not np.array_equal(p0[k], p1[k]), f"student leaf {k} did not move"

  t0, t1 = helpers.flat(state0.teacher), helpers.flat(state1.teacher)
  assert set(t0) == {k for k in p0 if k.startswith("encoder/")}
  for k in t0:
    s1 = p1[k]
    if k.startswith("encoder/pos_conv/"):
      np.testing.assert_array_equal(t1[k], s1, err_msg=k)
      continue
    moved = t1[k] - t0[k]  # exact in float32 (nearby values)
    want = (1 - np.float64(tau)) * (s1.astype(np.float64) - t0[k])
    # The move is a few ulps of the larger leaves: allow the rounding of τ·t + (1−τ)·s (~1.5 ulp).
    ulp = np.spacing(np.abs(t0[k]).astype(np.float32))
    np.testing.assert_array_less(np.abs(moved - want), 2 * ulp + 1e-12, err_msg=k)
    assert np.abs(moved).max() > 0, k
