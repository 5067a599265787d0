"""Fine-tuning evaluation scores on host numpy arrays (spec §1.6).

Predictions are gathered from the devices first; every function here takes whole evaluation sets
and returns a Python float. Classification metrics take class ids (argmax of the logits), except
`top_k_accuracy`, which takes the logits. The GLUE table maps each task to the scores its
leaderboard reports; speech recognition is scored with corpus-level word and character error
rates (total edits over total reference length, as fairseq's CTC criterion logs `wer`/`uer`).

Undefined values follow scikit-learn where it has the metric: F1 is 0 when there are no positive
predictions or labels, MCC is 0 when a row or column of the confusion matrix is empty. Pearson and
Spearman, undefined for a constant input, are 0 too (scipy would return NaN), so model selection
on an evaluation score never has to handle NaN.
"""

import jiwer
import numpy as np


def _class_arrays(predictions, labels):
  """Both as int64 vectors of one length; ValueError on empty or mismatched inputs."""
  predictions = np.asarray(predictions).reshape(-1)
  labels = np.asarray(labels).reshape(-1)
  if predictions.shape != labels.shape:
    raise ValueError(
      f"predictions ({predictions.shape[0]}) and labels ({labels.shape[0]}) differ in length"
    )
  if predictions.size == 0:
    raise ValueError("predictions and labels are empty: a score needs at least one example")
  return predictions.astype(np.int64), labels.astype(np.int64)


def accuracy(predictions, labels) -> float:
  """Fraction of examples whose predicted class equals the label."""
  predictions, labels = _class_arrays(predictions, labels)
  return float(np.mean(predictions == labels))


def top_k_accuracy(logits, labels, k: int) -> float:
  """Fraction of examples whose label is among the k highest-scoring classes.

  A class scoring exactly as high as the label counts against it (ties are pessimistic), so
  constant logits score 0 for k < C rather than a free 1.0.

  Args:
    logits: [N, C] scores (logits or probabilities: only their order matters).
    labels: [N] class ids.
    k: how many top classes count as a hit; 1 <= k <= C.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f"logits must be [N, C] with N = len(labels); got {logits.shape}")
  if labels.size == 0:
    raise ValueError("logits and labels are empty: a score needs at least one example")
  num_classes = logits.shape[1]
  if not 1 <= k <= num_classes:
    raise ValueError(f"k={k}: must be between 1 and the number of classes {num_classes}")
  label_scores = np.take_along_axis(logits, labels[:, None], axis=1)  # [N, 1]
  # Classes other than the label that score at least as high as it.
  rivals = np.sum(logits >= label_scores, axis=1) - 1  # [N]
  return float(np.mean(rivals < k))


def _binary_f1(predictions, labels, positive) -> float:
  predicted = predictions == positive
  actual = labels == positive
  true_pos = np.sum(predicted & actual)
  errors = np.sum(predicted != actual)  # false positives + false negatives
  denominator = 2 * true_pos + errors
  return float(2 * true_pos / denominator) if denominator else 0.0


def f1(predictions, labels) -> float:
  """Binary F1 of class 1 (GLUE MRPC and QQP): 2·TP / (2·TP + FP + FN); 0 with no positives."""
  predictions, labels = _class_arrays(predictions, labels)
  return _binary_f1(predictions, labels, 1)


def macro_f1(predictions, labels) -> float:
  """Unweighted mean of per-class F1 over every class seen in labels or predictions."""
  predictions, labels = _class_arrays(predictions, labels)
  classes = np.union1d(predictions, labels)
  return float(np.mean([_binary_f1(predictions, labels, c) for c in classes]))


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation (GLUE CoLA), multiclass form (Gorodkin's R_K, as scikit-learn).

  With confusion matrix C, s = N, c = trace(C), t_k = labels of class k, p_k = predictions of
  class k: MCC = (c·s − t·p) / √((s² − p·p)(s² − t·t)). 0 when either factor is 0, i.e. when
  all labels or all predictions fall in one class.
  """
  predictions, labels = _class_arrays(predictions, labels)
  classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
  true_ids, pred_ids = encoded[: labels.size], encoded[labels.size :]
  confusion = np.zeros((classes.size, classes.size), np.float64)
  np.add.at(confusion, (true_ids, pred_ids), 1.0)
  true_counts = confusion.sum(axis=1)
  pred_counts = confusion.sum(axis=0)
  total = confusion.sum()
  correct = np.trace(confusion)
  covariance = correct * total - true_counts @ pred_counts
  pred_spread = total**2 - pred_counts @ pred_counts
  true_spread = total**2 - true_counts @ true_counts
  if pred_spread == 0 or true_spread == 0:
    return 0.0
  return float(covariance / np.sqrt(pred_spread * true_spread))


def _real_pair(x, y):
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"x ({x.shape[0]}) and y ({y.shape[0]}) differ in length")
  if x.size < 2:
    raise ValueError(f"a correlation needs at least 2 pairs; got {x.size}")
  return x, y


def pearson(x, y) -> float:
  """Pearson correlation (GLUE STS-B); 0 when either input is constant."""
  x, y = _real_pair(x, y)
  # Tested on the raw values: x − mean(x) of a constant x can be rounding noise, not 0.
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    return 0.0
  x = x - x.mean()
  y = y - y.mean()
  correlation = np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
  # Clipped: rounding can push perfectly correlated inputs a hair past ±1.
  return float(np.clip(correlation, -1.0, 1.0))


def average_ranks(x) -> np.ndarray:
  """1-based ranks of x; tied values share the mean of the ranks they span (scipy 'average')."""
  x = np.asarray(x).reshape(-1)
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  # Start index of each run of equal values, and its length.
  is_start = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
  starts = np.flatnonzero(is_start)
  lengths = np.diff(np.append(starts, x.size))
  # A run covering sorted positions s..s+n-1 (ranks s+1..s+n) gets rank s + (n + 1) / 2.
  run_ranks = starts + (lengths + 1) / 2.0
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(run_ranks, lengths)
  return ranks


def spearman(x, y) -> float:
  """Spearman rank correlation (GLUE STS-B): Pearson of average ranks; 0 if either is constant."""
  x, y = _real_pair(x, y)
  return pearson(average_ranks(x), average_ranks(y))


def _transcript_lists(references, hypotheses):
  references, hypotheses = list(references), list(hypotheses)
  if len(references) != len(hypotheses):
    raise ValueError(
      f"references ({len(references)}) and hypotheses ({len(hypotheses)}) differ in length"
    )
  if not references:
    raise ValueError("references is empty: an error rate needs at least one reference")
  return references, hypotheses


def word_error_rate(references, hypotheses) -> float:
  """Corpus WER: (substitutions + deletions + insertions) / reference words, over all pairs.

  Words are whitespace-separated and case-sensitive (normalise transcripts before). A single
  empty reference is allowed: its hypothesis words count as insertions. If all references are
  empty the rate is undefined and this raises ValueError (jiwer would return the insertion count).
  """
  references, hypotheses = _transcript_lists(references, hypotheses)
  if sum(len(r.split()) for r in references) == 0:
    raise ValueError("every reference is empty: the word error rate is undefined")
  return float(jiwer.wer(references, hypotheses))


def char_error_rate(references, hypotheses) -> float:
  """Corpus CER: character edits / reference characters, over all pairs.

  Spaces between words are characters too (fairseq's `uer` likewise counts the `|` word
  boundaries); leading and trailing spaces are stripped. Empty references as in
  `word_error_rate`: one is allowed, all empty raises ValueError.
  """
  references, hypotheses = _transcript_lists(references, hypotheses)
  if sum(len(r.strip()) for r in references) == 0:
    raise ValueError("every reference is empty: the character error rate is undefined")
  return float(jiwer.cer(references, hypotheses))


# Scores each GLUE task reports (the leaderboard's, which data2vec and RoBERTa quote). MNLI's
# matched and mismatched dev sets are two evaluations of the "mnli" task.
GLUE_METRICS = {
  "cola": ("mcc",),
  "sst2": ("accuracy",),
  "mnli": ("accuracy",),
  "qnli": ("accuracy",),
  "rte": ("accuracy",),
  "mrpc": ("f1", "accuracy"),
  "qqp": ("f1", "accuracy"),
  "stsb": ("pearson", "spearman"),
}

_METRIC_FUNCTIONS = {
  "mcc": matthews_corrcoef,
  "accuracy": accuracy,
  "f1": f1,
  "pearson": pearson,
  "spearman": spearman,
}


def glue_scores(task: str, predictions, labels) -> dict[str, float]:
  """{metric name: value} for the scores GLUE reports on `task`.

  predictions: class ids for the classification tasks, real-valued similarity for "stsb".
  """
  if task not in GLUE_METRICS:
    raise ValueError(f"task={task!r}: not a GLUE task here; use one of {sorted(GLUE_METRICS)}")
  return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in GLUE_METRICS[task]}
