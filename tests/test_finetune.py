"""Fine-tuning: pretrained weights into each task model, the step's freezing, the run end to end."""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from configs import audio_cls, audio_ctc, image_cls, text_cls
from d2v_jax import checkpoint, finetune, pretrained
from d2v_jax.models import finetune as finetune_models
from tests import helpers


def _pretraining_run(tmp_path, modality: str):
  """(pretraining workdir, its config) with the cached tiny test parameters of `modality`."""
  config, params = {
    "audio": (helpers.tiny_config, helpers.tiny_params),
    "image": (helpers.image_step_config, helpers.image_params),
    "text": (helpers.text_step_config, helpers.text_params),
  }[modality]
  workdir = tmp_path / f"{modality}_pretrain"
  helpers.save_pretraining_checkpoint(workdir, config(), params())
  return workdir, config()


def _finetune_config(modality: str, task: str = "") -> ml_collections.ConfigDict:
  config = {
    ("audio", "ctc"): audio_ctc.get_config,
    ("audio", "classify"): audio_cls.get_config,
    ("image", "classify"): image_cls.get_config,
    ("text", "classify"): text_cls.get_config,
  }[(modality, task or ("ctc" if modality == "audio" else "classify"))]()
  return config


CASES = [("audio", "ctc"), ("audio", "classify"), ("image", "classify"), ("text", "classify")]


@pytest.mark.parametrize("modality,task", CASES)
def test_pretrained_encoder_is_loaded_and_the_head_is_fresh(tmp_path, modality, task):
  workdir, pretrain_config = _pretraining_run(tmp_path, modality)
  config = _finetune_config(modality, task)
  config.init.pretrained = str(workdir)
  run = finetune.load_pretrained_into_config(config)
  finetune.fit_input_to_model(config)
  # The sizes come from the pretraining run, the dropouts stay the fine-tuning config's.
  assert config.model.dim == pretrain_config.model.dim
  assert config.model.num_layers == pretrain_config.model.num_layers
  config.head.num_outputs = 7
  _, _, _, make_state, fresh = finetune.setup(config, run)
  state = fresh()
  loaded, source = helpers.flat(state.params), helpers.flat(run.params)
  encoder_keys = [k for k in loaded if k.split("/")[0] in pretrained.ENCODER_GROUPS]
  assert encoder_keys and all(np.array_equal(loaded[k], source[k]) for k in encoder_keys)
  assert not any(k.startswith("final_proj") for k in loaded)  # the regression head is dropped
  head = [k for k in loaded if k.startswith("head/")]
  assert head and all(k not in source for k in head)
  assert ("mask_emb" in loaded) == (modality == "audio")  # speech keeps masking time steps
  # A fresh state without pretraining has the same structure (what resume restores onto).
  shapes = jax.eval_shape(make_state)
  assert jax.tree.structure(shapes.params) == jax.tree.structure(state.params)


def test_vision_drops_the_encoder_final_norm_for_the_pooled_head(tmp_path):
  workdir, _ = _pretraining_run(tmp_path, "image")
  config = _finetune_config("image")
  config.init.pretrained = str(workdir)
  run = finetune.load_pretrained_into_config(config)
  config.head.num_outputs = 3
  _, _, _, _, fresh = finetune.setup(config, run)
  params = helpers.flat(fresh().params)
  assert "encoder/final_norm/scale" not in params and "head/norm/scale" in params


def test_mismatched_weights_list_every_offending_key():
  config = ml_collections.ConfigDict(helpers.image_step_config().model.to_dict())
  config.dim = 48  # the checkpoint (helpers.image_params) is 32 wide
  head = ml_collections.ConfigDict(
    dict(task="classify", num_outputs=3, dropout=0.0, layer_norm_eps=1e-6, init_scale=1.0)
  )
  model = finetune_models.build_finetune_model("image", config, head)
  size = config.image_size
  target = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), None)
  )["params"]
  with pytest.raises(ValueError) as error:
    pretrained.merge_encoder(target, helpers.image_params())
  message = str(error.value)
  assert "shape differs: frontend/patch_embed/projection/kernel" in message
  assert "encoder/blocks/layer_00/fc1/kernel" in message and "(32, 64), model (48, 64)" in message


def test_checkpoint_of_another_modality_is_refused(tmp_path):
  workdir, _ = _pretraining_run(tmp_path, "image")
  config = _finetune_config("text")
  config.init.pretrained = str(workdir)
  with pytest.raises(ValueError, match="holds a image model; this config fine-tunes text"):
    finetune.load_pretrained_into_config(config)


def test_missing_or_empty_checkpoint_path_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="No checkpoint under"):
    pretrained.load_pretrained(tmp_path)


def _tiny_text_finetune(total_steps: int) -> ml_collections.ConfigDict:
  config = text_cls.get_config()
  config.model.update(helpers.TEXT_SIZES)
  config.model.max_positions = helpers.TEXT_LENGTH
  config.input.update(
    max_length=helpers.TEXT_LENGTH, batch_size=8, eval_batch_size=64, max_train_examples=64
  )
  config.loop.update(
    total_steps=total_steps, log_every=1, checkpoint_every=2, keep_checkpoints=5, progress_bar=False
  )
  config.optim.warmup_steps = 1
  config.eval.every = 4
  return config


def test_text_run_from_pretraining_resumes_exactly_and_writes_its_scores(tmp_path):
  workdir, _ = _pretraining_run(tmp_path, "text")
  config = _tiny_text_finetune(total_steps=4)
  config.init.pretrained = str(workdir)
  straight = finetune.finetune_and_evaluate(config, tmp_path / "straight")

  interrupted = tmp_path / "interrupted"
  config = _tiny_text_finetune(total_steps=4)
  config.init.pretrained = str(workdir)
  finetune.finetune_and_evaluate(config, interrupted)
  shutil.rmtree(interrupted / "checkpoints" / "4")  # a crash after the step-2 checkpoint
  config = _tiny_text_finetune(total_steps=4)
  config.init.pretrained = str(workdir)
  resumed = finetune.finetune_and_evaluate(config, interrupted)
  assert resumed["accuracy"] == straight["accuracy"]
  scores = json.loads((interrupted / "eval.json").read_text())
  assert scores["step"] == 4 and scores["init"]["modality"] == "text"
  assert scores["examples"] == 5382  # every test verse
  rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
  assert any("dev_accuracy" in row for row in rows)


def test_a_finetuning_checkpoint_refuses_another_head(tmp_path):
  config = _tiny_text_finetune(total_steps=2)
  finetune.finetune_and_evaluate(config, tmp_path)
  config = _tiny_text_finetune(total_steps=4)
  config.head.task = "regress"
  ckpt = checkpoint.Checkpointer(tmp_path, config)
  config.head.num_outputs = 6
  with pytest.raises(ValueError, match="head.task: checkpoint has 'classify', config has 'regr"):
    ckpt.check_compatible(2)


@pytest.mark.parametrize("modality,task", [("audio", "ctc"), ("image", "classify")])
def test_data2vec2_encoder_fine_tunes_and_extracts(tmp_path, modality, task):
  """A data2vec 2.0 checkpoint: the fine-tuning model takes its local and context encoders
  (not the decoder; speech's mask embedding starts fresh), and the extractor reads it too."""
  from d2v_jax import extract
  from d2v_jax.models import data2vec2
  from tests import test_v2_audio, test_v2_image

  small = {"audio": test_v2_audio.small_config, "image": test_v2_image.small_config}[modality]
  pretrain_config = small()
  model = data2vec2.build_model(modality, pretrain_config.model)
  inputs = {
    "audio": (np.zeros((1, 8000), np.float32), np.zeros((1, 8000), bool)),
    "image": (np.zeros((1, 16, 16, 3), np.float32), None),
  }[modality]
  params = model.init(jax.random.key(0), *inputs)["params"]
  workdir = tmp_path / "v2_pretrain"
  helpers.save_pretraining_checkpoint(workdir, pretrain_config, params)

  config = _finetune_config(modality, task)
  config.init.pretrained = str(workdir)
  run = finetune.load_pretrained_into_config(config)
  assert config.version == 2
  config.head.num_outputs = 5
  _, _, _, _, fresh = finetune.setup(config, run)
  state = fresh()
  loaded, source = helpers.flat(state.params), helpers.flat(run.params)
  assert not any(k.startswith("decoder") for k in loaded)
  encoder_keys = [k for k in loaded if k.split("/")[0] in ("frontend", "encoder")]
  assert encoder_keys and all(np.array_equal(loaded[k], source[k]) for k in encoder_keys)
  assert ("mask_emb" in loaded) == (modality == "audio") and "mask_emb" not in source

  features = extract.Extractor(run)(*inputs)
  assert features.layers.shape[0] == pretrain_config.model.num_layers + 1
