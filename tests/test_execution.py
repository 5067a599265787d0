"""How the step runs, not what it computes (issue 7 item 3; `transformer.Execution`, loop.py).

- Fused attention (`jax.nn.dot_product_attention`) gives the explicit path's output, with padding
  and biases; with attention dropout in training the explicit path runs.
- Rematerialisation ("full", "dots") and fused attention leave a data2vec 1.0 and a 2.0
  pretraining step's losses and updates unchanged, while "full" really shrinks the backward
  pass's temporary memory (XLA's own count of the compiled gradient). Blocks still require
  `train`, which nn.remat needs positional; remat covers the speech CNN too.
- A bfloat16 step keeps float32 parameters, optimiser state, targets and loss, and its loss
  stays near float32's.
- A whole run (`train_and_evaluate`: data, steps, logging, checkpoints) makes no implicit
  host-device transfer, and `loop.profile_first_step` leaves a profiler trace.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import trace as trace_summary
from configs import image as image_config
from d2v_jax import loop, train
from d2v_jax.models import audio, transformer, v2_layers
from tests import helpers, multihost_config


def qkv(seed: int, batch=2, length=7, heads=4, head_dim=8):
  rng = np.random.default_rng(seed)
  return [
    jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in "qkv"
  ]


def attend_module(**kwargs):
  """`transformer.attend` inside a module (its dropout is a submodule)."""
  from flax import linen as nn

  class Attend(nn.Module):
    @nn.compact
    def __call__(self, q, k, v, padding_mask, bias, train):
      return transformer.attend(q, k, v, padding_mask, bias, train=train, **kwargs)

  return Attend()


@pytest.mark.parametrize("bias_shape", [None, (4, 7, 7), (2, 4, 7, 7), (1, 4, 7, 7)])
def test_fused_attention_matches_the_explicit_path(bias_shape):
  q, k, v = qkv(0)
  padding = jnp.asarray(np.arange(7)[None, :] >= np.array([[7], [4]]))  # row 1: 3 padded keys
  bias = None if bias_shape is None else jax.random.normal(jax.random.key(1), bias_shape)
  outputs = [
    attend_module(dropout=0.1, fused=fused).apply({}, q, k, v, padding, bias, False)
    for fused in (False, True)
  ]
  np.testing.assert_allclose(outputs[1], outputs[0], atol=2e-6)


def test_fused_attention_is_used_only_without_attention_dropout(monkeypatch):
  calls = []
  fused_kernel = jax.nn.dot_product_attention
  monkeypatch.setattr(
    jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(1) or fused_kernel(*a, **kw)
  )
  q, k, v = qkv(2)
  rngs = {"dropout": jax.random.key(3)}
  explicit = attend_module(dropout=0.5, fused=False).apply({}, q, k, v, None, None, True, rngs=rngs)
  fused = attend_module(dropout=0.5, fused=True).apply({}, q, k, v, None, None, True, rngs=rngs)
  assert not calls  # dropout on in training: the explicit path, with the same dropout draw
  np.testing.assert_array_equal(fused, explicit)
  attend_module(dropout=0.0, fused=True).apply({}, q, k, v, None, None, True)
  attend_module(dropout=0.5, fused=True).apply({}, q, k, v, None, None, False)
  assert len(calls) == 2


def test_remat_policy_names_are_checked():
  with pytest.raises(ValueError, match="config.model.remat='some'"):
    transformer.execution_from_config({"remat": "some"})
  assert transformer.execution_from_config({}) == transformer.Execution("none", False)


def small_config(version: int, **model_fields):
  """A 2-block image model of width 32 on 16² images (v1 or v2) with `model_fields` set."""
  config = image_config.get_config(f"variant=tiny,version={version}")
  config.model.update(image_size=16, num_layers=2, dim=32, num_heads=4, mlp_dim=64)
  if version == 2:
    config.model.decoder.update(dim=16, layers=2)
    config.masking.num_clones = 2
  config.model.update(model_fields)
  config.targets.top_k = 2
  config.input.batch_size = 4
  config.loop.total_steps = 10
  config.optim.update(lr=1e-3, warmup_steps=0)
  return config


@functools.cache
def run_steps(version: int, num_steps: int = 2, **model_fields):
  """(losses, final state on host) of `num_steps` jitted pretraining steps on a fixed batch."""
  config = small_config(version, **model_fields)
  model, tx, schedule, make_state = train.build(config)
  state = jax.jit(make_state)()
  step = jax.jit(train.step_builder(config)(model, tx, schedule, config))
  batch = {"image": np.asarray(helpers.image_batch()["image"][:4])}
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, batch, jax.random.key(5))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


@pytest.mark.parametrize(
  "version, fields",
  [
    (1, dict(remat="full")),
    (2, dict(remat="dots")),
    (1, dict(fused_attention=True)),  # with BEiT's relative position bias
    (2, dict(fused_attention=True)),  # on the student's kept patches
  ],
  ids=str,
)
def test_execution_choices_leave_the_step_unchanged(version, fields):
  want_losses, want = run_steps(version)
  losses, got = run_steps(version, **fields)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for path, x in jax.tree_util.tree_leaves_with_path(got.params):
    y = functools.reduce(lambda t, p: t[p.key], path, want.params)
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize(
  "block, sizes",
  [(transformer.Block, dict(mlp_dim=32)), (v2_layers.AltBlock, {})],
  ids=["Block", "AltBlock"],
)
def test_blocks_require_train(block, sizes, remat):
  """`train` is positional for nn.remat, yet a call without it fails instead of evaluating."""
  module = transformer.block_class(block, transformer.Execution(remat))(num_heads=2, **sizes)
  x = jnp.ones((2, 5, 16))
  params = module.init(jax.random.key(0), x, None, None, False)
  with pytest.raises(TypeError, match=f"{block.__name__} needs train="):
    module.apply(params, x, None)


def test_full_remat_shrinks_the_backward_pass_memory():
  """XLA's temporary buffer count of the encoder's compiled gradient, 6 blocks of width 64."""

  def temp_bytes(remat: str) -> int:
    encoder = transformer.Encoder(
      num_layers=6, num_heads=4, mlp_dim=256, execution=transformer.Execution(remat)
    )
    x = jnp.ones((8, 64, 64))
    params = encoder.init(jax.random.key(0), x, None, train=False)

    def loss(p):
      return jnp.sum(encoder.apply(p, x, None, train=False)[0] ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, full = temp_bytes("none"), temp_bytes("full")
  assert full < 0.6 * none, (full, none)


def test_remat_covers_the_speech_cnn():
  """The CNN feature encoder is rematerialised layer by layer: same parameter names and
  gradients, and ("full") less temporary memory of its compiled gradient (61 % here)."""
  audio_batch = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8000)), jnp.float32)

  def gradient(remat: str):
    cnn = audio.FeatureExtractor(64, remat=remat)
    params = cnn.init(jax.random.key(0), audio_batch)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(cnn.apply(p, audio_batch) ** 2)))
    temp = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
    return grad(params), temp

  want, none_temp = gradient("none")
  for remat in ("full", "dots"):
    got, temp = gradient(remat)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    if remat == "full":
      assert temp < 0.7 * none_temp, (temp, none_temp)


def test_bfloat16_step_keeps_float32_state_and_a_close_loss():
  want_losses, _ = run_steps(1)
  losses, state = run_steps(1, dtype="bfloat16")
  leaves = jax.tree.leaves((state.params, state.teacher, state.opt_state))
  floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert np.isfinite(losses[0]) and losses[0] == pytest.approx(want_losses[0], rel=0.05)


def test_a_run_makes_no_implicit_transfers_and_traces_the_chosen_steps(tmp_path, monkeypatch):
  """`loop.run` steps under `jax.transfer_guard("disallow")`: the whole run passes, and a step
  that sneaks in a host value fails at once."""
  config = multihost_config.get_config()
  config.loop.update(total_steps=3, profile_first_step=2, profile_steps=1)
  last = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(last["loss"])
  traces = list(pathlib.Path(tmp_path, "run", "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  total, count = trace_summary.op_times(traces[0])  # bench/trace.py reads it: the step's ops
  step_ops = {op: ns for (module, op), ns in total.items() if "step" in module}
  assert step_ops and sum(step_ops.values()) > 0

  jit_step = loop.jit_step

  def leaky_jit_step(*args, **kwargs):
    step = jit_step(*args, **kwargs)
    return lambda state, batch, key: step(
      state, {**batch, "image": np.asarray(batch["image"])}, key
    )

  monkeypatch.setattr(loop, "jit_step", leaky_jit_step)
  config.loop.update(total_steps=1, profile_first_step=0)
  with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed .*transfer"):
    train.train_and_evaluate(config, str(tmp_path / "leaky"))
