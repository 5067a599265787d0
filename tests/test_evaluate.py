"""The probes (linear and kNN), probe data, and `mode=probe` on a checkpoint."""

import json

import numpy as np
import pytest

from d2v_jax import evaluate, train
from d2v_jax.data import sources
from tests.test_train import tiny_config

GRID = (1e-4, 1e-2, 1.0)


def test_linear_probe_separates_separable_classes_and_not_shuffled_ones():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 3
  labels = rng.integers(0, 4, size=400)
  x = centres[labels] + rng.normal(size=(400, 16))
  kwargs = dict(num_classes=4, seed=0, l2_grid=GRID)
  acc, _ = evaluate.fit_linear_probe(x[:300], labels[:300], x[300:], labels[300:], **kwargs)
  assert acc > 0.95
  shuffled = rng.permutation(labels)
  acc, _ = evaluate.fit_linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:], **kwargs)
  assert acc < 0.5


def test_softmax_regression_reaches_the_regularised_optimum():
  """At the returned weights the objective's gradient (written out in numpy) vanishes."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 12)).astype(np.float32)
  y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.int32) + (x[:, 1] > 1)
  norms = []
  for l2 in (1e-3, 1e-1):
    fitted = evaluate.fit_softmax_regression(x, y, l2, num_classes=3)
    w, b = np.asarray(fitted["w"], np.float64), np.asarray(fitted["b"], np.float64)
    logits = x @ w + b
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    residual = (probs - np.eye(3)[y]) / len(y)  # d(mean cross-entropy) / d logits
    assert np.abs(x.T @ residual + 2 * l2 * w).max() < 1e-4
    assert np.abs(residual.sum(0)).max() < 1e-4
    norms.append(np.linalg.norm(w))
  assert norms[1] < norms[0]  # the stronger penalty gives the smaller weights


def test_linear_probe_chooses_its_l2_on_held_out_data():
  """A strength that flattens the classifier to its bias loses on the held-out part."""
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(3, 8)) * 2
  labels = rng.integers(0, 3, size=400)
  x = centres[labels] + rng.normal(size=(400, 8))
  for grid in ((1e-3, 100.0), (100.0, 1e-3)):
    acc, l2 = evaluate.fit_linear_probe(
      x[:300], labels[:300], x[300:], labels[300:], num_classes=3, seed=1, l2_grid=grid
    )
    assert l2 == 1e-3 and acc > 0.8
  acc, _ = evaluate.fit_linear_probe(
    x[:300], labels[:300], x[300:], labels[300:], num_classes=3, seed=1, l2_grid=(100.0,)
  )
  assert acc < 0.6  # what the probe avoided: about the majority class


def test_knn_matches_a_brute_force_weighted_vote():
  rng = np.random.default_rng(1)
  train_x, test_x = rng.normal(size=(50, 8)), rng.normal(size=(30, 8))
  train_y, test_y = rng.integers(0, 3, 50), rng.integers(0, 3, 30)
  k, temperature = 5, 0.1
  centred = train_x - train_x.mean(0)
  unit_train = centred / np.linalg.norm(centred, axis=1, keepdims=True)
  correct = 0
  for x, y in zip(test_x, test_y):
    q = x - train_x.mean(0)
    similarity = unit_train @ (q / np.linalg.norm(q))
    votes = np.zeros(3)
    for i in np.argsort(-similarity)[:k]:
      votes[train_y[i]] += np.exp(similarity[i] / temperature)
    correct += votes.argmax() == y
  got = evaluate.knn_accuracy(
    train_x, train_y, test_x, test_y, num_classes=3, k=k, temperature=temperature
  )
  assert got == correct / 30


def test_knn_finds_clusters_and_not_shuffled_labels():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 3
  labels = rng.integers(0, 4, size=400)
  x = centres[labels] + rng.normal(size=(400, 16))
  assert evaluate.knn_accuracy(x[:300], labels[:300], x[300:], labels[300:], num_classes=4) > 0.95
  shuffled = rng.permutation(labels)
  acc = evaluate.knn_accuracy(x[:300], shuffled[:300], x[300:], shuffled[300:], num_classes=4)
  assert acc < 0.5


def test_word_clips_are_padded_normalised_and_labelled():
  train_set, test_set = evaluate.load_probe_sets(tiny_config(total_steps=1))
  assert len(train_set.labels) == 360 and len(test_set.labels) == 120
  assert train_set.class_names == test_set.class_names and len(train_set.class_names) == 12
  assert train_set.inputs.shape[1] % 320 == 0
  # Per-utterance normalisation as fairseq's: (x - mean) / sqrt(var + 1e-5) over valid samples.
  clip = sources.load_embedded_speech_index(split="train", kind="word")[0]
  raw = sources.read_audio(clip.path, 16000)
  valid = ~train_set.padding_mask[0]
  assert valid.sum() == len(raw)
  want = (raw - raw.mean()) / np.sqrt(raw.var() + 1e-5)
  np.testing.assert_allclose(train_set.inputs[0][valid], want, rtol=1e-4, atol=1e-5)
  assert np.all(train_set.inputs[train_set.padding_mask] == 0)
  assert set(np.bincount(train_set.labels)) == {30}


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_probe_mode_scores_checkpoint_and_initialisation(tmp_path, modality):
  """Images also probe during training, every 2 steps of 2: the end-of-run report reuses that
  last probe's scores, which must be what `mode=probe` computes afresh on the checkpoint."""
  config = tiny_config(total_steps=2, modality=modality)
  if modality == "image":
    config.probe.update(enabled=True, seeds=(0,), every=2)
  train.train_and_evaluate(config, tmp_path)
  during_training = (
    json.loads((tmp_path / "probe.json").read_text()) if modality == "image" else None
  )
  with config.unlocked():
    config.probe.update(enabled=True, seeds=(0,))
    config.mode = "probe"  # as main.py sets it: reads the pretraining checkpoint
  result = train.probe_checkpoint(config, tmp_path)
  assert result["step"] == 2 and result["seeds"] == [0]
  for key in ("random", "pretrained"):
    assert len(result[key]) == 1 and 0.0 <= result[key][0] <= 1.0
    assert 0.0 <= result[f"{key}_knn"] <= 1.0
  assert json.loads((tmp_path / "probe.json").read_text())["step"] == 2
  if during_training:
    for key in ("random", "pretrained", "random_knn", "pretrained_knn"):
      assert during_training[key] == result[key], key


def test_digit_probe_sets_are_the_stratified_split_at_the_models_resolution():
  config = tiny_config(total_steps=1, modality="image")
  train_set, test_set = evaluate.load_probe_sets(config)
  assert train_set.inputs.shape == (1442, 16, 16, 3) and test_set.inputs.shape == (355, 16, 16, 3)
  assert train_set.padding_mask is None
  assert train_set.class_names == tuple(str(d) for d in range(10))
  assert set(np.bincount(test_set.labels)) <= {34, 35, 36, 37}  # every 5th scan of each class
