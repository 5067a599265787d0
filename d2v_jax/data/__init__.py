"""Input pipelines (grain) and their sources, per modality.

Speech: `make_audio_pretrain_dataset(config.input, seed=...)` yields bucketed, static-shape
`{"audio", "padding_mask"}` batches from the embedded set, a manifest, a folder or TFDS.
Images: `make_image_pretrain_dataset(config.input, seed=...)` yields augmented
`{"image": f32[b, S, S, 3]}` batches from the embedded digits, an image folder or TFDS.
Text: `make_text_pretrain_dataset(config.input, seed=...)` yields RoBERTa `complete_doc` blocks
`{"tokens", "padding_mask"}` from the embedded King James Bible, a folder of .txt files or TFDS.

Fine-tuning (labelled; each `make_*_finetune_dataset(config, seed=...)` has a matching
`*_eval_batches(config, split)` whose batches carry `example_mask`):
speech `audio_tasks` (CTC letters or classes), images `image_tasks` (classes, RandAugment,
erasing), text `text_tasks` (GLUE-style single sentences and pairs, classes or a score).
"""

from d2v_jax.data.audio import AudioPretrainDataset, make_audio_pretrain_dataset
from d2v_jax.data.audio_tasks import audio_eval_batches, make_audio_finetune_dataset
from d2v_jax.data.image import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  ImagePretrainDataset,
  ImageProbeData,
  eval_image,
  load_digit_probe_sets,
  make_image_pretrain_dataset,
)
from d2v_jax.data.image_sources import ImageStats, make_image_source
from d2v_jax.data.image_tasks import image_eval_batches, make_image_finetune_dataset
from d2v_jax.data.sources import (
  AudioStats,
  EmbeddedClip,
  load_embedded_speech_index,
  make_source,
  read_audio,
)
from d2v_jax.data.text import (
  TextPretrainDataset,
  encode_for_probe,
  make_text_pretrain_dataset,
)
from d2v_jax.data.text_sources import TextDataStats, make_text_source
from d2v_jax.data.text_tasks import make_text_finetune_dataset, text_eval_batches

__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "AudioPretrainDataset",
  "AudioStats",
  "EmbeddedClip",
  "ImagePretrainDataset",
  "ImageProbeData",
  "ImageStats",
  "TextDataStats",
  "TextPretrainDataset",
  "audio_eval_batches",
  "encode_for_probe",
  "eval_image",
  "image_eval_batches",
  "load_digit_probe_sets",
  "load_embedded_speech_index",
  "make_audio_finetune_dataset",
  "make_audio_pretrain_dataset",
  "make_image_finetune_dataset",
  "make_image_pretrain_dataset",
  "make_image_source",
  "make_source",
  "make_text_finetune_dataset",
  "make_text_pretrain_dataset",
  "make_text_source",
  "read_audio",
  "text_eval_batches",
]
