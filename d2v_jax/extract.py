"""Feature extraction: a pretrained encoder's per-layer outputs for new inputs (spec §1.6).

Downstream use of a data2vec encoder often starts from frozen features (SUPERB-style probes,
retrieval, clustering) rather than fine-tuning. `Extractor` loads the *student* of a pretraining
checkpoint once (as fine-tuning does, `pretrained.py`), runs it in eval mode on unmasked inputs and
returns every layer: index 0 is the encoder input (speech: frame features after the positional
convolution and LayerNorm; images: patch embeddings; text: token + position embeddings after
their LayerNorm), index i = 1..L is block i's end-of-block output. Image layers hold the patch
positions only; the final CLS (after the encoder's last LayerNorm, which the block outputs have
not seen) comes apart as `cls`. Padded positions read zero.

Inputs are prepared as the pretraining run prepared them, from the run's `config.json` in the work
directory (defaults of `configs/<modality>.py` when it is missing): speech is normalised per
utterance over its valid samples (`config.input.normalize`) at `config.input.sample_rate`, images
are resized whole to the model's resolution and normalised with `config.input.mean`/`std`, and text
is tokenized with the run's tokenizer as `<s> text </s>`. The convenience methods pad to lengths
rounded up to a multiple (1 s of audio, 16 tokens) and batches to a power of two, so the jitted
forward compiles for a handful of shapes only.

`WeightedLayerSum` is the SUPERB featurizer: a softmax-weighted sum of the L + 1 layers, learned by
a downstream head. `run_extraction` (and `python -m d2v_jax.extract`) writes the features of a
folder, manifest or text file to one `.npz`/`.npy` per input plus an `index.tsv`.
"""

import collections
import dataclasses
import importlib
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import linen as nn
from PIL import Image

from d2v_jax import errors, pretrained
from d2v_jax.data import audio as audio_data
from d2v_jax.data import image as image_data
from d2v_jax.data import image_sources, sources, text_sources
from d2v_jax.data import text as text_data
from d2v_jax.models import audio as audio_model
from d2v_jax.models import data2vec2
from d2v_jax.models.data2vec import build_backbone, model_sizes

RECEPTIVE_FIELD = 400  # samples behind the conv stack's first frame: shorter audio has no frame
AUDIO_BUCKET_SECONDS = 1  # waveforms are padded to a whole number of seconds
TEXT_BUCKET_TOKENS = 16  # token rows are padded to a multiple of this (capped at max_positions)
FORMATS = ("npz", "npy")
INDEX_FILE = "index.tsv"
# What reading one input may raise: soundfile's LibsndfileError is a RuntimeError, PIL's plugins
# raise the image sources' DECODE_ERRORS; anything else is a bug and propagates.
_AUDIO_READ_ERRORS = (RuntimeError, OSError, ValueError)


@dataclasses.dataclass(frozen=True)
class Features:
  """Per-layer encoder outputs of one batch."""

  layers: np.ndarray  # float32[L', B, T, D]; layers[k] is layer layer_ids[k]
  padding_mask: np.ndarray  # bool[B, T], True at padding (speech: frames; text: tokens)
  cls: np.ndarray | None  # float32[B, D]: the final CLS output (images); None otherwise
  layer_ids: tuple[int, ...]  # 0 = encoder input, i = block i's output

  def valid(self, row: int) -> np.ndarray:
    """float32[L', T_row, D]: the layers of example `row` at its valid positions only."""
    return self.layers[:, row][:, ~self.padding_mask[row]]


def resolve_layers(spec: str | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
  """Layer indices in 0..L of "all" (or None), "last", "i,j" or a sequence of ints.

  Negative indices count from the end (-1 = block L's output), as in Python.
  """
  count = num_layers + 1  # the encoder input and every block
  if spec is None or spec == "all":
    return tuple(range(count))
  if spec == "last":
    return (num_layers,)
  if isinstance(spec, str):
    try:
      spec = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
      raise ValueError(
        f"layers={spec!r}: use 'all', 'last' or comma-separated indices such as '0,6,12'"
      ) from None
  ids = []
  for index in spec:
    if not -count <= int(index) < count:
      raise ValueError(
        f"layers: index {index} is out of range; this model has layers 0..{num_layers} "
        "(0 = the encoder input, i = block i's output)"
      )
    ids.append(int(index) % count)
  if not ids:
    raise ValueError("layers: no layer index given")
  return tuple(ids)


def run_input_config(run: pretrained.PretrainedRun) -> ml_collections.ConfigDict:
  """`config.input` of the run that wrote `run`: its work directory's config.json, else defaults.

  The step directory is `<workdir>/checkpoints/<step>`, so the config sits two levels up.
  """
  config_file = run.directory.parents[1] / "config.json"
  if config_file.is_file():
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("modality", run.modality) != run.modality:
      raise ValueError(
        f"{config_file} describes a {config.get('modality')} run, but the checkpoint "
        f"{run.directory} holds a {run.modality} model"
      )
    if "input" in config:
      return ml_collections.ConfigDict(config["input"])
  # configs/ sits next to d2v_jax in the repository; imported only here, for this fallback.
  defaults = importlib.import_module(f"configs.{run.modality}").get_config().input
  logging.warning(
    "No config.json with input settings at %s: preparing inputs with the defaults of configs/%s.py",
    config_file,
    run.modality,
  )
  return ml_collections.ConfigDict(defaults.to_dict())


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _batch_rows(n: int) -> int:
  """Rows a batch of `n` examples is padded to: the next power of two (few compiled shapes)."""
  return 1 << max(n - 1, 0).bit_length()


class FrozenEncoder(nn.Module):
  """The front end and encoder of a pretraining or fine-tuning model (their parameters have the
  same names in both), in eval mode on unmasked inputs: (tokens [B, T, D], token padding [B, T],
  the encoder's aux with every block's output)."""

  frontend: nn.Module
  encoder: nn.Module

  def __call__(self, inputs, padding_mask):
    tokens, token_padding = self.frontend(inputs, padding_mask, train=False)
    _, aux = self.encoder(tokens, token_padding, train=False)
    return tokens, token_padding, aux


class Extractor:
  """A pretrained encoder, loaded once, with a jitted forward that returns every layer."""

  def __init__(
    self,
    run: pretrained.PretrainedRun,
    input_cfg: ml_collections.ConfigDict | None = None,
    *,
    dtype: str | None = None,
    compiler_options: dict | None = None,
  ):
    """Builds the student's front end and encoder of `run` (pretrained or fine-tuned).

    Args:
      run: a loaded pretraining checkpoint (`pretrained.load_pretrained`).
      input_cfg: how inputs are prepared (`config.input`); None = `run_input_config(run)`.
      dtype: compute dtype overriding the checkpoint's `config.model.dtype` (e.g. "float32").
      compiler_options: passed to `jax.jit` (tests use cheap CPU code generation).
    """
    self.run = run
    self.modality = run.modality
    model_cfg = run.model_config()
    if dtype is not None:
      model_cfg.dtype = dtype
    self.model_cfg = model_cfg
    self.sizes = model_sizes(self.modality, model_cfg)
    self.num_layers = self.sizes["num_layers"]
    self.dim = self.sizes["dim"]
    self.input_cfg = run_input_config(run) if input_cfg is None else input_cfg
    # A fine-tuned vision model has no final LayerNorm (its head normalises the pooled patches).
    if run.meta["version"] == 2:  # data2vec 2.0: the local and context encoders
      frontend, encoder, _ = data2vec2.build_backbone(self.modality, model_cfg)
    else:  # a fine-tuned vision model has no final LayerNorm (its head normalises the pool)
      final_norm = not (self.modality == "image" and "head" in run.meta)
      backbone = build_backbone(self.modality, model_cfg, final_norm=final_norm)
      frontend, encoder = backbone.frontend, backbone.encoder
    self.model = FrozenEncoder(frontend, encoder)
    self._params = jax.device_put(run.params)
    self._forward = jax.jit(
      self._encode, static_argnames=("layer_ids",), compiler_options=compiler_options
    )
    self._tokenizer = None

  def _encode(self, params, inputs, padding_mask, layer_ids):
    tokens, token_padding, aux = self.model.apply({"params": params}, inputs, padding_mask)
    # Speech's encoder input is the first block's input (after the positional conv and LN);
    # the other modalities feed the front end's output to the blocks directly.
    outputs = [aux.get("input", tokens)] + [layer["block"] for layer in aux["layers"]]
    valid = ~token_padding[..., None]  # [B, T, 1]
    layers = jnp.stack([jnp.where(valid, outputs[i], 0).astype(jnp.float32) for i in layer_ids])
    cls = aux.get("cls")  # None: no CLS token (speech, text)
    cls = None if cls is None else cls.astype(jnp.float32)
    return layers, token_padding, cls  # [L', B, T, D], [B, T], [B, D] or None

  def __call__(self, inputs, padding_mask=None, layers=None) -> Features:
    """Features of a prepared batch.

    Args:
      inputs: speech float32[B, T] samples (normalised as the run was), images float32[B, S, S, 3]
        (normalised), or text int[B, L] token ids (`<s> ... </s> <pad>...`).
      padding_mask: bool[B, T] or [B, L], True at padding; None = nothing padded (speech), the
        `<pad>` ids (text). Images take none.
      layers: which layers ("all", "last", indices; see `resolve_layers`); None = all.
    """
    layer_ids = resolve_layers(layers, self.num_layers)
    inputs = np.asarray(inputs)
    if self.modality == "audio":
      inputs, padding_mask = self._check_audio(inputs, padding_mask)
    elif self.modality == "image":
      if padding_mask is not None:
        raise ValueError("padding_mask: images are never padded; pass None")
      inputs = inputs.astype(np.float32)
    else:
      inputs, padding_mask = self._check_tokens(inputs, padding_mask)
    out_layers, out_padding, cls = self._forward(self._params, inputs, padding_mask, layer_ids)
    return Features(
      np.asarray(out_layers),
      np.asarray(out_padding),
      None if cls is None else np.asarray(cls),
      layer_ids,
    )

  def _check_audio(self, audio, padding_mask):
    if audio.ndim != 2:
      raise ValueError(f"inputs: expected audio [B, T], got shape {audio.shape}")
    if audio.shape[1] < RECEPTIVE_FIELD:
      raise ValueError(
        f"inputs: {audio.shape[1]} samples is shorter than one frame ({RECEPTIVE_FIELD} samples)"
      )
    if padding_mask is None:
      padding_mask = np.zeros(audio.shape, bool)
    return audio.astype(np.float32), np.asarray(padding_mask, bool)

  def _check_tokens(self, tokens, padding_mask):
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"inputs: expected int token ids [B, L], got {tokens.dtype}{tokens.shape}")
    max_positions = self.sizes["max_positions"]
    if tokens.shape[1] > max_positions:
      raise ValueError(
        f"inputs: {tokens.shape[1]} tokens per row, but the model has {max_positions} positions"
      )
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.sizes["vocab_size"]):
      raise ValueError(
        f"inputs: token ids must lie in [0, {self.sizes['vocab_size']}) (the model's vocabulary)"
      )
    if padding_mask is None:
      padding_mask = tokens == self.model_cfg.pad_id
    return tokens.astype(np.int32), np.asarray(padding_mask, bool)

  # -------------------------------------------------------------------------------------------
  # Raw inputs, prepared as the pretraining run prepared its own.

  @property
  def sample_rate(self) -> int:
    return int(self.input_cfg.sample_rate)

  def extract_waveforms(self, waves: Sequence[np.ndarray], sample_rate: int, layers=None):
    """Features of mono waveforms at `sample_rate` (must be the run's: nothing is resampled).

    Each waveform is normalised over its own samples when the run did so, then zero-padded to the
    batch's length rounded up to whole seconds. Returns `Features` over the frames of the longest.
    """
    if self.modality != "audio":
      raise ValueError(f"extract_waveforms needs a speech model; this one is {self.modality}")
    if int(sample_rate) != self.sample_rate:
      raise ValueError(
        f"sample_rate={sample_rate} Hz, but the model was pretrained on {self.sample_rate} Hz "
        "audio (its config.input.sample_rate): resample the audio first"
      )
    if not len(waves):
      raise ValueError("waves: no waveform given")
    waves = [self._check_wave(i, w) for i, w in enumerate(waves)]
    lengths = np.asarray([len(w) for w in waves])  # [n]
    length = _round_up(int(lengths.max()), AUDIO_BUCKET_SECONDS * self.sample_rate)
    rows = _batch_rows(len(waves))
    audio = np.zeros((rows, length), np.float32)  # [rows, T]
    for i, wave in enumerate(waves):
      padded = np.pad(wave, (0, length - len(wave)))
      normalize = self.input_cfg.get("normalize", True)
      audio[i] = audio_data.normalize_utterance(padded, len(wave)) if normalize else padded
    # Rows beyond the examples are all padding: they only keep the batch shape fixed.
    num_valid = np.concatenate([lengths, np.zeros(rows - len(waves), lengths.dtype)])
    padding = np.arange(length)[None, :] >= num_valid[:, None]  # [rows, T]
    features = self(audio, padding, layers)
    return _trim(features, len(waves), int(audio_model.output_lengths(int(lengths.max()))))

  def _check_wave(self, index: int, wave) -> np.ndarray:
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
      raise ValueError(
        f"waves[{index}]: expected a mono waveform [T], got shape {wave.shape} (average the "
        "channels first)"
      )
    if len(wave) < RECEPTIVE_FIELD:
      raise ValueError(
        f"waves[{index}]: {len(wave)} samples is shorter than one frame ({RECEPTIVE_FIELD} "
        f"samples, {1000 * RECEPTIVE_FIELD / self.sample_rate:.0f} ms)"
      )
    if not np.all(np.isfinite(wave)):
      raise ValueError(f"waves[{index}]: holds NaN or infinite samples")
    return wave

  def extract_images(self, images: Sequence[np.ndarray | Image.Image], layers=None) -> Features:
    """Features of RGB images (uint8 [H, W, 3] arrays or PIL images), resized whole."""
    if self.modality != "image":
      raise ValueError(f"extract_images needs an image model; this one is {self.modality}")
    if not len(images):
      raise ValueError("images: no image given")
    size = self.sizes["image_size"]
    mean = tuple(self.input_cfg.get("mean", image_data.IMAGENET_MEAN))
    std = tuple(self.input_cfg.get("std", image_data.IMAGENET_STD))
    batch = np.zeros((_batch_rows(len(images)), size, size, 3), np.float32)  # [rows, S, S, 3]
    for i, image in enumerate(images):
      batch[i] = image_data.eval_image(_as_rgb(i, image), size, mean, std)
    return _trim(self(batch, None, layers), len(images))

  @property
  def tokenizer(self) -> text_data.Tokenizer:
    """The run's tokenizer (`config.input.tokenizer`), loaded on first use."""
    if self._tokenizer is None:
      tokenizer = text_data.load_tokenizer_for(self.input_cfg)
      if tokenizer.vocab_size > self.sizes["vocab_size"]:
        raise ValueError(
          f"The tokenizer ({self.input_cfg.get('tokenizer') or 'embedded'}) has "
          f"{tokenizer.vocab_size} ids but the model only {self.sizes['vocab_size']}: "
          "config.input.tokenizer does not name the run's tokenizer"
        )
      self._tokenizer = tokenizer
    return self._tokenizer

  def extract_texts(self, texts: Sequence[str], layers=None) -> Features:
    """Features of texts, each tokenized whole as `<s> text </s>` (stripped).

    A text longer than max_positions - 2 tokens keeps its first ones (logged). Positions are
    tokens, `<s>` and `</s>` included.
    """
    if self.modality != "text":
      raise ValueError(f"extract_texts needs a text model; this one is {self.modality}")
    if not len(texts):
      raise ValueError("texts: no text given")
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}]: expected a str, got {type(text).__name__}")
    lengths, stream = text_data.tokenize([t.strip() for t in texts], self.tokenizer)  # [n]
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
      raise ValueError(f"texts[{int(empty[0])}] is empty (no tokens after stripping whitespace)")
    max_positions = self.sizes["max_positions"]
    room = max_positions - 2  # <s> and </s>
    for i in np.flatnonzero(lengths > room):
      logging.warning("texts[%d]: %d tokens, keeping the first %d", i, lengths[i], room)
    starts = np.cumsum(lengths) - lengths
    ends = starts + np.minimum(lengths, room)
    longest = int(np.max(ends - starts)) + 2
    length = min(_round_up(longest, TEXT_BUCKET_TOKENS), max_positions)
    rows = text_data.assemble_rows(stream, starts, ends, length)
    tokens, padding = rows["tokens"], rows["padding_mask"]  # [n, L]
    extra = _batch_rows(len(texts)) - len(texts)  # all-<pad> rows keep the batch shape fixed
    tokens = np.pad(tokens, ((0, extra), (0, 0)), constant_values=self.model_cfg.pad_id)
    padding = np.pad(padding, ((0, extra), (0, 0)), constant_values=True)
    return _trim(self(tokens, padding, layers), len(texts), longest)


def _as_rgb(index: int, image) -> Image.Image:
  """An RGB PIL image of `images[index]`; greyscale and alpha are converted as the loaders do."""
  if not isinstance(image, Image.Image):
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
      raise ValueError(
        f"images[{index}]: expected uint8 [H, W, 3] (or [H, W], [H, W, 4]) or a PIL image, got "
        f"{array.dtype}{array.shape}"
      )
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
      raise ValueError(f"images[{index}]: {array.shape[-1]} channels; expected 1, 3 or 4")
    image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
  return image_sources.to_rgb(image)


def _trim(features: Features, rows: int, positions: int | None = None) -> Features:
  """The first `rows` examples (and `positions` positions) of a padded batch's features."""
  cut = slice(None) if positions is None else slice(positions)
  return Features(
    features.layers[:, :rows, cut],
    features.padding_mask[:rows, cut],
    None if features.cls is None else features.cls[:rows],
    features.layer_ids,
  )


def load_extractor(path: str | pathlib.Path, **kwargs) -> Extractor:
  """An `Extractor` of the checkpoint at `path` (work directory, its checkpoints/, or a step)."""
  return Extractor(pretrained.load_pretrained(path), **kwargs)


class WeightedLayerSum(nn.Module):
  """SUPERB's featurizer: Σ_l softmax(w)_l · layer_l over the L + 1 layers, w learned.

  The weights start equal (a plain mean). `layer_norm=True` normalises each layer over D (no
  affine parameters) before the sum, so that layers of different scales weigh by w alone.
  Input: [L + 1, ..., D] (e.g. `Features.layers`, or a list of [B, T, D]); output: [..., D].
  """

  layer_norm: bool = False
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, layers):
    layers = jnp.stack(layers) if isinstance(layers, list | tuple) else jnp.asarray(layers)
    logits = self.param("weights", nn.initializers.zeros, (layers.shape[0],))
    if self.layer_norm:
      mean = jnp.mean(layers, axis=-1, keepdims=True)
      var = jnp.var(layers, axis=-1, keepdims=True)
      layers = (layers - mean) * jax.lax.rsqrt(var + self.epsilon)
    weights = jax.nn.softmax(logits).astype(layers.dtype)  # [L+1]
    return jnp.tensordot(weights, layers, axes=1)  # [..., D]


# ---------------------------------------------------------------------------------------------
# Files in, one feature file per input out.


@dataclasses.dataclass(frozen=True)
class _Input:
  name: str  # output file name without extension, relative to the output directory
  describe: str  # the input file (or text line), for index.tsv and warnings


def _names_of(paths: Sequence[pathlib.Path], root: pathlib.Path) -> list[str]:
  """Output names: the path relative to `root` without suffix; with it where two would clash."""
  relative = []
  for path in paths:
    try:
      relative.append(pathlib.Path(path).relative_to(root))
    except ValueError:  # a manifest entry outside its root
      relative.append(pathlib.Path(pathlib.Path(path).name))
  stems = [p.with_suffix("").as_posix() for p in relative]
  counts = collections.Counter(stems)
  return [s if counts[s] == 1 else p.as_posix() for s, p in zip(stems, relative)]


class _Writer:
  """Writes one feature file per input and the index."""

  def __init__(self, output: pathlib.Path, fmt: str):
    self.output = output
    self.fmt = fmt
    self.rows: list[tuple[str, str, int]] = []

  def write(self, item: _Input, layers: np.ndarray, cls: np.ndarray | None, layer_ids) -> None:
    path = self.output / f"{item.name}.{self.fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if self.fmt == "npz":
      arrays = {"layers": layers, "layer_ids": np.asarray(layer_ids, np.int32)}
      np.savez(path, **arrays, **({} if cls is None else {"cls": cls}))
    else:
      np.save(path, layers)
      if cls is not None:
        np.save(self.output / f"{item.name}.cls.npy", cls)
    self.rows.append((path.relative_to(self.output).as_posix(), item.describe, layers.shape[1]))

  def write_index(self) -> pathlib.Path:
    path = self.output / INDEX_FILE
    lines = ["file\tinput\tlength"] + [f"{f}\t{d}\t{n}" for f, d, n in self.rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclasses.dataclass
class _Plan:
  """What `run_extraction` needs of an input: its examples, how to load and batch them."""

  items: list[_Input]
  load: Callable[[int], object]  # item index -> example (waveform, PIL image or str)
  read_errors: tuple[type[BaseException], ...]  # what a bad file raises while loading
  order: np.ndarray  # the item order of the batches: similar lengths share a padded batch
  skipped_at_listing: int = 0  # unreadable or empty files the source dropped (and logged)
  blank_lines: int | None = None  # text only


def _plan_audio(extractor: Extractor, path: pathlib.Path) -> _Plan:
  """A folder of audio files, or a fairseq manifest (paths relative to its first line)."""
  if path.is_dir():
    source, root = sources.folder_source(path, extractor.sample_rate), path
  elif path.suffix == ".tsv":
    source = sources.manifest_source(path, extractor.sample_rate)
    root = pathlib.Path(path.read_text(encoding="utf-8").splitlines()[0].strip())
  else:
    raise ValueError(
      f"--input={path}: a speech model reads a folder of audio files or a fairseq manifest (.tsv)"
    )
  names = _names_of([pathlib.Path(p) for p in source.paths], root)
  return _Plan(
    items=[_Input(n, p) for n, p in zip(names, source.paths)],
    load=source.__getitem__,
    read_errors=_AUDIO_READ_ERRORS,
    order=np.argsort(-np.asarray(source.lengths), kind="stable"),
    skipped_at_listing=source.stats.skipped_unreadable + source.stats.skipped_empty,
  )


def _plan_images(path: pathlib.Path) -> _Plan:
  """A folder of images (flat, or one subfolder per class)."""
  if not path.is_dir():
    raise ValueError(f"--input={path}: an image model reads a folder of images")
  source = image_sources.FolderImageSource(path)
  names = _names_of([pathlib.Path(p) for p in source.paths], path)
  return _Plan(
    items=[_Input(n, p) for n, p in zip(names, source.paths)],
    load=source.pil_image,
    read_errors=image_sources.DECODE_ERRORS,
    order=np.arange(len(source)),  # every image becomes the same S x S view
    skipped_at_listing=source.stats.skipped_unreadable,
  )


def _plan_text(path: pathlib.Path) -> _Plan:
  """A text file, one example per non-blank line; outputs are named by line number."""
  if not path.is_file():
    raise ValueError(f"--input={path}: a text model reads a text file, one example per line")
  lines = path.read_bytes().split(b"\n")
  if lines and not lines[-1]:
    lines.pop()  # the final newline ends the last line; it does not start an empty one
  width = max(6, len(str(len(lines))))
  items, texts, blank, non_utf8 = [], [], 0, 0
  for number, raw in enumerate(lines, start=1):
    text, replaced = text_sources.decode(raw.removesuffix(b"\r"))
    non_utf8 += replaced
    if not text.strip():
      blank += 1
      continue
    items.append(_Input(f"line{number:0{width}d}", f"{path}:{number}"))
    texts.append(text)
  if non_utf8:
    logging.warning("%s: %d lines are not valid UTF-8 (bad bytes became U+FFFD)", path, non_utf8)
  if not items:
    raise ValueError(f"{path} has no non-blank line to extract features of")
  return _Plan(
    items=items,
    load=texts.__getitem__,
    read_errors=(),
    order=np.argsort([-len(t) for t in texts], kind="stable"),
    blank_lines=blank,
  )


def _extract_batch(extractor: Extractor, examples: list, layer_ids) -> Features:
  if extractor.modality == "audio":
    return extractor.extract_waveforms(examples, extractor.sample_rate, layer_ids)
  if extractor.modality == "image":
    return extractor.extract_images(examples, layer_ids)
  return extractor.extract_texts(examples, layer_ids)


def _load_batch(extractor: Extractor, plan: _Plan, indices, failed: list[str]) -> list:
  """(item index, example) of the `indices` that load and can be extracted.

  The others are warned about and appended to `failed`: unreadable files, and audio shorter than
  one frame (it has no features).
  """
  loaded = []
  for index in indices:
    describe = plan.items[index].describe
    try:
      example = plan.load(index)
    except plan.read_errors as error:
      logging.warning("Skipping unreadable input %s (%s)", describe, error)
      failed.append(describe)
      continue
    if extractor.modality == "audio" and len(example) < RECEPTIVE_FIELD:
      logging.warning("Skipping %s: %d samples, shorter than one frame", describe, len(example))
      failed.append(describe)
      continue
    loaded.append((index, example))
  return loaded


def run_extraction(
  checkpoint: str | pathlib.Path | Extractor,
  input: str | pathlib.Path,
  output: str | pathlib.Path,
  layers: str | Sequence[int] = "all",
  fmt: str = "npz",
  *,
  batch_size: int = 8,
) -> dict:
  """Writes the features of every input under `input` to `output`; returns a summary.

  Args:
    checkpoint: a pretraining work directory, its checkpoints/ or one step directory; or a
      loaded `Extractor`.
    input: speech: a folder of .wav/.flac/.ogg files or a fairseq manifest; images: a folder;
      text: a text file, one example per line.
    output: directory for `<name>.npz` (arrays `layers` [L', T, D] at the valid positions,
      `layer_ids`, and `cls` [D] for images) or `<name>.npy` (layers; images also
      `<name>.cls.npy`), named after the input file (text: `line<number>`), and `index.tsv`.
    layers: "all", "last" or indices such as "0,6,12" (see `resolve_layers`).
    fmt: "npz" or "npy".
    batch_size: inputs per forward pass.

  Returns:
    {"written", "skipped" (unreadable, empty or too short; each named in a warning),
    "skipped_inputs" (those found while loading), "layers", "index", ...; text: "blank_lines"}.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: use one of {FORMATS}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be at least 1")
  input_path = pathlib.Path(input).expanduser()
  if not input_path.exists():
    raise FileNotFoundError(f"Input {input_path} does not exist")
  extractor = checkpoint if isinstance(checkpoint, Extractor) else load_extractor(checkpoint)
  layer_ids = resolve_layers(layers, extractor.num_layers)
  if extractor.modality == "audio":
    plan = _plan_audio(extractor, input_path)
  elif extractor.modality == "image":
    plan = _plan_images(input_path)
  else:
    plan = _plan_text(input_path)
  output = pathlib.Path(output).expanduser()
  output.mkdir(parents=True, exist_ok=True)
  writer = _Writer(output, fmt)
  failed: list[str] = []
  with tqdm.tqdm(total=len(plan.items), desc=f"Extracting {extractor.modality} features") as bar:
    for start in range(0, len(plan.order), batch_size):
      indices = plan.order[start : start + batch_size]
      loaded = _load_batch(extractor, plan, indices, failed)
      if loaded:
        features = _extract_batch(extractor, [example for _, example in loaded], layer_ids)
        for row, (index, _) in enumerate(loaded):
          cls = None if features.cls is None else features.cls[row]
          writer.write(plan.items[index], features.valid(row), cls, layer_ids)
      bar.update(len(indices))

  summary = {
    "modality": extractor.modality,
    "checkpoint": str(extractor.run.directory),
    "step": extractor.run.step,
    "input": str(input_path),
    "output": str(output),
    "format": fmt,
    "layers": list(layer_ids),
    "written": len(writer.rows),
    "skipped": plan.skipped_at_listing + len(failed),
    "skipped_inputs": failed,
    "index": str(writer.write_index()),
  }
  if plan.blank_lines is not None:
    summary["blank_lines"] = plan.blank_lines
  if summary["skipped"]:
    logging.warning(
      "Skipped %d inputs (unreadable, empty or shorter than one frame; %d of them when listing "
      "the input), each named in a warning above",
      summary["skipped"],
      plan.skipped_at_listing,
    )
  logging.info("Wrote the features of %d inputs to %s", summary["written"], output)
  return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script, so importing this module adds none."""
  flags.DEFINE_string("checkpoint", None, "Pretraining work directory, or one checkpoint step.")
  flags.DEFINE_string(
    "input", None, "Audio folder or manifest .tsv; image folder; text file (one per line)."
  )
  flags.DEFINE_string("output", None, "Directory for the feature files and index.tsv.")
  flags.DEFINE_string("layers", "all", "'all', 'last', or indices such as '0,6,12'.")
  flags.DEFINE_enum("format", "npz", list(FORMATS), "One .npz or .npy per input.")
  flags.DEFINE_integer("batch_size", 8, "Inputs per forward pass.")


def _quiet_library_logs() -> None:
  """Keeps orbax's INFO lines (a dozen per restore) out of the CLI's log, as main.py does."""

  def keep(record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

  logging.get_absl_handler().addFilter(keep)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _quiet_library_logs()
  values = flags.FLAGS
  try:
    summary = run_extraction(
      values.checkpoint,
      values.input,
      values.output,
      values.layers,
      values.format,
      batch_size=values.batch_size,
    )
  except Exception as error:
    errors.report(error)  # a missing input, a damaged checkpoint: one message, exit 1
    raise
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "input", "output"])
  app.run(main)
