"""Probes of a frozen encoder: a linear classifier and k-nearest neighbours on pooled features.

The encoder runs in eval mode on unmasked inputs. The embedding output and each block's output
are mean-pooled over valid positions (frames, patches or tokens: an image model's CLS is not among
them) and concatenated, [N, (L + 1) * D]: like SUPERB's weighted sum of layers, the classifier
may read whichever depth carries the labels, but it is not tied to one fixed mix. Two evaluators
read these features:
- linear: standardised with training statistics, a softmax classifier fitted by full-batch
  L-BFGS from zero (the problem is convex: no start or batch order to draw, and 100 iterations
  leave the text probe's test accuracy within 0.2 points of 200). Its L2 strength is chosen
  from `l2_grid` on a held-out fifth of the training split, then refitted on the whole training
  split and scored on the test split. The probe seed draws that held-out fifth: one result per
  seed;
- kNN: centred with the training mean and L2-normalised; each test example takes a vote of its
  k most cosine-similar training examples weighted by exp(similarity / T) (DINO's weighted kNN;
  deterministic). It asks whether the feature space's geometry groups the classes, without
  fitting anything.
Probe sets:
- speech: the embedded spoken words, train/test split by voice (speaker-independent);
- images: the embedded digits, resized whole to the model's resolution, stratified split;
- text: the embedded King James Bible's verses labelled by genre (6 classes), train and test
  chapters disjoint; `config.probe.max_train` / `max_test` take a fixed, class-stratified
  subset of each split (0 = all of it).

Results are reported per seed and as the mean, for the pretrained encoder and for the same
encoder at initialisation.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from d2v_jax.data import audio as audio_data
from d2v_jax.data import batching, sources, text_corpus
from d2v_jax.data import image as image_data
from d2v_jax.data import text as text_data

_FRAME_STRIDE = 320  # the conv stack's hop: pad clips to whole frames


@dataclasses.dataclass(frozen=True)
class ProbeData:
  """Fixed-length, normalised clips with integer labels."""

  inputs: np.ndarray  # [N, T] float32 audio, or [N, S, S, 3] float32 images
  padding_mask: np.ndarray | None  # [N, T] bool, True = padded; None for images
  labels: np.ndarray  # [N] int32
  class_names: tuple[str, ...]


def load_word_clips(split: str, sample_rate: int = 16000, class_names=None) -> ProbeData:
  """The embedded set's word clips of `split`, padded to one length, normalised per utterance."""
  clips = sources.load_embedded_speech_index(split=split, kind="word")
  if not clips:
    raise ValueError(f"The embedded speech set has no word clips in split {split!r}")
  class_names = class_names or tuple(sorted({c.word for c in clips}))
  waves, kept = [], []
  for clip in clips:
    try:
      waves.append(sources.read_audio(clip.path, sample_rate))
      kept.append(clip)
    except (RuntimeError, OSError) as error:  # undecodable or non-finite: counted, named
      logging.warning("Probe set: skipping %s (%s)", clip.path, error)
  if len(kept) < len(clips):
    logging.warning(
      "Probe set (%s): skipped %d of %d clips", split, len(clips) - len(kept), len(clips)
    )
  if not kept:
    raise ValueError(f"No word clip of split {split!r} decodes: the probe set is empty")
  clips = kept
  longest = max(len(w) for w in waves)
  length = -(-longest // _FRAME_STRIDE) * _FRAME_STRIDE
  audio = np.zeros((len(waves), length), np.float32)
  padding = np.ones((len(waves), length), bool)
  for i, wave in enumerate(waves):
    padded = np.pad(wave, (0, length - len(wave)))
    audio[i] = audio_data.normalize_utterance(padded, len(wave))
    padding[i, : len(wave)] = False
  labels = np.asarray([class_names.index(c.word) for c in clips], np.int32)
  return ProbeData(audio, padding, labels, class_names)


def pooled_features(model, params, data: ProbeData, batch_size: int = 32) -> np.ndarray:
  """[N, (L + 1) * D]: the embedding output and every block's output, each mean-pooled over
  valid positions, concatenated."""

  @jax.jit
  def features(inputs, padding):
    variables = {"params": params}
    tokens, token_padding = model.apply(variables, inputs, padding, train=False, method=model.embed)
    _, aux = model.apply(variables, tokens, token_padding, train=False, method=model.encode)
    valid = (~token_padding)[..., None].astype(jnp.float32)  # [B, T, 1]
    layers = [tokens] + [r["block"] for r in aux["layers"]]  # L + 1 of [B, T, D]
    count = jnp.maximum(jnp.sum(valid, 1), 1.0)  # [B, 1]
    return jnp.concatenate([jnp.sum(x * valid, 1) / count for x in layers], axis=-1)

  n = len(data.labels)
  out = []
  for start in range(0, n, batch_size):
    inputs = data.inputs[start : start + batch_size]
    short = batch_size - len(inputs)  # pad the last batch so the function compiles once
    inputs = np.pad(inputs, [(0, short)] + [(0, 0)] * (inputs.ndim - 1))
    padding = None
    if data.padding_mask is not None:
      padding = data.padding_mask[start : start + batch_size]
      padding = np.pad(padding, ((0, short), (0, 0)), constant_values=True)
    out.append(np.asarray(features(inputs, padding))[: batch_size - short])
  return np.concatenate(out)


def _standardise(fit_x, *others):
  """Every array scaled with `fit_x`'s per-feature mean and standard deviation."""
  mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
  return [(x - mean) / std for x in (fit_x, *others)]


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_softmax_regression(x, y, l2, *, num_classes: int, steps: int = 100) -> dict:
  """Minimises mean cross-entropy + l2 * |w|² by full-batch L-BFGS from zero.

  x: [N, F], y: [N] int, l2: a scalar (traced: one compilation serves every strength). Returns
  {"w": [F, C], "b": [C]}. Strengths are fitted one at a time: vmapped, the line search's
  while loops made the fits ~40x slower on CPU.
  """

  def loss(p):
    logits = x @ p["w"] + p["b"]  # [N, C]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return xent + l2 * jnp.sum(jnp.square(p["w"]))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), None

  p = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  (p, _), _ = jax.lax.scan(body, (p, solver.init(p)), None, length=steps)
  return p


def _accuracy(params, x, y) -> float:
  predictions = np.argmax(np.asarray(x @ params["w"] + params["b"]), axis=-1)
  return float(np.mean(predictions == np.asarray(y)))


def fit_linear_probe(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  num_classes: int,
  seed: int,
  l2_grid: tuple[float, ...],
  held_out: float = 0.2,
) -> tuple[float, float]:
  """Softmax regression on standardised features: (test accuracy, the L2 strength chosen).

  `seed` draws a held-out part (`held_out`) of the training split; each strength of `l2_grid` is
  fitted on the rest and the most accurate on the held-out part (the strongest among ties) is
  refitted on the whole training split.
  """
  train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
  order = np.random.default_rng(seed).permutation(len(train_y))
  num_held = max(1, int(round(held_out * len(train_y))))
  held, rest = order[:num_held], order[num_held:]
  rest_x, held_x = _standardise(train_x[rest], train_x[held])
  held_acc = []  # [G]
  for l2 in l2_grid:
    fitted = fit_softmax_regression(rest_x, train_y[rest], l2, num_classes=num_classes)
    held_acc.append(_accuracy(fitted, held_x, train_y[held]))
  held_acc = np.asarray(held_acc)
  best = len(l2_grid) - 1 - int(np.argmax(held_acc[::-1]))  # ties go to the stronger L2
  all_x, test_x = _standardise(train_x, test_x)
  final = fit_softmax_regression(all_x, train_y, l2_grid[best], num_classes=num_classes)
  return _accuracy(final, test_x, test_y), float(l2_grid[best])


def knn_accuracy(
  train_x, train_y, test_x, test_y, *, num_classes: int, k: int = 20, temperature: float = 0.07
) -> float:
  """Weighted kNN on cosine similarity of centred features; returns test accuracy."""
  mean = train_x.mean(0)

  def unit(x):
    x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

  train_x, test_x = unit(train_x), unit(test_x)
  k = min(k, len(train_y))
  correct = 0
  for start in range(0, len(test_y), 1024):  # [b, N] similarities at a time
    similarity = test_x[start : start + 1024] @ train_x.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [b, k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    votes = np.zeros((len(nearest), num_classes))
    np.add.at(votes, (np.arange(len(nearest))[:, None], train_y[nearest]), weights)
    correct += int(np.sum(votes.argmax(1) == test_y[start : start + 1024]))
  return correct / len(test_y)


def probe_scores(model, params, probe_cfg, train: ProbeData, test: ProbeData) -> dict:
  """{"linear": test accuracy per probe seed, "l2": the L2 strength each seed chose, "knn": kNN
  test accuracy} of `params`' features."""
  if "l2_grid" not in probe_cfg:  # a work directory's config.json from before the L-BFGS probe
    raise ValueError(
      "config.probe has no l2_grid (the linear probe's L2 strengths): this config was written "
      "before the probe chose its L2; probe with --config=configs/<modality>.py instead"
    )
  train_x = pooled_features(model, params, train, probe_cfg.batch_size)
  test_x = pooled_features(model, params, test, probe_cfg.batch_size)
  num_classes = len(train.class_names)
  knn = knn_accuracy(
    train_x,
    train.labels,
    test_x,
    test.labels,
    num_classes=num_classes,
    k=probe_cfg.get("knn_k", 20),
    temperature=probe_cfg.get("knn_temperature", 0.07),
  )
  accuracies, strengths = [], []
  for seed in probe_cfg.seeds:
    acc, l2 = fit_linear_probe(
      train_x,
      train.labels,
      test_x,
      test.labels,
      num_classes=num_classes,
      seed=seed,
      l2_grid=tuple(probe_cfg.l2_grid),
    )
    accuracies.append(acc)
    strengths.append(l2)
  logging.info(
    "probe accuracy per seed %s (L2 chosen: %s): mean %.4f; kNN %.4f",
    accuracies,
    strengths,
    np.mean(accuracies),
    knn,
  )
  return {"linear": accuracies, "l2": strengths, "knn": knn}


def load_digit_images(config) -> tuple[ProbeData, ProbeData]:
  """The embedded digits' train and test splits at the model's resolution, normalised."""
  train, test = image_data.load_digit_probe_sets(
    config.model.image_size, config.input.mean, config.input.std
  )
  return tuple(ProbeData(d.images, None, d.labels, tuple(d.class_names)) for d in (train, test))


def load_verses(config) -> tuple[ProbeData, ProbeData]:
  """Genre-labelled verses of the embedded corpus, tokenized as `<s> verse </s>`, padded."""
  tokenizer = text_data.load_tokenizer_for(config.input)
  sets = []
  for data, size in zip(
    text_corpus.load_embedded_probe_sets(),
    (config.probe.max_train, config.probe.max_test),
    strict=True,
  ):
    keep = batching.stratified_subset(data.labels, size)
    tokens, padding = text_data.encode_for_probe(
      [data.texts[i] for i in keep], tokenizer, config.model.max_positions
    )
    sets.append(ProbeData(tokens, padding, data.labels[keep], tuple(data.class_names)))
  return tuple(sets)


def load_probe_sets(config) -> tuple[ProbeData, ProbeData]:
  """(train, test) probe data of `config.modality`'s embedded set."""
  if config.modality == "audio":
    train = load_word_clips("train", config.input.sample_rate)
    test = load_word_clips("test", config.input.sample_rate, class_names=train.class_names)
    return train, test
  if config.modality == "image":
    return load_digit_images(config)
  if config.modality == "text":
    return load_verses(config)
  raise ValueError(f"No probe set for modality {config.modality!r}")
