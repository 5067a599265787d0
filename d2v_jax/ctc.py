"""CTC for speech recognition fine-tuning: letter targets, loss, greedy decoding (spec §1.6).

Targets follow fairseq's wav2vec / data2vec letter labels (`.ltr` files): the upper-cased
transcript spelled out letter by letter, each word followed by the boundary symbol `|`, so
"HELLO WORLD" is trained as "H E L L O | W O R L D |". Id 0 is the CTC blank, the letters follow.

The loss mirrors fairseq's `ctc` criterion as the wav2vec fine-tuning configs set it:
`zero_infinity: true` (an utterance too short for its transcript contributes 0 instead of inf) and
`sentence_avg: true` (the summed loss is divided by the number of utterances).
"""

import collections
import pathlib
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

BLANK_ID = 0
WORD_BOUNDARY = "|"
# fairseq's Dictionary puts <s>, <pad>, </s>, <unk> before the file's symbols; <s> is its blank.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def words_to_letters(transcript: str) -> str:
  """fairseq's letter target line: "hello  world" -> "H E L L O | W O R L D |".

  Upper-cased, whitespace runs become one boundary, and the line always ends with `|` (as
  fairseq's `libri_labels.py` writes it, so an empty transcript gives "|").
  """
  words = transcript.upper().split()
  return " ".join(WORD_BOUNDARY.join(words)) + (" " if words else "") + WORD_BOUNDARY


class LetterVocabulary:
  """CTC output vocabulary: id 0 = blank, ids 1.. = `letters` in order.

  Saved as fairseq's `dict.ltr.txt` ("SYMBOL COUNT" lines, letters only), so a saved vocabulary
  is one fairseq can read and `load` is `from_fairseq_dict`.
  """

  def __init__(self, letters: Sequence[str], counts: Sequence[int] | None = None):
    letters = tuple(letters)
    counts = (0,) * len(letters) if counts is None else tuple(int(c) for c in counts)
    if len(counts) != len(letters):
      raise ValueError(f"{len(counts)} counts for {len(letters)} letters")
    for letter in letters:
      if not letter or any(ch.isspace() for ch in letter):
        raise ValueError(f"letter {letter!r}: symbols must be non-empty and without whitespace")
    duplicates = sorted(s for s, n in collections.Counter(letters).items() if n > 1)
    if duplicates:
      raise ValueError(f"letters {duplicates} appear more than once")
    if WORD_BOUNDARY not in letters:
      raise ValueError(f"letters must include the word boundary {WORD_BOUNDARY!r}")
    self.letters = letters
    self.counts = counts
    self._ids = {letter: i + 1 for i, letter in enumerate(letters)}

  def __len__(self) -> int:
    """Size V of the CTC output layer, blank included."""
    return len(self.letters) + 1

  def __eq__(self, other) -> bool:
    return isinstance(other, LetterVocabulary) and self.letters == other.letters

  def __repr__(self) -> str:
    return f"LetterVocabulary({''.join(self.letters)!r})"

  @classmethod
  def from_transcripts(cls, transcripts: Iterable[str]) -> "LetterVocabulary":
    """Every symbol of the transcripts' letter lines, sorted (deterministic), with counts."""
    counts = collections.Counter()
    for transcript in transcripts:
      counts.update(words_to_letters(transcript).split())
    letters = sorted(counts)
    return cls(letters, [counts[letter] for letter in letters])

  @classmethod
  def from_fairseq_dict(cls, path) -> "LetterVocabulary":
    """Reads fairseq's `dict.ltr.txt`: letters keep the file's order, after our blank.

    fairseq ids are shifted by its 4 specials (`fairseq_output_rows` maps them back).
    """
    letters, counts = [], []
    for line_number, line in enumerate(pathlib.Path(path).read_text("utf-8").splitlines(), 1):
      if not line.strip():
        continue
      fields = line.split()
      if len(fields) != 2 or not fields[1].isdigit():
        raise ValueError(f"{path}:{line_number}: expected 'SYMBOL COUNT', got {line!r}")
      if fields[0] in FAIRSEQ_SPECIALS:
        raise ValueError(f"{path}:{line_number}: {fields[0]} is one of fairseq's built-in specials")
      letters.append(fields[0])
      counts.append(int(fields[1]))
    return cls(letters, counts)

  load = from_fairseq_dict

  def save(self, path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s} {n}\n" for s, n in zip(self.letters, self.counts, strict=True)))

  def fairseq_output_rows(self) -> np.ndarray:
    """int32[V]: row of a fairseq (or HF) CTC head with this dictionary for each of our ids.

    Our blank is fairseq's <s> (row 0); letter i (id i) is row i + 3 after <pad>, </s>, <unk>.
    Gathering these rows of a converted head's kernel gives a head for this vocabulary.
    """
    first_letter_row = len(FAIRSEQ_SPECIALS)
    letter_rows = np.arange(first_letter_row, first_letter_row + len(self.letters))
    return np.concatenate([[0], letter_rows]).astype(np.int32)

  def _lookup(self, symbols: list[str], where: str) -> np.ndarray:
    unknown = [s for s in symbols if s not in self._ids]
    if unknown:
      raise ValueError(f"{unknown[0]!r} of {where} is not in the vocabulary {self}")
    return np.asarray([self._ids[s] for s in symbols], np.int32)

  def encode_letters(self, letter_line: str) -> np.ndarray:
    """int32[L] ids of a space-separated letter line ("H E L L O | W O R L D |")."""
    return self._lookup(letter_line.split(), f"letter line {letter_line!r}")

  def encode(self, transcript: str) -> np.ndarray:
    """int32[L] target ids of a word transcript, via `words_to_letters` ("HELLO WORLD")."""
    return self._lookup(words_to_letters(transcript).split(), f"transcript {transcript!r}")

  def decode(self, ids) -> str:
    """Words of a sequence of ids: blanks dropped, `|` read as a space, whitespace normalised.

    Repeats are kept: collapse CTC frames first (`greedy_decode`).
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
      raise ValueError(f"ids must be in [0, {len(self)}); got min {ids.min()}, max {ids.max()}")
    text = "".join(self.letters[i - 1] for i in ids.tolist() if i != BLANK_ID)
    return " ".join(text.replace(WORD_BOUNDARY, " ").split())


def ctc_feasible(logit_padding, labels, label_padding):
  """bool[B]: whether each example's valid frames can emit its label sequence at all.

  CTC needs one frame per label plus a blank between each pair of equal neighbours, so an example
  is feasible iff valid frames >= L + (repeated neighbours). Labels must be right-padded.
  """
  valid = ~label_padding  # [B, L]
  repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]  # [B, L-1]
  needed = jnp.sum(valid, axis=1) + jnp.sum(repeats, axis=1)  # [B]
  return jnp.sum(~logit_padding, axis=1) >= needed


def ctc_loss(logits, logit_padding, labels, label_padding, blank_id: int = BLANK_ID):
  """Per-example CTC negative log-likelihood, infeasible examples zeroed (fairseq zero_infinity).

  optax does not return inf for an infeasible example but a large finite value (its log(0) is
  -1e5) that still has a gradient, so infeasibility is tested exactly (`ctc_feasible`) and those
  examples get loss 0 and no gradient.

  Args:
    logits: [B, T, V] unnormalised frame scores.
    logit_padding: bool[B, T], True at padded frames.
    labels: int32[B, L] target ids, never `blank_id` at valid positions.
    label_padding: bool[B, L], True at padded labels (right padding).
    blank_id: the CTC blank's id.

  Returns:
    (losses float32[B] in nats, num_infeasible int32 scalar).
  """
  raw = optax.ctc_loss(
    logits.astype(jnp.float32),
    logit_padding.astype(jnp.float32),
    labels,
    label_padding.astype(jnp.float32),
    blank_id=blank_id,
  )  # [B]
  feasible = ctc_feasible(logit_padding, labels, label_padding)
  losses = jnp.where(feasible, raw, 0.0)
  return losses, jnp.sum(~feasible).astype(jnp.int32)


def reduce_ctc_loss(losses, label_padding, example_mask=None, *, sentence_avg: bool = True):
  """fairseq's normalisation of the summed CTC loss; returns (loss, sample_size).

  fairseq's criterion returns the sum over the batch and the trainer divides by `sample_size`
  summed over all workers and accumulation steps: the number of utterances when `sentence_avg`
  (every wav2vec / data2vec fine-tuning config), else the number of target letters. Zeroed
  infeasible examples still count in it, as in fairseq. fairseq logs the loss in bits (÷ ln 2);
  this returns nats. Call it on the global batch so that the division matches.

  Args:
    losses: float[B] from `ctc_loss`.
    label_padding: bool[B, L], True at padded labels.
    example_mask: bool[B], True for real examples (False for batch-filling rows); None = all.
    sentence_avg: divide by utterances (True) or by target letters (False).
  """
  if example_mask is None:
    example_mask = jnp.ones(losses.shape, bool)
  weights = example_mask.astype(jnp.float32)  # [B]
  if sentence_avg:
    sample_size = jnp.sum(weights)
  else:
    sample_size = jnp.sum(jnp.sum(~label_padding, axis=1) * weights)
  total = jnp.sum(losses.astype(jnp.float32) * weights)
  return total / jnp.maximum(sample_size, 1.0), sample_size


def greedy_decode(logits, logit_padding=None, blank_id: int = BLANK_ID) -> list[np.ndarray]:
  """Best-path decoding on host: per-frame argmax, padded frames dropped, repeats collapsed,
  blanks dropped. logits: [B, T, V]; logit_padding: bool[B, T] or None. Returns B int32 arrays.
  """
  best = np.argmax(np.asarray(logits), axis=-1)  # [B, T]
  if logit_padding is None:
    logit_padding = np.zeros(best.shape, bool)
  logit_padding = np.asarray(logit_padding, bool)
  decoded = []
  for frames, padding in zip(best, logit_padding, strict=True):
    frames = frames[~padding]  # [T_valid]
    # A frame starts a new symbol when it differs from the previous one (blank runs included).
    is_new = np.ones(frames.shape, bool)
    is_new[1:] = frames[1:] != frames[:-1]
    symbols = frames[is_new]
    decoded.append(symbols[symbols != blank_id].astype(np.int32))
  return decoded
