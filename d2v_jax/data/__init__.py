"""Input pipelines (grain) and their sources, per modality.

Speech: `make_audio_pretrain_dataset(config.input, seed=...)` yields bucketed, static-shape
`{"audio", "padding_mask"}` batches from the embedded set, a manifest, a folder or TFDS.
Images: `make_image_pretrain_dataset(config.input, seed=...)` yields augmented
`{"image": f32[b, S, S, 3]}` batches from the embedded digits, an image folder or TFDS.
"""

from d2v_jax.data.audio import AudioPretrainDataset, make_audio_pretrain_dataset
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
from d2v_jax.data.sources import (
  AudioStats,
  EmbeddedClip,
  load_embedded_speech_index,
  make_source,
  read_audio,
)

__all__ = [
  "IMAGENET_MEAN",
  "IMAGENET_STD",
  "AudioPretrainDataset",
  "AudioStats",
  "EmbeddedClip",
  "ImagePretrainDataset",
  "ImageProbeData",
  "ImageStats",
  "eval_image",
  "load_digit_probe_sets",
  "load_embedded_speech_index",
  "make_audio_pretrain_dataset",
  "make_image_pretrain_dataset",
  "make_image_source",
  "make_source",
  "read_audio",
]
