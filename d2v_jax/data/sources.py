"""Speech sources: random-access sequences of mono float32 waveforms with known lengths.

Every source has `name` (for messages), `lengths` (int64[N], samples per record), `stats`
(index-time counters), `len(source)`, `source[i] -> float32[T]` and `source.describe(i)` (the
file path or record id, for logs). Lengths are known without decoding, so the pipeline in
`audio.py` can plan whole epochs of static-shape batches up front.

Four kinds (`config.input.source`):
  embedded  the repository's synthesised speech set, `data/speech/index.tsv` (offline default);
  manifest  a fairseq-style `.tsv` manifest: the root directory, then `relative/path<TAB>samples`;
  folder    every .wav/.flac/.ogg file under a directory (recursive, sorted);
  tfds      a TFDS dataset prepared as ArrayRecord, read with `tfds.data_source` (no TensorFlow).

File sources check every header (`soundfile.info`) at index time, so a batch plan never holds a
bad file: unreadable and empty files are skipped and counted, multi-channel files are downmixed by
averaging channels, and a file at another sample rate is an error (this pipeline never resamples).
Each bad file is logged once, with its path. Samples are checked when a record is read: NaN, Inf
or absurd magnitudes raise `NonFiniteAudioError`, a decode failure that every reader counts and
skips (or substitutes) with the file's path, instead of a NaN loss that names no file.
"""

import concurrent.futures
import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import soundfile
from absl import logging

# <repo>/data/speech, next to this package (d2v_jax/data/sources.py -> parents[2] is the repo).
EMBEDDED_SPEECH_DIR = Path(__file__).resolve().parents[2] / "data" / "speech"
AUDIO_SUFFIXES = (".flac", ".ogg", ".wav")
_EMBEDDED_COLUMNS = ("path", "num_samples", "kind", "split", "word", "transcript", "voice")
# soundfile.info is a libsndfile call that releases the GIL: threads speed up scans of big sets.
_SCAN_THREADS = 16
_LOG_EVERY = 10_000


@dataclasses.dataclass
class AudioStats:
  """What indexing and loading dropped or changed; each event is also logged with its file."""

  listed: int = 0  # records the source lists
  skipped_unreadable: int = 0  # header or record could not be read
  skipped_empty: int = 0  # zero frames (or a zero-byte file)
  skipped_short: int = 0  # shorter than `input.min_length` (counted by the pipeline)
  downmixed: int = 0  # multi-channel records, averaged to mono
  decode_failures: int = 0  # passed the header check, failed to decode later; substituted


class AudioSource(Protocol):
  """What the pipeline needs from a source."""

  name: str
  lengths: np.ndarray  # int64[N]
  stats: AudioStats

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> np.ndarray: ...

  def describe(self, index: int) -> str: ...


# Beyond this magnitude a sample is corrupt, not loud: PCM decodes to [-1, 1], float files hold
# about that (or integer scale, up to 8.4e6 for 24-bit), and 1e30-sized samples overflow the
# per-utterance normalisation (their squares pass float32's range).
MAX_ABS_SAMPLE = 1e8


class NonFiniteAudioError(RuntimeError):
  """A record holds NaN, Inf or corrupt-sized samples. A RuntimeError like soundfile's decode
  errors, so every reader that counts and skips undecodable files handles it the same way."""


def check_samples(what, wave: np.ndarray) -> np.ndarray:
  """`wave`, or NonFiniteAudioError naming `what` (a path or record) and what is wrong."""
  if not np.all(np.isfinite(wave)):
    bad = int(np.sum(~np.isfinite(wave)))
    raise NonFiniteAudioError(f"{what}: {bad} of {wave.size} samples are NaN or infinite")
  peak = float(np.max(np.abs(wave))) if wave.size else 0.0
  if peak > MAX_ABS_SAMPLE:
    raise NonFiniteAudioError(
      f"{what}: samples reach {peak:.3g} in magnitude (above {MAX_ABS_SAMPLE:g}: corrupt)"
    )
  return wave


def read_audio(path: str | Path, expected_sample_rate: int) -> np.ndarray:
  """Decodes an audio file to mono float32 in [-1, 1].

  Args:
    path: a file soundfile (libsndfile) can read: WAV, FLAC, OGG, ...
    expected_sample_rate: the rate the file must have; there is no resampling.

  Returns:
    float32[T]; multi-channel audio is averaged over channels.

  Raises:
    ValueError: the file's sample rate is not `expected_sample_rate`.
    soundfile.LibsndfileError: the file cannot be opened or decoded.
    NonFiniteAudioError: the file holds NaN, Inf or corrupt-sized samples.
  """
  wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [T, C]
  _check_sample_rate(path, rate, expected_sample_rate)
  check_samples(path, wave)
  return wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]


def _check_sample_rate(what, rate: int, expected: int) -> None:
  if rate != expected:
    raise ValueError(
      f"{what}: sample rate {rate} Hz, expected {expected} Hz (config.input.sample_rate). "
      "This pipeline does not resample: convert the data set, or change the sample rate."
    )


# ---------------------------------------------------------------------------------------------
# Files: embedded set, manifests, folders.


class _Header(NamedTuple):
  frames: int
  channels: int
  sample_rate: int


def _read_header(path: str | Path) -> _Header | Exception:
  """The header of an audio file, or the exception that reading it raised."""
  try:
    # libsndfile writes a 0-frame FLAC as a zero-byte file, which it cannot open again.
    if Path(path).stat().st_size == 0:
      return _Header(frames=0, channels=0, sample_rate=0)
    info = soundfile.info(str(path))
  except (RuntimeError, OSError) as e:  # soundfile.LibsndfileError is a RuntimeError
    return e
  return _Header(info.frames, info.channels, info.samplerate)


def _scan_headers(name: str, paths: Sequence[str | Path]) -> list[_Header | Exception]:
  """The header (or reading error) of every path, in order."""
  headers = []
  with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
    for header in pool.map(_read_header, paths):
      headers.append(header)
      if len(headers) % _LOG_EVERY == 0:
        logging.info("%s: read %d of %d audio headers", name, len(headers), len(paths))
  return headers


class AudioFileSource:
  """Audio files checked from their headers; `source[i]` decodes file i."""

  def __init__(self, name: str, paths: Sequence[str | Path], sample_rate: int):
    """Reads every header; keeps the files that can be used.

    Args:
      name: how messages name this source, e.g. "manifest /data/train.tsv".
      paths: the audio files, in a fixed order.
      sample_rate: the rate every file must have.

    Raises:
      ValueError: a file has another sample rate, or no file is usable.
    """
    self.name = name
    self.sample_rate = sample_rate
    self.stats = AudioStats(listed=len(paths))
    self.paths: list[str] = []
    lengths = []
    for path, header in zip(paths, _scan_headers(name, paths)):
      num_frames = self._check_header(str(path), header)
      if num_frames:
        self.paths.append(str(path))
        lengths.append(num_frames)
    self.lengths = np.asarray(lengths, np.int64)  # [N]
    _require_records(self)

  def _check_header(self, path: str, header: _Header | Exception) -> int:
    """Returns the usable length of a file (0 to skip it), counting and logging why."""
    if isinstance(header, Exception):
      self.stats.skipped_unreadable += 1
      logging.warning("Skipping unreadable audio file %s (%s)", path, header)
      return 0
    if header.frames == 0:
      self.stats.skipped_empty += 1
      logging.warning("Skipping empty audio file %s", path)
      return 0
    _check_sample_rate(path, header.sample_rate, self.sample_rate)
    if header.channels > 1:
      self.stats.downmixed += 1
      logging.warning("Downmixing %d channels to mono (average): %s", header.channels, path)
    return header.frames

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> np.ndarray:
    return read_audio(self.paths[index], self.sample_rate)

  def describe(self, index: int) -> str:
    return self.paths[index]


@dataclasses.dataclass(frozen=True)
class EmbeddedClip:
  """One row of `data/speech/index.tsv`."""

  path: Path  # absolute
  num_samples: int
  kind: str  # "word" or "sentence"
  split: str  # "train" or "test"
  word: str  # the word of a word clip
  transcript: str
  voice: str  # espeak-ng voice variant
  speed: str  # espeak-ng speed and pitch, as written in the index
  pitch: str


def load_embedded_speech_index(
  split: str | None = None, kind: str | None = None, *, root: str | Path | None = None
) -> list[EmbeddedClip]:
  """The rows of the embedded speech set's index, in file order.

  Args:
    split: keep rows of this split ("train", "test"); None or "all" keeps every row.
    kind: keep rows of this kind ("word", "sentence"); None keeps every row.
    root: the directory holding `index.tsv` (default: the repository's `data/speech`).

  Raises:
    FileNotFoundError: there is no index.
  """
  root = Path(root) if root else EMBEDDED_SPEECH_DIR
  index_path = root / "index.tsv"
  if not index_path.is_file():
    raise FileNotFoundError(
      f"Embedded speech index {index_path} not found: the embedded set is generated by the "
      "script in data/ (needs espeak-ng), or point config.input.path at another copy."
    )
  with index_path.open(newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = set(_EMBEDDED_COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f"{index_path}: missing columns {sorted(missing)}")
    clips = [
      EmbeddedClip(
        path=root / row["path"],
        num_samples=int(row["num_samples"]),
        kind=row["kind"],
        split=row["split"],
        word=row["word"],
        transcript=row["transcript"],
        voice=row["voice"],
        speed=row.get("speed", ""),
        pitch=row.get("pitch", ""),
      )
      for row in reader
    ]
  return [
    clip for clip in clips if split in (None, "all", clip.split) and kind in (None, clip.kind)
  ]


def embedded_source(
  split: str, sample_rate: int, root: str | Path | None = None
) -> AudioFileSource:
  """Every clip (words and sentences) of one split of the embedded set; split "all" for all."""
  clips = load_embedded_speech_index(split=split, root=root)
  where = Path(root) if root else EMBEDDED_SPEECH_DIR
  return AudioFileSource(f"embedded {where} (split={split})", [c.path for c in clips], sample_rate)


def manifest_source(manifest: str | Path, sample_rate: int) -> AudioFileSource:
  """A fairseq manifest: the root directory, then one `relative/path<TAB>num_samples` per line.

  The lengths in the manifest are only a hint: the file headers are read anyway (bad files must
  never reach a batch plan), and their frame counts are used.
  """
  manifest = Path(manifest)
  if not manifest.is_file():
    raise FileNotFoundError(f"Audio manifest {manifest} not found")
  try:
    lines = manifest.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as error:
    raise ValueError(
      f"Audio manifest {manifest} is not UTF-8 text (byte {error.start}: {error.reason})"
    ) from error
  if not lines:
    raise ValueError(f"Audio manifest {manifest} is empty: expected a root directory line")
  root = Path(lines[0].strip())
  paths = [root / line.split("\t")[0] for line in lines[1:] if line.strip()]
  return AudioFileSource(f"manifest {manifest}", paths, sample_rate)


def folder_source(folder: str | Path, sample_rate: int) -> AudioFileSource:
  """Every .wav/.flac/.ogg file under `folder` (recursive), in sorted path order."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"Audio folder {folder} not found")
  paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
  return AudioFileSource(f"folder {folder}", paths, sample_rate)


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord).


class TfdsAudioSource:
  """A TFDS dataset prepared as ArrayRecord, records holding an audio array (LibriSpeech: "speech").

  ArrayRecord gives random access without TensorFlow, but record lengths are not stored apart
  from the audio: construction reads every record once to measure it (progress is logged). That
  costs one pass over the data per run; fine for small and medium sets, a cached length file is
  the fix for LibriSpeech-size ones.
  """

  def __init__(
    self, name: str, split: str, sample_rate: int, data_dir: str | None = None, feature="audio"
  ):
    import tensorflow_datasets as tfds  # slow import; only this source needs it

    if data_dir and not Path(data_dir).is_dir():
      raise FileNotFoundError(f"TFDS data_dir {data_dir} not found")
    self.name = f"tfds {name} (split={split})"
    self.feature = feature
    self.data = tfds.data_source(name, split=split, data_dir=data_dir or None)
    features = self.data.dataset_info.features
    if feature not in features:
      raise ValueError(f"{self.name}: no {feature!r} feature; it has {list(features.keys())}")
    # tfds.features.Audio knows its rate; a plain Tensor feature does not, so it is trusted.
    rate = getattr(features[feature], "sample_rate", None)
    if rate is not None:
      _check_sample_rate(self.name, rate, sample_rate)
    self.stats = AudioStats(listed=len(self.data))
    self.records, self.lengths = self._index()
    _require_records(self)

  def _index(self) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record once: the usable ones and their lengths."""
    records, lengths = [], []
    for index in range(len(self.data)):
      try:
        audio = np.asarray(self.data[index][self.feature])  # [T] or [T, C]
      except (RuntimeError, OSError, ValueError) as e:
        self.stats.skipped_unreadable += 1
        logging.warning("Skipping unreadable record %s: %s", self._record_name(index), e)
        continue
      if audio.shape[0] == 0:
        self.stats.skipped_empty += 1
        logging.warning("Skipping empty record %s", self._record_name(index))
        continue
      if audio.ndim > 1 and audio.shape[1] > 1:
        self.stats.downmixed += 1
        logging.warning(
          "Downmixing %d channels to mono: %s", audio.shape[1], self._record_name(index)
        )
      records.append(index)
      lengths.append(audio.shape[0])
      if (index + 1) % _LOG_EVERY == 0:
        logging.info("%s: measured %d of %d records", self.name, index + 1, len(self.data))
    return np.asarray(records, np.int64), np.asarray(lengths, np.int64)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> np.ndarray:
    audio = np.asarray(self.data[int(self.records[index])][self.feature])  # [T] or [T, C]
    if np.issubdtype(audio.dtype, np.integer):  # PCM: int16 -> [-1, 1)
      audio = audio / (np.iinfo(audio.dtype).max + 1.0)
    if audio.ndim > 1:
      audio = audio.mean(axis=1)
    return check_samples(self.describe(index), audio.astype(np.float32))

  def describe(self, index: int) -> str:
    return self._record_name(int(self.records[index]))

  def _record_name(self, record: int) -> str:
    return f"{self.name} record {record}"


# ---------------------------------------------------------------------------------------------


def _require_records(source: AudioSource) -> None:
  if len(source) == 0:
    raise ValueError(
      f"Audio source {source.name} has no usable records (listed {source.stats.listed}): "
      f"{source.stats}"
    )


def make_source(input_cfg) -> AudioSource:
  """Builds the source that `config.input` names.

  Reads the fields `source`, `path`, `split`, `sample_rate`, `tfds_data_dir` and `tfds_feature`.
  For `embedded`, a non-empty `path` is another directory holding an index.tsv (default:
  `data/speech`).
  """
  kind, path, rate = input_cfg.source, input_cfg.path, input_cfg.sample_rate
  if kind == "embedded":
    return embedded_source(input_cfg.split, rate, root=path or None)
  if not path:
    raise ValueError(f"config.input.path is required for source={kind!r}")
  if kind == "manifest":
    return manifest_source(path, rate)
  if kind == "folder":
    return folder_source(path, rate)
  if kind == "tfds":
    return TfdsAudioSource(
      path,
      input_cfg.split,
      rate,
      data_dir=input_cfg.tfds_data_dir or None,
      feature=input_cfg.tfds_feature,
    )
  raise ValueError(f"Unknown config.input.source {kind!r}: embedded | manifest | folder | tfds")
