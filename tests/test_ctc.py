"""Tests for d2v_jax/ctc.py: letter vocabulary, CTC loss against brute-force path sums, decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2v_jax import ctc
from tests.helpers import fast_jit

ctc_loss = fast_jit(ctc.ctc_loss)


# ---------------------------------------------------------------- vocabulary


def test_words_to_letters_follows_fairseq_ltr():
  assert ctc.words_to_letters("HELLO WORLD") == "H E L L O | W O R L D |"
  assert ctc.words_to_letters("  hello \t world ") == "H E L L O | W O R L D |"
  assert ctc.words_to_letters("I'M") == "I ' M |"
  assert ctc.words_to_letters("") == "|"


def test_vocabulary_from_transcripts_is_sorted_with_counts():
  vocab = ctc.LetterVocabulary.from_transcripts(["HELLO WORLD", "hi"])
  assert vocab.letters == tuple("DEHILORW|")  # "|" (0x7C) sorts after the letters
  assert len(vocab) == 10  # blank + 9
  counts = dict(zip(vocab.letters, vocab.counts))
  assert counts["L"] == 3 and counts["|"] == 3 and counts["H"] == 2
  # Same set in another order gives the same vocabulary.
  assert ctc.LetterVocabulary.from_transcripts(["hi", "world hello"]) == vocab


def test_encode_decode_round_trip():
  vocab = ctc.LetterVocabulary.from_transcripts(["HELLO WORLD", "HI"])
  ids = vocab.encode("hello world")
  assert ids.dtype == np.int32
  # D E H I L O R W | -> ids 1..9; blank 0 never appears in targets.
  np.testing.assert_array_equal(ids, [3, 2, 5, 5, 6, 9, 8, 6, 7, 5, 1, 9])
  assert vocab.decode(ids) == "HELLO WORLD"
  assert vocab.decode([0, 3, 0, 4, 9, 0]) == "HI"  # blanks dropped, trailing "|" stripped
  np.testing.assert_array_equal(vocab.encode_letters("H I |"), vocab.encode("HI"))


def test_encode_names_the_unknown_character_and_transcript():
  vocab = ctc.LetterVocabulary.from_transcripts(["HELLO"])
  with pytest.raises(ValueError, match=r"'Z' of transcript 'HELLO ZOO'"):
    vocab.encode("HELLO ZOO")
  with pytest.raises(ValueError, match="must be in"):
    vocab.decode([len(vocab)])


def test_reads_fairseq_dict_ltr(tmp_path):
  path = tmp_path / "dict.ltr.txt"
  path.write_text("| 94802\nE 51860\nT 38431\nA 33152\n' 1000\n")
  vocab = ctc.LetterVocabulary.from_fairseq_dict(path)
  assert vocab.letters == ("|", "E", "T", "A", "'")  # the file's order, after our blank
  assert vocab.counts == (94802, 51860, 38431, 33152, 1000)
  np.testing.assert_array_equal(vocab.encode("EAT'"), [2, 4, 3, 5, 1])
  # fairseq's head: <s>(blank) <pad> </s> <unk> | E T A ' -> our ids take rows 0, 4, 5, ...
  np.testing.assert_array_equal(vocab.fairseq_output_rows(), [0, 4, 5, 6, 7, 8])


@pytest.mark.parametrize(
  "text, message",
  [
    ("| 3\nE\n", "expected 'SYMBOL COUNT'"),
    ("| 3\n<unk> 0\n", "built-in specials"),
    ("E 1\n", "'|'"),
  ],
)
def test_fairseq_dict_errors(tmp_path, text, message):
  path = tmp_path / "dict.ltr.txt"
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    ctc.LetterVocabulary.from_fairseq_dict(path)


def test_save_load_round_trip(tmp_path):
  vocab = ctc.LetterVocabulary.from_transcripts(["A CAB", "BAD"])
  path = tmp_path / "sub" / "dict.ltr.txt"
  vocab.save(path)
  assert path.read_text() == "A 3\nB 2\nC 1\nD 1\n| 3\n"  # fairseq's format
  loaded = ctc.LetterVocabulary.load(path)
  assert loaded == vocab and loaded.counts == vocab.counts


# ---------------------------------------------------------------- loss


def collapse(path, blank=0):
  """CTC's many-to-one map: merge repeats, then drop blanks."""
  merged = [s for i, s in enumerate(path) if i == 0 or s != path[i - 1]]
  return tuple(s for s in merged if s != blank)


def brute_force_nll(logits, label):
  """−log Σ over every frame path that collapses to `label` of Π_t softmax(logits_t)[path_t]."""
  log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))  # [T, V]
  num_frames, vocab = log_probs.shape
  total = 0.0
  for path in itertools.product(range(vocab), repeat=num_frames):
    if collapse(path) == tuple(label):
      total += np.exp(sum(log_probs[t, s] for t, s in enumerate(path)))
  return -np.log(total)


def test_collapse_helper():
  assert collapse((1, 1, 0, 1, 2, 2, 0)) == (1, 1, 2)


# (label, valid frames) per example, V = 3; (1, 1) needs all 3 frames: only path 1 0 1 emits it.
EXAMPLES = [((1,), 3), ((1, 2), 3), ((2, 2), 3), ((2, 1), 2), ((1,), 1)]


def batch_of(examples, num_frames, max_label, rng):
  """Random logits [B, T, 3] and right-padded labels; padding holds random junk."""
  size = len(examples)
  logits = rng.standard_normal((size, num_frames, 3)).astype(np.float32)
  labels = rng.integers(1, 3, (size, max_label)).astype(np.int32)
  label_padding = np.ones((size, max_label), bool)
  logit_padding = np.ones((size, num_frames), bool)
  for i, (label, frames) in enumerate(examples):
    labels[i, : len(label)] = label
    label_padding[i, : len(label)] = False
    logit_padding[i, :frames] = False
  return logits, logit_padding, labels, label_padding


def test_ctc_loss_equals_brute_force_path_sum():
  logits, logit_padding, labels, label_padding = batch_of(EXAMPLES, 3, 2, np.random.default_rng(0))
  losses, num_infeasible = ctc_loss(logits, logit_padding, labels, label_padding)
  expected = [brute_force_nll(logits[i, :t], label) for i, (label, t) in enumerate(EXAMPLES)]
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert int(num_infeasible) == 0


def test_padding_does_not_change_the_loss():
  rng = np.random.default_rng(1)
  short = batch_of(EXAMPLES, 3, 2, rng)
  long = batch_of(EXAMPLES, 6, 4, rng)  # more padded frames and labels, all random junk
  logits = long[0].copy()
  logits[:, :3] = short[0]  # same valid frames
  losses_short, _ = ctc_loss(*short)
  losses_long, _ = ctc_loss(logits, *long[1:])
  np.testing.assert_allclose(losses_long, losses_short, rtol=1e-6)


def test_ctc_feasible_counts_blanks_between_repeats():
  examples = [((1, 1), 2), ((1, 1), 3), ((1, 2, 1), 3), ((1, 2, 1), 2), ((), 0)]
  _, logit_padding, labels, label_padding = batch_of(examples, 4, 3, np.random.default_rng(2))
  feasible = ctc.ctc_feasible(logit_padding, labels, label_padding)
  np.testing.assert_array_equal(feasible, [False, True, True, False, True])


def test_infeasible_examples_are_zeroed_and_counted():
  examples = [((1, 1), 2), ((1, 2), 2), ((1, 2, 1), 2)]
  logits, logit_padding, labels, label_padding = batch_of(examples, 3, 3, np.random.default_rng(3))
  losses, num_infeasible = ctc_loss(logits, logit_padding, labels, label_padding)
  assert int(num_infeasible) == 2
  assert losses[0] == 0.0 and losses[2] == 0.0
  np.testing.assert_allclose(losses[1], brute_force_nll(logits[1, :2], (1, 2)), rtol=1e-5)

  def total(x):
    return jnp.sum(ctc.ctc_loss(x, logit_padding, labels, label_padding)[0])

  grads = np.asarray(fast_jit(jax.grad(total))(logits))
  assert np.all(np.isfinite(grads))
  assert np.all(grads[[0, 2]] == 0.0) and np.any(grads[1] != 0.0)


def test_reduce_ctc_loss_follows_fairseq_sample_size():
  losses = jnp.array([1.0, 2.0, 3.0])
  label_padding = jnp.array([[0, 1, 1], [0, 0, 0], [0, 0, 1]], bool)  # 1, 3, 2 letters
  example_mask = jnp.array([True, True, False])  # last row fills the batch
  loss, size = ctc.reduce_ctc_loss(losses, label_padding, example_mask)
  assert float(size) == 2.0 and float(loss) == pytest.approx(3.0 / 2)
  loss, size = ctc.reduce_ctc_loss(losses, label_padding, example_mask, sentence_avg=False)
  assert float(size) == 4.0 and float(loss) == pytest.approx(3.0 / 4)
  loss, size = ctc.reduce_ctc_loss(losses, label_padding)
  assert float(size) == 3.0 and float(loss) == pytest.approx(2.0)


# ---------------------------------------------------------------- decoding


def one_hot_logits(frames, vocab=3):
  return np.eye(vocab, dtype=np.float32)[np.asarray(frames)]


def test_greedy_decode_collapses_repeats_and_drops_blanks():
  a, b, blank = 1, 2, 0
  frames = [a, a, blank, a, b, b, blank]
  logits = np.stack([one_hot_logits(frames), one_hot_logits([blank] * 7)])
  decoded = ctc.greedy_decode(logits, np.zeros((2, 7), bool))
  np.testing.assert_array_equal(decoded[0], [a, a, b])
  assert decoded[1].shape == (0,) and decoded[0].dtype == np.int32


def test_greedy_decode_drops_padded_frames():
  logits = one_hot_logits([[1, 0, 2, 2, 1, 1], [2, 2, 2, 1, 1, 1]])
  padding = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
  decoded = ctc.greedy_decode(logits, padding)
  np.testing.assert_array_equal(decoded[0], [1, 2])
  np.testing.assert_array_equal(decoded[1], [2])
  np.testing.assert_array_equal(ctc.greedy_decode(logits)[1], [2, 1])


def test_greedy_decode_then_decode_to_words():
  vocab = ctc.LetterVocabulary.from_transcripts(["HI"])  # H=1 I=2 |=3
  frames = [1, 1, 0, 2, 3, 0, 1, 2, 2, 3]
  (ids,) = ctc.greedy_decode(one_hot_logits(frames, len(vocab))[None])
  assert vocab.decode(ids) == "HI HI"
