"""Audio classification fine-tuning: mean-pooled encoder output -> Linear (spec §1.6 encoder).

    python main.py --config=configs/audio_cls.py --workdir=runs/audio_cls \
        --config.init.pretrained=runs/audio_tiny
    python main.py --config=configs/audio_cls.py --workdir=runs/kws \
        --config.init.pretrained=runs/audio_base --config.input.source=manifest \
        --config.input.path=/data/speech_commands   # train.tsv + train.lbl, test.tsv + test.lbl

tiny classifies the embedded set's 12 spoken words (360 train / 120 test clips, disjoint
voices). The CNN stays frozen and the pretrained model is held for the first updates while the
head learns, as CTC fine-tuning does; time masks are lighter than CTC's (clips are short).
"""

import ml_collections

from configs import audio_ctc, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant="tiny")
  tiny = arg.variant == "tiny"
  config = audio_ctc.get_config(f"variant={arg.variant},split=10h")
  config.loop = common.loop_config(600 if tiny else 20_000)
  config.head = ml_collections.ConfigDict(
    dict(task="classify", num_outputs=-1, dropout=0.1, label_smoothing=0.0)
  )
  config.masking.update(dict(mask_prob=0.1, channel_prob=0.0))
  config.optim.update(dict(lr=1e-3 if tiny else 5e-5, freeze_steps=60 if tiny else 2000))
  config.input.update(
    dict(
      # Embedded: word clips (12 classes); manifests: `<split>.lbl` with one label per row.
      pad_lengths=(12000, 18240) if tiny else (16000, 32000, 80000),
    )
  )
  config.eval.update(dict(every=200 if tiny else 2000))
  return config
