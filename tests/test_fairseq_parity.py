"""Imports of checkpoints written by fairseq's own data2vec code equal fairseq (issue 24).

`tests/fixtures/fairseq/<name>.pt` was built, saved and run by fairseq's model classes
(`make_fairseq_fixtures.py` says how, at which commit); `<name>.npz` holds fairseq's outputs on
a fixed batch and mask. Here the file is imported with `python -m d2v_jax.convert import`'s code
(no torch, no fairseq), the work directory's own config and state are read back as a resumed
run reads them, and our encoder, teacher targets, regression head and loss are compared with
fairseq's: the forward to 1e-4, the loss to 1e-5 relative.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import workdir as workdir_config
from d2v_jax import checkpoint, losses, steps, train
from d2v_jax.convert import workdir

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "fairseq"
FORWARD_TOL = 1e-4
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module", params=["audio_v1"])
def imported(request, tmp_path_factory):
  """(config, model, restored train state, fairseq's outputs, conversion report)."""
  out = tmp_path_factory.mktemp(request.param) / "run"
  report = workdir.import_checkpoint(FIXTURES / f"{request.param}.pt", out)
  config = workdir_config.get_config(str(out))
  model, _, _, make_state = train.setup(config)
  state = checkpoint.Checkpointer(out, config).restore(0, checkpoint.abstract_state(make_state))
  reference = dict(np.load(FIXTURES / f"{request.param}.npz"))
  return config, model, state, reference, report


def _ours(config, model, state, reference):
  """Our tensors for fairseq's batch and mask, under the fixture's names."""
  inputs = jnp.asarray(reference["input/source"])
  padding = jnp.zeros(inputs.shape, bool)
  mask = jnp.asarray(reference["input/mask"])
  variables = {"params": state.params}
  tokens, token_padding = model.apply(variables, inputs, padding, train=False, method=model.embed)
  _, clean = model.apply(variables, tokens, token_padding, None, train=False, method=model.encode)
  x, _ = model.apply(variables, tokens, token_padding, mask, train=False, method=model.encode)
  pred = model.apply(variables, x, method=model.predict)
  y = steps.teacher_targets(model, config, state.teacher, inputs, padding, tokens, token_padding)
  weights = mask & ~token_padding
  scale = None if config.loss.scale < 0 else config.loss.scale
  loss, _ = losses.regression_loss(
    pred, y, weights, beta=config.loss.beta, scale=scale, reduce_dims=config.loss.reduce_dims
  )
  out = {f"out/layer/{i}": layer["block"] for i, layer in enumerate(clean["layers"])}
  where = np.asarray(mask)
  out |= {
    "out/masked_final": x,
    "out/targets": np.asarray(y)[where],  # fairseq's order: row-major over (B, T)
    "out/pred": np.asarray(pred)[where],
    "loss": loss,
  }
  return jax.device_get(out)


def test_encoder_targets_and_head_equal_fairseqs(imported):
  config, model, state, reference, _ = imported
  ours = _ours(config, model, state, reference)
  for name in [k for k in reference if k.startswith("out/") and k not in _SCALARS]:
    np.testing.assert_allclose(ours[name], reference[name], atol=FORWARD_TOL, err_msg=name)


_SCALARS = ("out/loss_sum", "out/sample_size")


def test_first_loss_equals_fairseqs(imported):
  """The imported run's loss on fairseq's batch, mask and teacher is fairseq's: the regression
  head was carried over and the file's recipe (top-K, norms, loss) read from its config."""
  config, model, state, reference, _ = imported
  ours = _ours(config, model, state, reference)
  fairseq_loss = float(reference["out/loss_sum"]) / float(reference["out/sample_size"])
  np.testing.assert_allclose(float(ours["loss"]), fairseq_loss, rtol=LOSS_RTOL)


def test_conversion_json_lists_the_head_and_the_recipe(imported):
  config, _, _, _, report = imported
  assert report["kept"] == ["final_proj.weight", "final_proj.bias"]
  assert not any(line.startswith("final_proj") for line in report["dropped"])
  rows = {row["field"]: row for row in report["recipe"]}
  assert rows["targets.top_k"] == {
    "field": "targets.top_k",
    "file": 2,
    "ours": 2,
    "from": "cfg.model.average_top_k_layers",
  }
  assert rows["loss.scale"]["file"] is None and rows["loss.scale"]["ours"] == -1.0
  assert rows["ema.decay"]["ours"] == config.ema.decay == 0.998
  assert rows["masking.length"]["ours"] == config.masking.length == 5
  assert rows["targets.layer_norm"]["ours"] == "instance"
  json.dumps(report)  # conversion.json holds it
