"""Tests for d2v_jax/optim.py: schedules vs fairseq's formulas, Adam, decay mask, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import audio as audio_config
from configs import image as image_config
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


def test_linear_schedule_formula():
  """fairseq polynomial_decay (power 1): 0 -> peak over the warm-up, then a line to end_lr."""
  peak, total, warmup, end = 1e-4, 100, 6, 0.0
  schedule = jax.jit(jax.vmap(optim.linear_schedule(peak, total, warmup_steps=warmup, end_lr=end)))
  steps = np.arange(0, total + 10)
  want = [
    peak * s / warmup if s < warmup else max(peak * (total - s) / (total - warmup), end)
    for s in steps
  ]
  np.testing.assert_allclose(np.asarray(schedule(steps)), want, rtol=1e-5, atol=1e-10)


def test_make_schedule_kinds_and_errors():
  cfg = audio_config.get_config().optim
  cfg.schedule = "constant"
  assert float(optim.make_schedule(cfg, 10)(7)) == pytest.approx(cfg.lr)
  cfg.schedule = "cosine"
  cfg.warmup_steps = 5
  assert float(optim.make_schedule(cfg, 10)(5)) == pytest.approx(cfg.lr)
  cfg.schedule = "exponential"
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


# --- Fine-tuning (spec §1.6): layer-wise LR decay and frozen parameters. ---


def test_layer_id_for_every_kind_of_path():
  """BEiT's grouping for L = 12: embeddings 0, block i → i + 1, everything else (and the shared
  relative-position table, as BEiT's `rel_pos_bias` rule) L + 1."""
  want = {
    # Vision.
    "frontend/patch_embed/projection/kernel": 0,
    "frontend/patch_embed/projection/bias": 0,
    "encoder/cls_token": 0,
    "mask_emb": 0,
    "encoder/rel_pos_bias/table": 13,
    "encoder/blocks/layer_00/attention/query/kernel": 1,
    "encoder/blocks/layer_00/gamma_1": 1,
    "encoder/blocks/layer_05/fc1/bias": 6,
    "encoder/blocks/layer_11/ffn_norm/scale": 12,
    "encoder/final_norm/scale": 13,
    "fc_norm/scale": 13,
    "head/kernel": 13,
    "final_proj/kernel": 13,
    # Text.
    "frontend/token_embed/embedding": 0,
    "frontend/position_embed/embedding": 0,
    "frontend/embed_norm/scale": 0,
    # Audio.
    "frontend/feature_extractor/conv_0/kernel": 0,
    "frontend/feature_norm/bias": 0,
    "frontend/projection/kernel": 0,
    "encoder/pos_conv/conv_4/kernel": 0,
    "encoder/layer_norm/scale": 0,
    # A backbone nested under a fine-tuning wrapper keeps its ids.
    "backbone/encoder/blocks/layer_03/fc2/kernel": 4,
    "backbone/frontend/patch_embed/projection/kernel": 0,
    # Names that only look alike are not blocks or embeddings.
    "head/blocks/layer_00/kernel": 13,
    "head/frontend_proj/kernel": 13,
  }
  got = {path: optim.layer_id(path, 12) for path in want}
  assert got == want
  with pytest.raises(ValueError, match="num_layers=12"):
    optim.layer_id("encoder/blocks/layer_12/fc1/kernel", 12)


def _finetune_params():
  """A 2-block ViT-like tree with every group: embeddings, blocks, top (rel-pos, norm, head)."""
  rng = np.random.default_rng(3)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "frontend": {"patch_embed": {"projection": {"kernel": arr(4, 3), "bias": arr(3)}}},
    "encoder": {
      "cls_token": arr(3),
      "rel_pos_bias": {"table": arr(5, 2)},
      "blocks": {
        "layer_00": {"fc1": {"kernel": arr(3, 3), "bias": arr(3)}},
        "layer_01": {"fc1": {"kernel": arr(3, 3), "bias": arr(3)}},
      },
      "final_norm": {"scale": arr(3)},
    },
    "mask_emb": arr(3),
    "head": {"kernel": arr(3, 2), "bias": arr(2)},
  }


def test_layer_decay_scales_by_hand():
  """L = 2, decay 0.5: scale = 0.5 ** (3 − id)."""
  scales = helpers.flat(optim.layer_decay_scales(_finetune_params(), 2, 0.5))
  assert {k: float(v) for k, v in scales.items()} == {
    "frontend/patch_embed/projection/kernel": 0.125,
    "frontend/patch_embed/projection/bias": 0.125,
    "encoder/cls_token": 0.125,
    "mask_emb": 0.125,
    "encoder/blocks/layer_00/fc1/kernel": 0.25,
    "encoder/blocks/layer_00/fc1/bias": 0.25,
    "encoder/blocks/layer_01/fc1/kernel": 0.5,
    "encoder/blocks/layer_01/fc1/bias": 0.5,
    "encoder/rel_pos_bias/table": 1.0,
    "encoder/final_norm/scale": 1.0,
    "head/kernel": 1.0,
    "head/bias": 1.0,
  }


def _vision_opt_cfg(**overrides):
  cfg = image_config.get_config().optim
  cfg.update(schedule="constant", lr=0.1)
  cfg.update(overrides)
  return cfg


def _updates(tx, grads_seq, params):
  """The updates of `tx` for each gradient in turn, all taken at the same `params`."""
  state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    out.append(helpers.flat(updates))
  return out


def test_layer_decay_update_is_scale_times_the_plain_update():
  """Adam's moments do not depend on the LR, so at fixed params every update, the decoupled
  decay included (wd 0.05 on the kernels), is exactly scale × the update without layer decay."""
  params = _finetune_params()
  rng = np.random.default_rng(4)
  grads_seq = [
    jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for _ in range(3)
  ]
  plain_tx, _ = optim.make_optimizer(_vision_opt_cfg(), 10)
  decay_tx, _ = optim.make_optimizer(_vision_opt_cfg(layer_decay=0.5), 10, num_layers=2)
  scales = helpers.flat(optim.layer_decay_scales(params, 2, 0.5))
  plain_seq, decayed_seq = (_updates(tx, grads_seq, params) for tx in (plain_tx, decay_tx))
  for plain, decayed in zip(plain_seq, decayed_seq, strict=True):
    for name, scale in scales.items():
      np.testing.assert_array_equal(decayed[name], np.float32(scale) * plain[name], err_msg=name)
  assert not np.array_equal(plain["head/kernel"], plain["encoder/blocks/layer_00/fc1/kernel"])


def test_layer_decay_config_errors():
  with pytest.raises(ValueError, match="num_layers"):
    optim.make_optimizer(_vision_opt_cfg(layer_decay=0.65), 10)
  with pytest.raises(ValueError, match="layer_decay"):
    optim.make_optimizer(_vision_opt_cfg(layer_decay=1.5), 10, num_layers=2)


def test_fine_tuning_fields_at_their_defaults_change_nothing():
  """Explicit defaults give plain AdamW: the same state layout and bit-identical updates."""
  params = _finetune_params()
  grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
  defaults = dict(layer_decay=1.0, freeze=(), freeze_steps=0, freeze_until_patterns=("^encoder/",))
  txs = [optim.make_optimizer(_vision_opt_cfg(**kw), 10)[0] for kw in ({}, defaults)]
  states = [tx.init(params) for tx in txs]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  a, b = (_updates(tx, [grads, grads], params) for tx in txs)
  for name in a[1]:
    np.testing.assert_array_equal(a[1][name], b[1][name])


def _leaves_by_name(tree):
  """{'a/b/c': np.ndarray}; unlike `helpers.flat`, an empty `MaskedNode` contributes nothing."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in leaves}


def _adam_states(state):
  """{param path: (mu, nu, count)} over every Adam in an optimiser state.

  A leaf that no Adam tracks (its placeholder in the state is an empty `MaskedNode`) is absent.
  """
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  out = {}
  for adam in jax.tree.leaves(state, is_leaf=is_adam):
    if not is_adam(adam):
      continue
    mu, nu = _leaves_by_name(adam.mu), _leaves_by_name(adam.nu)
    for name in mu:
      assert name not in out, f"{name} has two Adam states"
      out[name] = (mu[name], nu[name], int(adam.count))
  return out


def _freeze_cfg(**overrides):
  """Audio fine-tuning style: the CNN frozen, the encoder held for 3 updates; the LR warms up
  over the first 10 of 20 updates, so the step an update belongs to shows in its size."""
  cfg = _opt_cfg(
    lr=0.1,
    warmup_frac=0.5,
    hold_frac=0.2,
    decay_frac=0.3,
    init_lr_scale=0.1,
    weight_decay=0.05,
    decay_1d=True,
    freeze=("^frontend/feature_extractor/",),
    freeze_steps=3,
    freeze_until_patterns=("^encoder/",),
  )
  cfg.update(overrides)
  return cfg


def _audio_like_params():
  rng = np.random.default_rng(5)

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  return {
    "frontend": {"feature_extractor": {"conv_0": {"kernel": arr(4, 1, 3)}}, "proj": arr(3)},
    "encoder": {"blocks": {"layer_00": {"fc1": {"kernel": arr(3, 3), "bias": arr(3)}}}},
    "head": {"kernel": arr(3, 2)},
  }


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_frozen_and_delayed_leaves(layer_decay):
  """Steps 0-2: only `frontend/proj` and the head move; the CNN never; the encoder from step 3,
  its first move being a fresh Adam's first step (bias correction restarted) at the global LR
  (× its layer-decay scale: block 0 of 1 → layer_decay ** 1)."""
  cfg = _freeze_cfg(layer_decay=layer_decay)
  tx, schedule = optim.make_optimizer(cfg, 20, num_layers=1)
  params = _audio_like_params()
  rng = np.random.default_rng(6)

  @helpers.fast_jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  history = [helpers.flat(params)]
  adam_history = [_adam_states(state)]
  grads_seq = []
  for _ in range(6):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    grads_seq.append(helpers.flat(grads))
    params, state = step(params, state, grads)
    history.append(helpers.flat(params))
    adam_history.append(_adam_states(state))

  cnn = "frontend/feature_extractor/conv_0/kernel"
  enc, head = "encoder/blocks/layer_00/fc1/kernel", "head/kernel"
  for t in range(1, 7):
    np.testing.assert_array_equal(history[t][cnn], history[0][cnn])
    assert not np.allclose(history[t][head], history[t - 1][head])
    assert not np.allclose(history[t]["frontend/proj"], history[t - 1]["frontend/proj"])
    for name in (enc, "encoder/blocks/layer_00/fc1/bias"):
      moved = not np.array_equal(history[t][name], history[t - 1][name])
      assert moved == (t > 3), (name, t)
  # The CNN has no optimiser state at all; the encoder's Adam sits at its init while frozen.
  assert cnn not in adam_history[-1]
  for t in range(4):
    mu, nu, count = adam_history[t][enc]
    assert count == 0 and not mu.any() and not nu.any(), t
  assert adam_history[4][enc][2] == 1 and adam_history[6][enc][2] == 3
  assert adam_history[6][head][2] == 6
  # First encoder update (step 3): m̂ = g, v̂ = g², so Δ = −lr(3)·(g / (|g| + eps) + wd·p).
  g, p = grads_seq[3][enc], history[3][enc]
  lr = float(schedule(3))
  assert lr != pytest.approx(float(schedule(0)))
  want = p - layer_decay * lr * (g / (np.abs(g) + cfg.eps) + cfg.weight_decay * p)
  np.testing.assert_allclose(history[4][enc], want, rtol=1e-6, atol=1e-7)


def test_clipping_norm_leaves_out_frozen_gradients():
  """fairseq's frozen parameters have no gradient, so the clipping norm is the head's alone:
  huge CNN and encoder gradients must not shrink the head's (norm 0.5 < clip 1)."""
  tx, _ = optim.make_optimizer(_freeze_cfg(clip_norm=1.0), 20)
  params = _audio_like_params()
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 100.0), params)
  grads["frontend"]["proj"] = jnp.zeros(3)
  grads["head"]["kernel"] = jnp.full((3, 2), 0.5 / math.sqrt(6))
  _, state = tx.update(grads, tx.init(params), params)
  mu = _adam_states(state)["head/kernel"][0]
  assert float(np.linalg.norm(mu)) == pytest.approx((1 - 0.9) * 0.5, rel=1e-5)


def test_freeze_config_errors():
  with pytest.raises(ValueError, match="freeze: '\\^frontend/cnn/' matches no parameter"):
    tx, _ = optim.make_optimizer(_freeze_cfg(freeze=("^frontend/cnn/",)), 20)
    tx.init(_audio_like_params())
  with pytest.raises(ValueError, match="freeze_until_patterns"):
    optim.make_optimizer(_freeze_cfg(freeze_until_patterns=()), 20)
  with pytest.raises(ValueError, match="freeze_steps"):
    optim.make_optimizer(_freeze_cfg(freeze_steps=-1), 20)
  with pytest.raises(ValueError, match="tuple of regexes"):
    optim.make_optimizer(_opt_cfg(freeze="^frontend/feature_extractor/"), 20)


def test_groups_of_the_tiny_audio_model():
  """The real parameter names: CNN, projection, pos-conv and encoder LN are the embedding
  group; block i is i + 1; the pretraining head is on top. `freeze` takes exactly the CNN."""
  shapes = _shapes()
  ids = {k: optim.layer_id(k, 2) for k in helpers.flat(shapes)}
  for name, got in ids.items():
    if name.startswith(("frontend/", "encoder/pos_conv/", "encoder/layer_norm/", "mask_emb")):
      assert got == 0, name
    elif name.startswith("encoder/blocks/layer_"):
      assert got == int(name.split("/")[2][-2:]) + 1, name
    else:
      assert name.startswith("final_proj/") and got == 3, name
  assert set(ids.values()) == {0, 1, 2, 3}
  labels = helpers.flat(optim.freeze_labels(shapes, ("^frontend/feature_extractor/",)))
  frozen = {k for k, v in labels.items() if v == "frozen"}
  assert frozen == {k for k in labels if k.startswith("frontend/feature_extractor/")}
  assert len(frozen) == 7 * 3  # 7 conv kernels, 7 LayerNorm scales and biases
  assert {str(v) for v in labels.values()} == {"frozen", "train"}
