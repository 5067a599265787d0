"""Tests for d2v_jax/optim.py: schedules vs fairseq's formulas, Adam, decay mask, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import audio as audio_config
from d2v_jax import optim
from tests import helpers


class FairseqTriStage:
  """fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py (phase_ratio form), verbatim logic."""

  def __init__(self, peak, max_update, phase_ratio, init_lr_scale, final_lr_scale):
    self.peak_lr = peak
    self.init_lr = init_lr_scale * peak
    self.final_lr = final_lr_scale * peak
    self.warmup_steps = int(max_update * phase_ratio[0])
    self.hold_steps = int(max_update * phase_ratio[1])
    self.decay_steps = int(max_update * phase_ratio[2])
    self.warmup_rate = (
      (self.peak_lr - self.init_lr) / self.warmup_steps if self.warmup_steps != 0 else 0
    )
    self.decay_factor = -math.log(final_lr_scale) / self.decay_steps

  def _decide_stage(self, update_step):
    if update_step < self.warmup_steps:
      return 0, update_step
    offset = self.warmup_steps
    if update_step < offset + self.hold_steps:
      return 1, update_step - offset
    offset += self.hold_steps
    if update_step <= offset + self.decay_steps:
      return 2, update_step - offset
    offset += self.decay_steps
    return 3, update_step - offset

  def lr(self, num_updates):
    stage, steps_in_stage = self._decide_stage(num_updates)
    if stage == 0:
      return self.init_lr + self.warmup_rate * steps_in_stage
    if stage == 1:
      return self.peak_lr
    if stage == 2:
      return self.peak_lr * math.exp(-self.decay_factor * steps_in_stage)
    return self.final_lr


@pytest.mark.parametrize(
  "peak,total,phases,init,final",
  [
    (5e-4, 1000, (0.03, 0.9, 0.07), 0.01, 0.01),  # audio pretraining (spec §1.5)
    (5e-5, 1300, (0.1, 0.4, 0.5), 0.01, 0.05),  # audio CTC fine-tuning (spec §1.6)
    (3e-4, 777, (0.25, 0.25, 0.5), 0.1, 0.001),
  ],
)
def test_tri_stage_matches_fairseq(peak, total, phases, init, final):
  schedule = optim.tri_stage_schedule(
    peak,
    total,
    warmup_frac=phases[0],
    hold_frac=phases[1],
    decay_frac=phases[2],
    init_lr_scale=init,
    final_lr_scale=final,
  )
  ref = FairseqTriStage(peak, total, phases, init, final)
  steps = np.arange(total + 50)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps))
  want = np.array([ref.lr(int(s)) for s in steps])
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_tri_stage_key_values_audio_base():
  """0.01·peak at the start, peak after 3% warm-up, hold 90%, decay to 0.01·peak, then flat."""
  config = audio_config.get_config("variant=base")
  total = config.loop.total_steps
  assert total == 400_000
  tx_lr = optim.make_schedule(config.optim, total)
  peak = config.optim.lr
  warm, hold = 12_000, 360_000
  checks = {
    0: 0.01 * peak,
    warm // 2: (0.01 + 0.99 / 2) * peak,
    warm: peak,
    warm + hold - 1: peak,
    warm + hold: peak,
    warm + hold + 14_000: peak * 0.01**0.5,  # halfway through the decay: geometric mean
    total: 0.01 * peak,
    total + 1: 0.01 * peak,
    10 * total: 0.01 * peak,
  }
  for step, want in checks.items():
    assert float(tx_lr(step)) == pytest.approx(want, rel=1e-4), step
  assert float(tx_lr(warm - 1)) < peak


def test_cosine_schedule_formula():
  peak, total, warmup, end = 2e-4, 1000, 100, 1e-6
  schedule = optim.cosine_schedule(peak, total, warmup_steps=warmup, end_lr=end)
  steps = np.arange(0, total + 100)
  got = np.asarray(jax.jit(jax.vmap(schedule))(steps))

  def ref(s):
    if s < warmup:
      return peak * s / warmup
    t = min(s - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))

  np.testing.assert_allclose(got, [ref(int(s)) for s in steps], rtol=1e-5, atol=1e-12)
  assert got[0] == 0.0 and got[warmup] == pytest.approx(peak)
  assert got[total] == pytest.approx(end) and got[-1] == pytest.approx(end)


def test_make_schedule_kinds_and_errors():
  cfg = audio_config.get_config().optim
  cfg.schedule = "constant"
  assert float(optim.make_schedule(cfg, 10)(7)) == pytest.approx(cfg.lr)
  cfg.schedule = "cosine"
  cfg.warmup_steps = 5
  assert float(optim.make_schedule(cfg, 10)(5)) == pytest.approx(cfg.lr)
  cfg.schedule = "linear"
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(cfg, 10)
  cfg.schedule = "constant"
  cfg.name = "sgd"
  with pytest.raises(ValueError, match="adam"):
    optim.make_optimizer(cfg, 10)


def _shapes():
  model = helpers.tiny_model()
  x = jnp.zeros((1, helpers.INIT_LENGTH))
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), x, jnp.zeros(x.shape, bool), train=False)["params"]
  )


def test_decay_mask_without_1d_excludes_biases_norms_and_mask_emb():
  mask = helpers.flat(optim.decay_mask(_shapes(), decay_1d=False))
  mask = {k: bool(v) for k, v in mask.items()}
  no_decay = {k for k, v in mask.items() if not v}
  expected_no_decay = {k for k in mask if k.endswith(("/bias", "/scale")) or k == "mask_emb"}
  assert no_decay == expected_no_decay, (
    f"decayed but should not be: {sorted(expected_no_decay - no_decay)}; "
    f"not decayed but should be: {sorted(no_decay - expected_no_decay)}"
  )
  assert all(mask[k] for k in mask if k.endswith("/kernel"))


def test_decay_mask_with_1d_decays_everything():
  mask = optim.decay_mask(_shapes(), decay_1d=True)
  assert all(bool(v) for v in jax.tree.leaves(mask))


def _opt_cfg(**overrides):
  cfg = audio_config.get_config().optim
  cfg.update(overrides)
  return cfg


def test_decoupled_weight_decay_and_mask_take_effect():
  """Zero gradients: Adam's step is 0, so only the decoupled decay p ← p − lr·wd·p remains."""
  cfg = _opt_cfg(schedule="constant", lr=0.1, weight_decay=0.5, decay_1d=False)
  tx, _ = optim.make_optimizer(cfg, 100)
  params = {
    "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
    "ln": {"scale": jnp.ones(2)},
  }
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(new["dense"]["kernel"]), 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["dense"]["bias"]), 1.0)
  np.testing.assert_array_equal(np.asarray(new["ln"]["scale"]), 1.0)


def test_adam_matches_a_numpy_reference_for_three_steps():
  """Audio pretraining optimiser: β (0.9, 0.98), eps 1e-6, wd 0.01, tri-stage LR, no clipping."""
  cfg = _opt_cfg()
  total = 200
  tx, schedule = optim.make_optimizer(cfg, total)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(4, 3))
  params = {"w": jnp.asarray(p, jnp.float32)}
  state = tx.init(params)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  phases = (cfg.warmup_frac, cfg.hold_frac, cfg.decay_frac)
  ref_lr = FairseqTriStage(cfg.lr, total, phases, 0.01, 0.01)
  for t in range(3):
    g = rng.normal(size=p.shape) * 10.0 ** (t - 1)
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    m = cfg.b1 * m + (1 - cfg.b1) * g
    v = cfg.b2 * v + (1 - cfg.b2) * g**2
    m_hat, v_hat = m / (1 - cfg.b1 ** (t + 1)), v / (1 - cfg.b2 ** (t + 1))
    lr = ref_lr.lr(t)
    assert float(schedule(t)) == pytest.approx(lr, rel=1e-5)
    p = p - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * p)
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5, atol=1e-7)


def _first_moment_norm(state):
  return float(optax.tree.norm(optax.tree_utils.tree_get(state, "mu")))


@pytest.mark.parametrize("clip_norm,grad_scale", [(1.0, 10.0), (1.0, 0.25), (0.0, 10.0)])
def test_clipping_by_global_norm(clip_norm, grad_scale):
  """After one step Adam's first moment is (1 − β1)·g_clipped, so it exposes the clipped norm."""
  cfg = _opt_cfg(clip_norm=clip_norm)
  tx, _ = optim.make_optimizer(cfg, 100)
  rng = np.random.default_rng(1)
  params = {"a": jnp.zeros((5, 4)), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  grads = jax.tree.map(lambda g: g * grad_scale / optax.tree.norm(grads), grads)  # norm = scale
  _, state = tx.update(grads, tx.init(params), params)
  want = min(grad_scale, clip_norm) if clip_norm > 0 else grad_scale
  assert _first_moment_norm(state) == pytest.approx((1 - cfg.b1) * want, rel=1e-5)


def test_decay_mask_no_decay_patterns_exclude_matching_paths():
  params = {
    "encoder": {"rel_pos_bias": {"table": jnp.zeros((7, 2))}, "fc": {"kernel": jnp.zeros((3, 3))}},
    "frontend": {"table": jnp.zeros((4, 4))},
  }
  mask = helpers.flat(optim.decay_mask(params, decay_1d=False, no_decay=(r"rel_pos_bias/table$",)))
  assert mask == {
    "encoder/rel_pos_bias/table": False,
    "encoder/fc/kernel": True,
    "frontend/table": True,
  }
  # Patterns win over decay_1d=True too.
  mask = helpers.flat(optim.decay_mask(params, decay_1d=True, no_decay=(r"^frontend/",)))
  assert not mask["frontend/table"] and mask["encoder/rel_pos_bias/table"]
