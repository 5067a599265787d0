"""Tests for d2v_jax/scores.py: hand-counted small cases, then scikit-learn / scipy cross-checks."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from d2v_jax import scores

# Binary example used by several tests: TP = 2 (0, 3), TN = 2 (2, 5), FP = 1 (1), FN = 1 (4).
BIN_PRED = [1, 1, 0, 1, 0, 0]
BIN_LABEL = [1, 0, 0, 1, 1, 0]


def test_accuracy_counts_matches():
  assert scores.accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 0.75


def test_top_k_accuracy_by_hand():
  logits = [[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]]
  labels = [2, 1, 0]
  assert scores.top_k_accuracy(logits, labels, 1) == 0.0  # argmaxes 1, 0, 2
  assert scores.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)  # row 2's 0 is last
  assert scores.top_k_accuracy(logits, labels, 3) == 1.0


def test_top_k_accuracy_ties_count_against_the_label():
  assert scores.top_k_accuracy([[1.0, 1.0, 0.0]], [0], 1) == 0.0
  assert scores.top_k_accuracy([[1.0, 1.0, 0.0]], [0], 2) == 1.0
  assert scores.top_k_accuracy(np.zeros((4, 5)), [0, 1, 2, 3], 4) == 0.0


def test_top_k_accuracy_rejects_bad_k():
  with pytest.raises(ValueError, match="k=4"):
    scores.top_k_accuracy(np.zeros((2, 3)), [0, 1], 4)


def test_f1_by_hand():
  assert scores.f1(BIN_PRED, BIN_LABEL) == pytest.approx(4 / 6)  # 2·2 / (2·2 + 1 + 1)
  assert scores.f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positives at all: sklearn's 0
  assert scores.f1([1, 1, 0], [0, 0, 0]) == 0.0


def test_macro_f1_by_hand():
  # class 0: 1; class 1: TP 1, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 2/3.
  assert scores.macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_matthews_corrcoef_by_hand():
  # (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / √(3⁴)
  assert scores.matthews_corrcoef(BIN_PRED, BIN_LABEL) == pytest.approx(1 / 3)
  assert scores.matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
  assert scores.matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_matthews_corrcoef_is_zero_when_degenerate():
  assert scores.matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0  # one predicted class
  assert scores.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0  # one true class
  assert skm.matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0


def test_pearson_by_hand():
  # dx = (−1, 0, 1), dy = (−4/3, −1/3, 5/3): Σdxdy = 3, Σdx² = 2, Σdy² = 14/3.
  assert scores.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
  assert scores.pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)


def test_correlations_of_a_constant_are_zero():
  assert scores.pearson([0.1] * 5, [1, 2, 3, 4, 5]) == 0.0
  assert scores.spearman([1, 2, 3], [7, 7, 7]) == 0.0


def test_average_ranks_share_ties():
  np.testing.assert_array_equal(scores.average_ranks([3, 1, 3, 3, 0]), [4, 2, 4, 4, 1])


def test_spearman_with_ties_by_hand():
  # ranks x = (1, 2.5, 2.5, 4), y = (1, 2, 3, 4): Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5.
  assert scores.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(math.sqrt(0.9))


def test_mismatched_or_empty_inputs_raise():
  with pytest.raises(ValueError, match="differ in length"):
    scores.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="empty"):
    scores.f1([], [])
  with pytest.raises(ValueError, match="at least 2"):
    scores.pearson([1.0], [2.0])


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_scores_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 40)
  predictions = np.where(rng.random(40) < 0.7, labels, 1 - labels)
  assert scores.accuracy(predictions, labels) == pytest.approx(
    skm.accuracy_score(labels, predictions)
  )
  assert scores.f1(predictions, labels) == pytest.approx(skm.f1_score(labels, predictions))
  assert scores.matthews_corrcoef(predictions, labels) == pytest.approx(
    skm.matthews_corrcoef(labels, predictions)
  )
  labels3 = rng.integers(0, 3, 40)
  predictions3 = np.where(rng.random(40) < 0.5, labels3, rng.integers(0, 3, 40))
  assert scores.macro_f1(predictions3, labels3) == pytest.approx(
    skm.f1_score(labels3, predictions3, average="macro")
  )
  assert scores.matthews_corrcoef(predictions3, labels3) == pytest.approx(
    skm.matthews_corrcoef(labels3, predictions3)
  )


def test_top_k_accuracy_matches_sklearn():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((30, 5))  # continuous: no ties
  labels = rng.integers(0, 5, 30)
  for k in (1, 2, 4):
    expected = skm.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(5))
    assert scores.top_k_accuracy(logits, labels, k) == pytest.approx(expected)


def test_correlations_match_scipy():
  rng = np.random.default_rng(3)
  x = rng.standard_normal(25)
  y = 0.6 * x + rng.standard_normal(25)
  assert scores.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
  xi, yi = np.round(2 * x), np.round(2 * y)  # many ties
  assert scores.spearman(xi, yi) == pytest.approx(stats.spearmanr(xi, yi).statistic)
  np.testing.assert_allclose(scores.average_ranks(xi), stats.rankdata(xi))


def test_word_error_rate_hand_counted():
  assert scores.word_error_rate(["the cat sat"], ["the bat sat"]) == pytest.approx(1 / 3)  # sub
  assert scores.word_error_rate(["the cat sat"], ["the sat"]) == pytest.approx(1 / 3)  # del
  assert scores.word_error_rate(["the cat"], ["the fat cat"]) == pytest.approx(1 / 2)  # ins
  # Corpus level: (1 substitution + 1 insertion) / 5 reference words, not a mean of rates.
  assert scores.word_error_rate(["a b c", "d e"], ["a x c", "d e f"]) == pytest.approx(2 / 5)


def test_char_error_rate_hand_counted():
  assert scores.char_error_rate(["abc"], ["abd"]) == pytest.approx(1 / 3)  # substitution
  assert scores.char_error_rate(["abc"], ["abxc"]) == pytest.approx(1 / 3)  # insertion
  assert scores.char_error_rate(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)  # the space counts
  assert scores.char_error_rate(["ab", "cde"], ["ab", "cd"]) == pytest.approx(1 / 5)  # deletion


def test_error_rates_empty_references():
  # One empty reference: its hypothesis words are insertions, over the other references' words.
  assert scores.word_error_rate(["a b", ""], ["a b", "x y"]) == pytest.approx(1.0)
  assert scores.char_error_rate(["ab", ""], ["ab", "x"]) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="every reference is empty"):
    scores.word_error_rate(["", "  "], ["a", ""])
  with pytest.raises(ValueError, match="every reference is empty"):
    scores.char_error_rate([""], ["a"])
  with pytest.raises(ValueError, match="references is empty"):
    scores.word_error_rate([], [])
  with pytest.raises(ValueError, match="differ in length"):
    scores.char_error_rate(["a"], ["a", "b"])


def _edit_distance(ref, hyp):
  """Levenshtein distance by dynamic programming: an independent reference for jiwer."""
  row = list(range(len(hyp) + 1))
  for i, r in enumerate(ref, 1):
    previous, row[0] = row[0], i
    for j, h in enumerate(hyp, 1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
  return row[-1]


def test_error_rates_match_dynamic_programming():
  rng = np.random.default_rng(4)
  words = ["AA", "B", "CAT", "DOG", "E"]
  refs = [" ".join(rng.choice(words, rng.integers(1, 7))) for _ in range(8)]
  hyps = [" ".join(rng.choice(words, rng.integers(0, 7))) for _ in range(8)]
  word_edits = sum(_edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
  char_edits = sum(_edit_distance(r, h) for r, h in zip(refs, hyps))
  assert scores.word_error_rate(refs, hyps) == pytest.approx(
    word_edits / sum(len(r.split()) for r in refs)
  )
  assert scores.char_error_rate(refs, hyps) == pytest.approx(char_edits / sum(map(len, refs)))


def test_glue_metric_table():
  assert scores.GLUE_METRICS["cola"] == ("mcc",)
  assert scores.GLUE_METRICS["mrpc"] == scores.GLUE_METRICS["qqp"] == ("f1", "accuracy")
  assert scores.GLUE_METRICS["stsb"] == ("pearson", "spearman")
  for task in ("sst2", "mnli", "qnli", "rte"):
    assert scores.GLUE_METRICS[task] == ("accuracy",)


def test_glue_scores():
  assert scores.glue_scores("cola", BIN_PRED, BIN_LABEL) == pytest.approx({"mcc": 1 / 3})
  assert scores.glue_scores("mrpc", BIN_PRED, BIN_LABEL) == pytest.approx(
    {"f1": 2 / 3, "accuracy": 4 / 6}
  )
  stsb = scores.glue_scores("stsb", [1.0, 2.0, 2.0, 3.0], [0.5, 1.0, 4.0, 5.0])
  assert list(stsb) == ["pearson", "spearman"]
  assert stsb["spearman"] == pytest.approx(math.sqrt(0.9))
  with pytest.raises(ValueError, match="task='squad'"):
    scores.glue_scores("squad", [0], [0])
