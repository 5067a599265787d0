"""The committed speech sample set is complete and matches its index (DESIGN.md, embedded sets)."""

import collections

import soundfile

from d2v_jax.data import load_embedded_speech_index


def test_every_indexed_clip_exists_with_the_declared_format():
  clips = load_embedded_speech_index()
  assert len(clips) == 600
  for clip in clips:
    info = soundfile.info(str(clip.path))
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, clip.num_samples), clip.path


def test_word_labels_are_balanced_and_voices_do_not_cross_splits():
  words = load_embedded_speech_index(kind="word")
  per_split = collections.Counter((c.split, c.word) for c in words)
  assert len({w for _, w in per_split}) == 12
  assert set(per_split.values()) == {30, 10}  # 30 train and 10 test clips per word
  train_voices = {c.voice.split("+")[-1] for c in words if c.split == "train"}
  test_voices = {c.voice.split("+")[-1] for c in words if c.split == "test"}
  assert not train_voices & test_voices
  assert all(c.transcript == c.word.upper() for c in words)


def test_sentences_have_transcripts():
  sentences = load_embedded_speech_index(kind="sentence")
  assert len(sentences) == 120
  assert all(
    c.transcript and set(c.transcript) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ") for c in sentences
  )
