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
from flax import traverse_util
from safetensors import numpy as safetensors_numpy

from configs import workdir as workdir_config
from d2v_jax import (
  checkpoint,
  finetune_steps,
  losses,
  masking_v2,
  pretrained,
  steps,
  teacher,
  train,
)
from d2v_jax.convert import files, workdir
from d2v_jax.models import finetune as finetune_models

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "fairseq"
FORWARD_TOL = 1e-4
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module", params=["audio_v1", "text_v1", "image_v1"])
def imported(request, tmp_path_factory):
  """(config, model, restored train state, fairseq's outputs, conversion report)."""
  out = tmp_path_factory.mktemp(request.param) / "run"
  report = workdir.import_checkpoint(FIXTURES / f"{request.param}.pt", out)
  config = workdir_config.get_config(str(out))
  model, _, _, make_state = train.build(config)  # the file's vocabulary, not a tokenizer's
  state = checkpoint.Checkpointer(out, config).restore(0, checkpoint.abstract_state(make_state))
  reference = dict(np.load(FIXTURES / f"{request.param}.npz"))
  return config, model, state, reference, report


def _ours(config, model, state, reference):
  """Our tensors for fairseq's batch and mask, under the fixture's names. Speech: the mask
  replaces frames by the mask embedding; text: the student reads fairseq's masked ids and the
  teacher the clean ones, as our step does."""
  mask = jnp.asarray(reference["input/mask"])
  if config.modality == "text":
    inputs = jnp.asarray(reference["input/target_tokens"])
    student_inputs = jnp.asarray(reference["input/src_tokens"])
    padding, embedding_mask = inputs == config.model.pad_id, None
  elif config.modality == "image":  # BEiT's NCHW images, its mask over the patch grid
    inputs = student_inputs = jnp.asarray(reference["input/images"].transpose(0, 2, 3, 1))
    padding, embedding_mask = None, mask
  else:
    inputs = student_inputs = jnp.asarray(reference["input/source"])
    padding, embedding_mask = jnp.zeros(inputs.shape, bool), mask
  variables = {"params": state.params}
  clean_tokens, clean_padding = model.apply(
    variables, inputs, padding, train=False, method=model.embed
  )
  _, clean = model.apply(
    variables, clean_tokens, clean_padding, None, train=False, method=model.encode
  )
  tokens, token_padding = model.apply(
    variables, student_inputs, padding, train=False, method=model.embed
  )
  x, _ = model.apply(
    variables, tokens, token_padding, embedding_mask, train=False, method=model.encode
  )
  pred = model.apply(variables, x, method=model.predict)
  y = steps.teacher_targets(model, config, state.teacher, inputs, padding, tokens, token_padding)
  if token_padding is None:  # images are never padded
    token_padding = clean_padding = jnp.zeros(mask.shape, bool)
  weights = mask & ~token_padding
  scale = None if config.loss.scale < 0 else config.loss.scale
  loss, _ = losses.regression_loss(
    pred, y, weights, beta=config.loss.beta, scale=scale, reduce_dims=config.loss.reduce_dims
  )
  # Block outputs at the tokens (BEiT's layer results leave out the CLS token, which ours lead).
  out = {
    f"out/layer/{i}": layer["block"][:, layer["block"].shape[1] - mask.shape[1] :]
    for i, layer in enumerate(clean["layers"])
  }
  out = {k: np.where(~np.asarray(clean_padding)[..., None], v, 0.0) for k, v in out.items()}
  where = np.asarray(mask)
  # fairseq's text model returns padded rows' outputs at padded positions too: compare valid ones.
  valid = ~np.asarray(token_padding)[..., None]
  out |= {
    "out/masked_final": np.where(valid, x, 0.0),
    "out/targets": np.asarray(y)[where],  # fairseq's order: row-major over (B, T)
    "out/pred": np.asarray(pred)[where],
    "loss": loss,
  }
  return jax.device_get(out)


def test_encoder_targets_and_head_equal_fairseqs(imported):
  config, model, state, reference, _ = imported
  ours = _ours(config, model, state, reference)
  padded = (
    np.asarray(reference["input/target_tokens"] == config.model.pad_id)[..., None]
    if (config.modality == "text")
    else False
  )
  for name in [k for k in reference if k.startswith("out/") and k not in _SCALARS]:
    want = reference[name]
    if want.ndim == 3:  # [B, T, D]: padded positions hold no output of ours
      want = np.where(padded, 0.0, want)
    np.testing.assert_allclose(ours[name], want, atol=FORWARD_TOL, err_msg=name)


_SCALARS = ("out/loss_sum", "out/sample_size", "out/loss")


def test_first_loss_equals_fairseqs(imported):
  """The imported run's loss on fairseq's batch, mask and teacher is fairseq's: the regression
  head was carried over and the file's recipe (top-K, norms, loss) read from its config."""
  config, model, state, reference, _ = imported
  ours = _ours(config, model, state, reference)
  if "out/loss" in reference:  # BEiT's: the mean over masked tokens and dimensions
    fairseq_loss = float(reference["out/loss"])
  else:  # fairseq's: the sum over masked positions (scaled), per position
    fairseq_loss = float(reference["out/loss_sum"]) / float(reference["out/sample_size"])
  np.testing.assert_allclose(float(ours["loss"]), fairseq_loss, rtol=LOSS_RTOL)


def test_conversion_json_lists_the_head_and_the_recipe(imported):
  """The head is listed as kept, not dropped, and each recipe field says where it came from:
  the fixtures use values other than this project's recipes, so a default would show."""
  config, _, _, _, report = imported
  head = {"audio": "final_proj.", "text": "encoder.regression_head.", "image": "lm_head."}[
    config.modality
  ]
  assert report["kept"] and all(key.startswith(head) for key in report["kept"])
  assert not any(line.startswith(head) for line in report["dropped"])
  rows = {row["field"]: row for row in report["recipe"]}
  if config.modality == "image":  # data2vec_vision's argparse recipe
    assert rows["targets.top_k"]["file"] == "[1, 2]" and config.targets.top_k == 2
    assert rows["loss.beta"]["ours"] == config.loss.beta == 2.0
    assert rows["masking.masked_patches"]["ours"] == config.masking.masked_patches == 20
    assert config.targets.final_norm == "layer"
    return
  assert rows["targets.top_k"] == {
    "field": "targets.top_k",
    "file": 2,
    "ours": 2,
    "from": "cfg.model.average_top_k_layers",
  }
  if config.modality == "audio":
    assert rows["loss.scale"]["file"] is None and rows["loss.scale"]["ours"] == -1.0
    assert rows["ema.decay"]["ours"] == config.ema.decay == 0.998
    assert rows["masking.length"]["ours"] == config.masking.length == 5
    assert rows["targets.layer_norm"]["ours"] == "instance"
  else:
    assert rows["loss.beta"]["ours"] == config.loss.beta == 4.0
    assert rows["ema.anneal_steps"]["ours"] == config.ema.anneal_steps == 300
    assert rows["targets.layer_norm"]["ours"] == "layer"
    assert rows["masking.span_prob"]["from"] == "cfg.task.mask_prob"
  json.dumps(report)  # conversion.json holds it


@pytest.fixture(scope="module", params=["audio_v2", "image_v2", "text_v2"])
def imported_v2(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param) / "run"
  report = workdir.import_checkpoint(FIXTURES / f"{request.param}.pt", out)
  config = workdir_config.get_config(str(out))
  model, _, _, make_state = train.build(config)
  state = checkpoint.Checkpointer(out, config).restore(0, checkpoint.abstract_state(make_state))
  reference = dict(np.load(FIXTURES / f"{request.param}.npz"))
  return config, model, state, reference, report, request.param


def test_v2_encoder_equals_fairseqs(imported_v2):
  """The student's context encoder on the unmasked input: the final output (images: without
  the CLS token) and every main block's FFN output (the targets' source) at valid positions."""
  config, model, state, reference, _, _ = imported_v2
  assert config.version == 2
  inputs = reference["input/source"]
  if config.modality == "image":
    inputs, padding = inputs.transpose(0, 2, 3, 1), None  # fairseq's NCHW -> our NHWC
  elif config.modality == "text":
    padding = reference["input/padding_mask"]
  else:
    padding = np.zeros(inputs.shape, bool)
  variables = {"params": state.params}

  def encode(inputs, padding):
    tokens, token_padding = model.apply(variables, inputs, padding, train=False, method=model.embed)
    final, aux = model.apply(variables, tokens, token_padding, train=False, method=model.encode)
    return final, aux, token_padding

  final, aux, token_padding = jax.device_get(encode(jnp.asarray(inputs), padding))
  valid = np.ones(final.shape[:2], bool) if token_padding is None else ~token_padding
  np.testing.assert_allclose(final[valid], reference["out/final"][valid], atol=FORWARD_TOL)
  main = [k for k in reference if k.startswith("out/ffn/")]
  layers = aux["layers"][len(aux["layers"]) - len(main) :]  # fairseq's: the main blocks only
  for i, layer in enumerate(layers):
    want = reference[f"out/ffn/{i}"]
    want = want[:, want.shape[1] - valid.shape[1] :]  # images: fairseq's rows lead with CLS
    np.testing.assert_allclose(layer["ffn"][valid], want[valid], atol=FORWARD_TOL, err_msg=str(i))


def _v2_inputs(config, reference):
  """(inputs, padding) of fairseq's batch in our layout."""
  inputs = reference["input/source"]
  if config.modality == "image":
    return jnp.asarray(inputs.transpose(0, 2, 3, 1)), None  # fairseq's NCHW -> our NHWC
  if config.modality == "text":
    return jnp.asarray(inputs), jnp.asarray(reference["input/padding_mask"])
  return jnp.asarray(inputs), jnp.zeros(inputs.shape, bool)


def test_v2_loss_equals_fairseqs(imported_v2):
  """fairseq's training forward with fixed masks (`precomputed_mask`, one per clone): our
  step's computation on the same masks (one teacher pass, clones, the student on the kept
  tokens, the decoder at every position) gives its predictions and targets at the masked
  positions and its regression loss."""
  config, model, state, reference, _, _ = imported_v2
  inputs, padding = _v2_inputs(config, reference)
  masks = jnp.asarray(reference["input/masks"])  # [B·M, N]
  num_clones = config.masking.num_clones
  v2mask = masking_v2.from_mask(masks, int(masks.shape[1] - masks[0].sum()))
  variables = {"params": state.params}

  def forward(inputs, padding):
    tokens, token_padding = model.apply(variables, inputs, padding, train=False, method=model.embed)
    if token_padding is None:
      token_padding = jnp.zeros(tokens.shape[:2], bool)
    y = steps.teacher_targets(model, config, state.teacher, inputs, padding, tokens, token_padding)
    clones = masking_v2.clone_batch(tokens, num_clones)
    clone_padding = masking_v2.clone_batch(token_padding, num_clones)
    x, _ = model.apply(
      variables, clones, clone_padding, v2mask.keep_ids, train=False, method=model.encode
    )
    pred = model.apply(
      variables,
      x,
      v2mask,
      clone_padding,
      train=False,
      rngs={"noise": jax.random.key(0)},  # the fixtures' mask noise is 0
      method=model.decode,
    )
    target = masking_v2.clone_batch(y, num_clones)
    weights = v2mask.mask & ~clone_padding
    loss, _ = losses.regression_loss(
      pred, target, weights, beta=0.0, scale=config.loss.scale, reduce_dims="sum"
    )
    return pred, target, weights, loss

  pred, target, weights, loss = jax.device_get(forward(inputs, padding))
  assert config.model.mask_noise_std == 0.0
  want_pred, want_target = reference["out/pred"], reference["out/targets"]
  loss_sum = float(reference["out/loss_sum"])
  if "out/alone/pred" in reference:  # a padded sample: fairseq on its valid tokens alone
    alone = len(reference["out/alone/pred"])  # its clones' masked positions, which come last
    want_pred = np.concatenate([want_pred[:-alone], reference["out/alone/pred"]])
    want_target = np.concatenate([want_target[:-alone], reference["out/alone/targets"]])
    scale = config.loss.scale if config.loss.scale is not None else want_pred.shape[-1] ** -0.5
    batched_tail = np.sum(
      np.square(reference["out/pred"][-alone:] - reference["out/targets"][-alone:])
    )
    loss_sum += float(reference["out/alone/loss_sum"]) - float(batched_tail) * scale
  np.testing.assert_allclose(pred[weights], want_pred, atol=FORWARD_TOL)
  np.testing.assert_allclose(target[weights], want_target, atol=FORWARD_TOL)
  fairseq_loss = loss_sum / float(reference["out/sample_size"])
  np.testing.assert_allclose(float(loss), fairseq_loss, rtol=LOSS_RTOL)


def test_v2_teacher_is_imported_as_fairseq_stored_it(imported_v2):
  """With `ema_encoder_only=True` (fairseq's default; speech and text here) `_ema` holds the
  blocks only: they land in the teacher's blocks, and the rest of the teacher is the student's
  and stays so (`copy_params`). Otherwise (images) the whole teacher is fairseq's EMA."""
  config, _, state, _, report, _ = imported_v2
  copied = traverse_util.flatten_dict(
    teacher.copy_mask(state.teacher, config.ema.copy_params), sep="/"
  )
  student = traverse_util.flatten_dict(state.params, sep="/")
  blocks_only = report["recipe"] and {r["field"]: r for r in report["recipe"]}["ema.copy_params"]
  assert blocks_only["file"] is (config.modality != "image")
  for path, value in traverse_util.flatten_dict(state.teacher, sep="/").items():
    from_ema = path.startswith("encoder/blocks/layer_") or not blocks_only["file"]
    assert copied[path] == (not from_ema), path
    same = np.array_equal(np.asarray(value), np.asarray(student[path]))
    assert same == (not from_ema), path  # fairseq's EMA (re-drawn), not the student
  rows = {row["field"]: row for row in report["recipe"]}
  assert rows["masking.num_clones"]["ours"] == config.masking.num_clones


def test_v2_export_returns_fairseqs_own_file(imported_v2, tmp_path):
  """`convert export` of the imported 2.0 run gives back fairseq's state dict, every key and
  tensor, the teacher's `_ema` included; its cfg rebuilds the same model (fairseq's own
  Data2VecMultiModel loads the file with strict=True: make_fairseq_fixtures.py --check-export)."""
  config, name = imported_v2[0], imported_v2[-1]
  written, ours, theirs = _export_round_trip(name, tmp_path)
  model_cfg, file_cfg = ours["cfg"]["model"], theirs["cfg"]["model"]
  for field in ("depth", "embed_dim", "num_heads", "mlp_ratio", "ema_encoder_only", "clone_batch"):
    assert model_cfg[field] == file_cfg[field], field
  mod, file_mod = model_cfg["modalities"][config.modality], file_cfg["modalities"][config.modality]
  for field in ("prenet_depth", "mask_prob", "mask_length", "inverse_mask"):
    assert mod[field] == file_mod[field], field
  for field in ("decoder_dim", "decoder_kernel", "decoder_layers", "decoder_groups"):
    assert mod["decoder"][field] == file_mod["decoder"][field], field
  if config.modality == "audio":
    for field in ("conv_pos_depth", "conv_pos_groups", "conv_pos_width"):
      assert mod[field] == file_mod[field], field
  assert written["supported_modality"] == config.modality.upper()
  tensors = safetensors_numpy.load_file(tmp_path / "export" / "model.safetensors")
  flat_theirs = traverse_util.flatten_dict(theirs["model"], sep="/")
  assert sorted(tensors) == sorted(k.replace("/", ".", 1) for k in flat_theirs)


def _export_round_trip(name, tmp_path):
  """(what export wrote, our checkpoint.pt, fairseq's file) after import then export of
  fixture `name`; asserts that every key and tensor of fairseq's state dict came back."""
  run_dir = tmp_path / "run"
  workdir.import_checkpoint(FIXTURES / f"{name}.pt", run_dir)
  written = workdir.export_checkpoint(run_dir, tmp_path / "export")
  ours = files.load_torch_file(tmp_path / "export" / workdir.FAIRSEQ_CHECKPOINT)
  theirs = files.load_torch_file(FIXTURES / f"{name}.pt")
  for part in ("model", "model_ema"):  # BEiT's files keep the teacher beside the model
    if part not in theirs:
      continue
    flat_ours = traverse_util.flatten_dict(ours[part], sep="/")
    flat_theirs = traverse_util.flatten_dict(theirs[part], sep="/")
    assert sorted(flat_ours) == sorted(flat_theirs)
    for key, value in flat_theirs.items():
      np.testing.assert_allclose(flat_ours[key], value, atol=1e-6, err_msg=f"{part}/{key}")
  return written, ours, theirs


_V1_CFG_FIELDS = {
  "audio_v1": (
    "conv_feature_layers",
    "encoder_layers",
    "encoder_embed_dim",
    "encoder_attention_heads",
    "conv_pos",
    "pos_conv_depth",
    "average_top_k_layers",
    "instance_norm_target_layer",
    "ema_decay",
    "mask_length",
  ),
  "image_v1": ("target_layers", "l1_beta", "layer_scale_init_value", "post_target_layer_norm"),
  "text_v1": (
    "head_layers",
    "average_top_k_layers",
    "layer_norm_target_layer",
    "loss_beta",
    "loss_scale",
    "ema_anneal_end_step",
    "ema_transformer_layers_only",
  ),
}


@pytest.mark.parametrize("name", sorted(_V1_CFG_FIELDS))
def test_v1_export_also_writes_fairseqs_layout(name, tmp_path):
  """A 1.0 run exports to HF and to its released layout (fairseq's `Data2VecAudioModel` /
  `Data2VecTextModel`, data2vec_vision's BEiT): the round trip of the original code's own file
  returns it key for key (regression head and EMA teacher included), and its recipe fields
  are the file's (the original loads it with strict=True: make_fairseq_fixtures.py
  --check-export)."""
  written, ours, theirs = _export_round_trip(name, tmp_path)
  assert written["architectures"][0].startswith("Data2Vec")  # the HF directory, as before
  assert (tmp_path / "export" / "model.safetensors").is_file()
  recipe = ("args",) if name == "image_v1" else ("cfg", "model")  # data2vec_vision: argparse
  ours_cfg, their_cfg = ours, theirs
  for key in recipe:
    ours_cfg, their_cfg = ours_cfg[key], their_cfg[key]
  for field in _V1_CFG_FIELDS[name]:
    assert ours_cfg[field] == their_cfg[field], field
  if name == "text_v1":
    encoder = ("embed_dim", "ffn_embed_dim", "layers", "attention_heads", "learned_pos")
    for field in encoder:
      want = theirs["cfg"]["model"]["transformer"]["encoder"][field]
      assert ours["cfg"]["model"]["transformer"]["encoder"][field] == want, field


def test_fine_tuned_ctc_exports_to_fairseqs_layout(tmp_path):
  """A CTC fine-tuning run exports to HF and to fairseq's `Wav2VecCtc` layout: the round trip
  of fairseq's own file returns every tensor but the mask embedding, which its config never
  uses (mask_prob 0) and the import leaves out (listed as dropped); fairseq loads the export
  with strict=True (make_fairseq_fixtures.py --check-export)."""
  report = workdir.import_checkpoint(FIXTURES / "ctc_v1.pt", tmp_path / "run")
  assert any(line.startswith("w2v_encoder.w2v_model.mask_emb") for line in report["dropped"])
  workdir.export_checkpoint(tmp_path / "run", tmp_path / "export")
  ours = files.load_torch_file(tmp_path / "export" / workdir.FAIRSEQ_CHECKPOINT)
  theirs = files.load_torch_file(FIXTURES / "ctc_v1.pt")
  assert sorted(ours["model"]) == sorted(theirs["model"])
  for key, value in theirs["model"].items():
    if not key.endswith("mask_emb"):
      np.testing.assert_allclose(ours["model"][key], value, atol=1e-6, err_msg=key)
  encoder = ours["cfg"]["model"]["w2v_args"]["model"]
  want = theirs["cfg"]["model"]["w2v_args"]["model"]
  for field in ("conv_feature_layers", "encoder_layers", "encoder_embed_dim", "conv_pos"):
    assert encoder[field] == want[field], field


def test_fine_tuned_ctc_logits_equal_fairseqs(tmp_path):
  """fairseq's own `Wav2VecCtc` over a data2vec encoder (the released `*_960h.pt` layout):
  imported as our CTC fine-tuning model, its logits equal fairseq's at valid frames."""
  report = workdir.import_checkpoint(FIXTURES / "ctc_v1.pt", tmp_path / "run")
  assert report["mode"] == "finetune" and report["head"]["task"] == "ctc"
  config = workdir_config.get_config(str(tmp_path / "run"))
  run = pretrained.load_pretrained(tmp_path / "run")
  model = finetune_models.build_finetune_model("audio", config.model, config.head)
  reference = dict(np.load(FIXTURES / "ctc_v1.npz"))
  batch = {
    "audio": jnp.asarray(reference["input/source"]),
    "padding_mask": jnp.asarray(reference["input/padding_mask"]),
  }
  logits, frame_padding = jax.device_get(
    jax.jit(finetune_steps.make_predict(model, "audio"))(run.params, batch)
  )
  np.testing.assert_array_equal(frame_padding, reference["out/frame_padding"])
  np.testing.assert_allclose(logits[0], reference["out/logits"][0], atol=FORWARD_TOL)
  # The padded row against fairseq on its valid samples alone (see the generator: fairseq's
  # positional conv lets padding leak into valid frames, ours does not).
  alone = reference["out/logits_row1_alone"]
  np.testing.assert_allclose(logits[1, : len(alone)], alone, atol=FORWARD_TOL)
  assert frame_padding[1, len(alone) :].all()
