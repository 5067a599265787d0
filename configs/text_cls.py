"""Text classification / regression fine-tuning, GLUE style (spec §1.6, "GLUE, v1").

    python main.py --config=configs/text_cls.py --workdir=runs/text_cls \
        --config.init.pretrained=runs/text_tiny
    python main.py --config=configs/text_cls.py:variant=base,task=rte --workdir=runs/rte \
        --config.init.pretrained=runs/text_base --config.input.tokenizer=/data/roberta_bpe

Arguments after the colon: `variant=tiny|base` and `task` (tiny: `genre`, the embedded verses'
six genres; base: a GLUE task of the spec's table, read from TFDS `glue/<task>`, or from TSV /
JSONL files with `--config.input.source=tsv --config.input.path=<dir>`). The head is RoBERTa's
(dense -> tanh -> out on `<s>`); Adam (0.9, 0.98), eps 1e-6, wd 0.1, linear warm-up then linear
decay (fairseq's polynomial_decay). Metrics: accuracy, plus the task's GLUE metric (MCC for
CoLA, F1 for MRPC/QQP, Pearson/Spearman for STS-B).
"""

import ml_collections

from configs import common, text
from d2v_jax.data.text_tasks import GLUE_TASKS

# task -> (batch, LR, warm-up updates, total updates): the spec's table (RoBERTa's GLUE runs).
_GLUE = {
  "mnli": (32, 1e-5, 7432, 123873),
  "qnli": (32, 1e-5, 1986, 33112),
  "qqp": (32, 1e-5, 28318, 113272),
  "sst2": (32, 1e-5, 1256, 20935),
  "cola": (16, 1e-5, 320, 5336),
  "mrpc": (16, 1e-5, 137, 2296),
  "rte": (16, 2e-5, 122, 2036),
  "stsb": (16, 2e-5, 214, 3598),
}
_EVAL_SPLITS = {"mnli": "validation_matched"}
# CPU recipe on the embedded genres: a higher LR for a small model and a short run.
_TINY = (32, 2e-4, 60, 600)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", task="genre")
  if arg.task == "genre":
    batch, lr, warmup, steps = _TINY
  elif arg.task in _GLUE:
    batch, lr, warmup, steps = _GLUE[arg.task]
  else:
    raise ValueError(f"Unknown task {arg.task!r}; known: genre, {', '.join(sorted(_GLUE))}")
  pretrain = text.get_config(f"variant={arg.variant}")
  config = common.finetune_config(pretrain, steps)
  config.model.update(dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.0))
  regress = arg.task == "stsb"
  config.head = ml_collections.ConfigDict(
    dict(task="regress" if regress else "classify", num_outputs=-1, dropout=0.0)
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=lr,
      b1=0.9,
      b2=0.98,
      eps=1e-6,
      weight_decay=0.1,
      decay_1d=True,  # fairseq's Adam decays every parameter
      no_decay=(),
      clip_norm=0.0,
      schedule="linear",
      warmup_steps=warmup,
      end_lr=0.0,
    )
  )
  glue = arg.task != "genre"
  config.input = ml_collections.ConfigDict(
    dict(
      source="tfds" if glue else "embedded",  # embedded | tsv | jsonl | tfds
      path=f"glue/{arg.task}" if glue else "",  # TFDS name, or the directory of <split>.tsv
      split="train",
      tfds_data_dir="",
      tokenizer=pretrain.input.tokenizer,  # the pretraining run's; "" = the embedded one
      text_fields=GLUE_TASKS[arg.task].text_fields if glue else ("sentence",),
      label_field="label",
      label_names=(),
      max_length=-1,  # tokens per row, <s> and </s> included; -1 = the model's positions
      batch_size=batch,
      eval_batch_size=batch,
      max_train_examples=0,  # > 0: a fixed class-stratified subset
      num_workers=0,
    )
  )
  config.eval.update(
    dict(
      every=200 if arg.variant == "tiny" else 2000,
      split=_EVAL_SPLITS.get(arg.task, "validation") if glue else "test",
      glue_task=arg.task if glue else "",
    )
  )
  return config
