"""Config values are checked at start-up (issue 23): every numeric field has a range."""

import importlib
import json

import pytest

from configs import audio as audio_config
from configs import audio_ctc as audio_ctc_config
from d2v_jax import config_check, finetune, train

CONFIGS = ("audio", "image", "text", "audio_ctc", "audio_cls", "image_cls", "text_cls")
ARGS = ("", "variant=base", "variant=large", "version=2", "variant=base,version=2")


def _shipped_configs():
  for name in CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    for arg in ARGS:
      try:
        yield f"{name}:{arg}", module.get_config(arg)
      except ValueError:  # a variant or version the modality does not have
        continue


def test_every_numeric_field_of_every_shipped_config_has_a_range_it_meets():
  seen = 0
  for name, config in _shipped_configs():
    for path in config_check.numeric_fields(config):
      assert config_check.rule_for(path) is not None, f"{name}: config.{path} has no range"
      seen += 1
    config_check.validate(config)  # the shipped values are in range
  assert seen > 1000


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("loop.log_every", 0, r"config.loop.log_every=0 is out of range: use an integer >= 1"),
    ("loop.checkpoint_every", 0, r"loop.checkpoint_every=0 .* integer >= 1"),
    ("loop.total_steps", -5, r"loop.total_steps=-5"),
    ("loop.keep_checkpoints", 0, r"loop.keep_checkpoints=0"),
    ("optim.lr", -1.0, r"config.optim.lr=-1.0 is out of range: use a number > 0"),
    ("ema.decay", 1.5, r"ema.decay=1.5 .* >= 0 and <= 1"),
    ("masking.prob", 1.5, r"masking.prob=1.5"),
    ("model.dropout", 1.0, r"model.dropout=1.0 .* < 1"),
    ("input.crop_lengths", (4000, 0), r"input.crop_lengths=\(4000, 0\)"),
  ],
)
def test_out_of_range_values_stop_pretraining_before_anything_is_built(
  tmp_path, field, value, message
):
  config = audio_config.get_config()
  group, name = field.split(".")
  with config.unlocked():
    config[group][name] = value
  with pytest.raises(config_check.ConfigError, match=message):
    train.train_and_evaluate(config, tmp_path)
  assert not any(tmp_path.iterdir())  # refused before the work directory was touched


def test_fine_tuning_configs_are_checked_too(tmp_path):
  config = audio_ctc_config.get_config()
  with config.unlocked():
    config.head.dropout = -0.1
  with pytest.raises(config_check.ConfigError, match=r"config.head.dropout=-0.1"):
    finetune.finetune_and_evaluate(config, tmp_path)


def test_sentinels_and_ranges_read_as_they_are_written():
  rule = config_check.rule_for("loss.scale")
  assert rule.holds(-1) and rule.holds(None) and rule.holds(0.5) and not rule.holds(0.0)
  assert config_check.rule_for("optim.warmup_frac").describe() == "a number >= 0 and <= 1"
  assert not config_check.rule_for("loop.total_steps").holds(2.5)
  assert not config_check.rule_for("optim.lr").holds(float("nan"))


def test_resume_refuses_structure_changes_and_lists_the_others(tmp_path):
  config = audio_config.get_config()
  assert config_check.record(tmp_path, config, resuming=False, write=True) == []
  train.write_config(tmp_path, config)
  with config.unlocked():
    config.input.batch_size = 16
    config.optim.lr = 1e-3
  changes = config_check.record(tmp_path, config, resuming=True, write=True)
  assert changes == ["input.batch_size: 8 -> 16", "optim.lr: 0.0005 -> 0.001"]
  history = [json.loads(row) for row in (tmp_path / "config_history.jsonl").open()]
  assert [row["config"]["input"]["batch_size"] for row in history] == [8, 16]
  with config.unlocked():
    config.optim.name = "sgd"
  with pytest.raises(config_check.ConfigError, match=r"optim.name: 'adam' -> 'sgd'"):
    config_check.record(tmp_path, config, resuming=True, write=True)
