"""Speech recognition fine-tuning with CTC on letters (spec §1.6, "Audio CTC").

    python main.py --config=configs/audio_ctc.py --workdir=runs/audio_ctc \
        --config.init.pretrained=runs/audio_tiny
    python main.py --config=configs/audio_ctc.py:variant=base,split=10h --workdir=runs/ctc_10h \
        --config.init.pretrained=runs/audio_base --config.input.source=manifest \
        --config.input.path=/data/librispeech_10h --config.eval.split=dev_other

Arguments after the colon: `variant=tiny|base|large` and `split=10m|1h|10h|100h|960h` (the
labelled-data recipes of the spec's table; base/large only). tiny fine-tunes on the embedded
sentences (90 train / 30 test, disjoint voices). The head is dropout + Linear(D -> letters + blank);
the CNN stays frozen, the whole pretrained model is frozen for the first `freeze_steps` updates
while the head learns, and fairseq's time and channel masks stay on. Greedy decoding; WER and CER.
"""

import ml_collections

from configs import audio, common

# split -> (LR, updates, time mask prob, channel mask prob, layerdrop, freeze updates), base.
_BASE = {
  "10m": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
  "1h": (5e-5, 13_000, 0.65, 0.25, 0.1, 10_000),
  "10h": (5e-5, 20_000, 0.65, 0.5, 0.05, 10_000),
  "100h": (3e-5, 80_000, 0.65, 0.5, 0.1, 0),
  "960h": (1e-4, 320_000, 0.5, 0.1, 0.1, 0),
}
# Large (`vox_*`): LR, updates, time mask; channel masks, layerdrop and freezing as base.
_LARGE = {
  "10m": (1e-4, 13_000, 0.65),
  "1h": (3e-4, 13_000, 0.75),
  "10h": (1e-4, 20_000, 0.75),
  "100h": (3e-5, 80_000, 0.5),
  "960h": (3e-5, 320_000, 0.5),
}
# CPU recipe on the embedded sentences: a higher LR and a short head-only phase.
_TINY = (2e-3, 400, 0.3, 0.1, 0.0, 40)


def _recipe(variant: str, split: str):
  if variant == "tiny":
    return _TINY
  if split not in _BASE:
    raise ValueError(f"Unknown split {split!r}; known: {sorted(_BASE)}")
  recipe = _BASE[split]
  if variant == "large":
    recipe = _LARGE[split] + recipe[3:]
  return recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny", split="10h")
  lr, steps, time_prob, channel_prob, layerdrop, freeze_steps = _recipe(arg.variant, arg.split)
  pretrain = audio.get_config(f"variant={arg.variant}")
  config = common.finetune_config(pretrain, steps)
  config.model.update(
    dict(
      dropout=0.0,
      attention_dropout=0.0,
      activation_dropout=0.1,
      layerdrop=layerdrop,
    )
  )
  config.head = ml_collections.ConfigDict(
    dict(task="ctc", num_outputs=-1, dropout=0.0)  # -1 = the letter vocabulary's size
  )
  config.masking = ml_collections.ConfigDict(
    dict(
      mask_prob=time_prob,
      mask_length=10,
      min_masks=2,
      channel_prob=channel_prob,
      channel_length=64,
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=lr,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.0,
      decay_1d=True,
      no_decay=(),
      clip_norm=0.0,
      schedule="tri_stage",
      warmup_frac=0.1,
      hold_frac=0.4,
      decay_frac=0.5,
      init_lr_scale=0.01,
      final_lr_scale=0.05,
      warmup_steps=0,
      end_lr=0.0,
      layer_decay=1.0,
      freeze=(r"^frontend/feature_extractor/",),  # feature_grad_mult 0
      freeze_steps=freeze_steps,  # fairseq's freeze_finetune_updates: only the head trains
      freeze_until_patterns=(r"^frontend/", r"^encoder/", r"^mask_emb$"),
    )
  )
  config.input = ml_collections.ConfigDict(
    dict(
      source="embedded",  # embedded (sentences) | manifest (+ .ltr/.wrd) | tfds
      path="",
      split="train",
      tfds_data_dir="",
      tfds_feature="speech",
      tfds_text_feature="text",
      sample_rate=16000,
      batch_size=8 if arg.variant == "tiny" else 32,
      eval_batch_size=8 if arg.variant == "tiny" else 32,
      # Whole utterances, zero-padded to the smallest of these lengths that holds them.
      pad_lengths=(40000, 56000) if arg.variant == "tiny" else (160000, 320000, 560000),
      max_label_length=64 if arg.variant == "tiny" else 640,
      vocabulary="",  # fairseq dict.ltr.txt; "" = the letters of the training transcripts
      normalize=True,
      min_length=0,
      num_workers=0,
    )
  )
  config.eval.update(dict(every=200 if arg.variant == "tiny" else 2000, split="test"))
  return config
