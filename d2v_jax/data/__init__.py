"""Input pipelines (grain) and their sources, per modality.

Speech: `make_audio_pretrain_dataset(config.input, seed=...)` yields bucketed, static-shape
`{"audio", "padding_mask"}` batches from the embedded set, a manifest, a folder or TFDS.
"""

from d2v_jax.data.audio import AudioPretrainDataset, make_audio_pretrain_dataset
from d2v_jax.data.sources import (
  AudioStats,
  EmbeddedClip,
  load_embedded_speech_index,
  make_source,
  read_audio,
)

__all__ = [
  "AudioPretrainDataset",
  "AudioStats",
  "EmbeddedClip",
  "load_embedded_speech_index",
  "make_audio_pretrain_dataset",
  "make_source",
  "read_audio",
]
