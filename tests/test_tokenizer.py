"""Byte-level BPE tokenizer: RoBERTa ids, exact round trips, fairseq dict.txt ids, training CLI."""

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2v_jax.data import text_corpus
from d2v_jax.data import tokenizer as tl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
  return tl.load_embedded_tokenizer()


def test_special_ids_are_robertas_and_mask_is_last(tok):
  assert (tl.BOS, tl.PAD, tl.EOS, tl.UNK) == (0, 1, 2, 3)
  assert (tok.bos, tok.pad, tok.eos, tok.unk) == (0, 1, 2, 3)
  assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
  assert tok.mask_id == tok.vocab_size - 1 and tok.id_to_token(tok.mask_id) == "<mask>"
  assert tok.special_ids == (0, 1, 2, 3, tok.mask_id)
  ids = np.array([[0, 5, 300, 2], [1, tok.mask_id, 3, 4]])
  np.testing.assert_array_equal(
    tok.is_special(ids), [[True, False, False, True], [True, True, True, False]]
  )


def test_committed_tokenizer_files(tok):
  directory = tl.EMBEDDED_TOKENIZER_DIR
  vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
  merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
  assert tok.vocab_size == len(vocab) == 4096
  assert sorted(vocab.values()) == list(range(4096))
  assert vocab["<mask>"] == 4095
  assert merges[0].startswith("#version") and len(merges) - 1 == 4096 - 4 - 256 - 1
  # The same files read by tokenizers' own byte-level BPE (what HF RoBERTa tokenizers build on).
  from tokenizers import ByteLevelBPETokenizer

  reference = ByteLevelBPETokenizer.from_file(
    str(directory / "vocab.json"), str(directory / "merges.txt")
  )
  text = "And God said, Let there be light: and there was light. Selah!"
  assert tok.encode(text) == reference.encode(text).ids


@pytest.mark.parametrize(
  "text",
  [
    "In the beginning God created the heaven and the earth.",
    "naïve café, Œuvre — «quoted» ½ ß",
    "日本語のテキストと한국어",
    "emoji 😀 👍🏽 family 👨‍👩‍👧 flag 🇬🇧",
    "   ",
    " \t\n  \r\n",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\nand  double  spaces",
    "<s> <mask> </s> are literal here",
    "\x00\x01 control \x7f",
  ],
)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert ids and all(0 <= i < tok.vocab_size for i in ids)
  assert not tok.is_special(ids).any()  # never <unk>, and special strings stay literal
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos, *ids, tok.eos, tok.pad]) == text


def test_empty_text_and_batches(tok):
  assert tok.encode("") == [] and tok.encode(b"") == []
  texts = ["Jesus wept.", "", "Héllo 😀", " "]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.encode_batch(texts)[1] == []
  assert tok.decode([]) == ""


def test_space_belongs_to_the_following_word_and_no_prefix_space(tok):
  (with_space,) = tok.encode(" And")
  (without,) = tok.encode("And")
  assert tok.id_to_token(with_space) == "ĠAnd" and tok.id_to_token(without) == "And"
  assert tok.encode("And the earth")[0] == without  # nothing is prepended to the text
  assert tok.encode("And the earth")[1:] == [tok.token_to_id("Ġthe"), tok.token_to_id("Ġearth")]


def test_invalid_utf8_is_replaced_and_counted():
  tok = tl.load_embedded_tokenizer()
  assert tok.stats.invalid_utf8 == 0
  assert tok.decode(tok.encode("caf\u00e9".encode())) == "café"
  assert tok.stats.invalid_utf8 == 0
  assert tok.decode(tok.encode(b"bad \xff\xfe end")) == "bad \ufffd\ufffd end"
  assert tok.stats.invalid_utf8 == 1
  assert tok.decode(tok.encode("lone \ud800 surrogate")) == "lone \ufffd surrogate"
  assert tok.stats.invalid_utf8 == 2
  tok.encode_batch([b"\x80", "fine"])
  assert tok.stats.invalid_utf8 == 3
  with pytest.raises(TypeError):
    tok.encode(12)


def test_decode_keeps_specials_on_request_and_rejects_bad_ids(tok):
  ids = tok.encode("Amen.")
  assert tok.decode([0, *ids, tok.mask_id, 2], skip_special=False) == "<s>Amen.<mask></s>"
  with pytest.raises(ValueError, match="outside"):
    tok.decode([tok.vocab_size])


def test_pickles_for_grain_workers(tok):
  clone = pickle.loads(pickle.dumps(tok))
  text = "Blessed are the meek: for they shall inherit the earth."
  assert clone.encode(text) == tok.encode(text) and clone.vocab_size == tok.vocab_size


def test_average_tokens_per_test_verse_matches_the_readme(tok):
  readme = (text_corpus.EMBEDDED_TEXT_DIR / "README.md").read_text(encoding="utf-8")
  row = re.search(r"^\| test \|.*\| ([\d.]+) \|$", readme, re.MULTILINE)
  verses = text_corpus.load_embedded_corpus("test").verses
  lengths = [len(ids) for ids in tok.encode_batch(verses)]
  assert round(float(np.mean(lengths)), 2) == float(row.group(1))


# fairseq gpt2_bpe: GPT-2 encoder.json + vocab.bpe + dict.txt, on a synthetic vocabulary.


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


_MERGES = [
  ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
  ("l", "d"), ("Ġwor", "ld"),
]  # fmt: skip


def _write_gpt2_files(directory: Path) -> dict[str, int]:
  """A GPT-2-like encoder.json (256 bytes, 9 merges, <|endoftext|>) and vocab.bpe."""
  encoder = {char: i for i, char in enumerate(_bytes_to_unicode().values())}
  for a, b in _MERGES:
    encoder[a + b] = len(encoder)
  encoder["<|endoftext|>"] = len(encoder)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
  merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
  (directory / "vocab.bpe").write_text(merges, encoding="utf-8")
  return encoder


def test_bytes_to_unicode_helper_is_gpt2s():
  table = _bytes_to_unicode()
  assert len(set(table.values())) == 256
  assert (table[ord(" ")], table[ord("\n")], table[ord("a")]) == ("Ġ", "Ċ", "a")


def test_fairseq_dict_maps_gpt2_ids_to_checkpoint_ids(tmp_path):
  encoder = _write_gpt2_files(tmp_path / "fairseq")
  question = encoder["?"]
  hello, world = encoder["hello"], encoder["Ġworld"]
  # fairseq dict.txt: GPT-2 ids as strings, most frequent first; "?" is missing; fillers at the end.
  words = [str(world), str(hello), str(encoder["<|endoftext|>"])]
  words += [str(i) for i in reversed(range(len(encoder) - 1)) if i not in (hello, world, question)]
  words += ["madeupword0000", "madeupword0001"]
  lines = [f"{w} {1000 - n}" for n, w in enumerate(words)]
  (tmp_path / "fairseq" / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

  tok = tl.load_tokenizer(tmp_path / "fairseq")
  assert tok.vocab_size == 4 + len(words) + 1 and tok.mask_id == tok.vocab_size - 1
  assert tok.encode("hello world") == [5, 4]  # dict.txt lines 2 and 1, after the 4 specials
  assert tok.encode("hello?") == [5, tl.UNK]  # a GPT-2 id missing from dict.txt -> <unk>
  assert tok.encode("!") == [4 + words.index(str(encoder["!"]))]
  assert tok.decode([0, 5, 4, 2]) == "hello world"
  assert tok.decode([5, tok.mask_id], skip_special=False) == "hello<mask>"
  assert tok.id_to_token(4) == "Ġworld" and tok.token_to_id("hello") == 5
  assert tok.id_to_token(tok.vocab_size - 2) == "madeupword0001"
  assert tok.decode(tok.encode("hello world, hello")) == "hello world, hello"

  # HF's RoBERTa layout stores the same ids directly in vocab.json (no dict.txt): same result.
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  by_gpt2_id = {i: t for t, i in encoder.items()}
  vocab = {s: i for i, s in enumerate(tl.SPECIAL_TOKENS)}
  for n, w in enumerate(words):
    vocab[by_gpt2_id[int(w)] if w.isdigit() else w] = 4 + n
  vocab["<mask>"] = len(vocab)
  (hf_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (hf_dir / "merges.txt").write_text((tmp_path / "fairseq" / "vocab.bpe").read_text())
  hf = tl.load_tokenizer(hf_dir)
  assert (hf.vocab_size, hf.mask_id) == (tok.vocab_size, tok.mask_id)
  for text in ("hello world", "hello?", "world! hello  world\n"):
    assert hf.encode(text) == tok.encode(text), text


def test_fairseq_dict_format_rules(tmp_path):
  path = tmp_path / "dict.txt"
  path.write_text("13 50\n11 40\nmadeupword0000 0\n", encoding="utf-8")
  assert tl.read_fairseq_dict(path) == [*tl.SPECIAL_TOKENS, "13", "11", "madeupword0000", "<mask>"]
  path.write_text("13 50\n<mask> 0\n", encoding="utf-8")  # <mask> present: not appended twice
  assert tl.read_fairseq_dict(path) == [*tl.SPECIAL_TOKENS, "13", "<mask>"]
  path.write_text("13 50\n13 7 #fairseq:overwrite\n", encoding="utf-8")
  assert tl.read_fairseq_dict(path) == [*tl.SPECIAL_TOKENS, "13", "13", "<mask>"]
  path.write_text("13 50\n13 7\n", encoding="utf-8")
  with pytest.raises(ValueError, match="duplicate"):
    tl.read_fairseq_dict(path)
  path.write_text("13 fifty\n", encoding="utf-8")
  with pytest.raises(ValueError, match="<token> <count>"):
    tl.read_fairseq_dict(path)


def test_gpt2_vocab_without_dict_is_a_clear_error(tmp_path):
  _write_gpt2_files(tmp_path)
  with pytest.raises(ValueError, match="dict.txt"):
    tl.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError):
    tl.load_tokenizer(tmp_path / "missing")


# Training.

_TRAIN_TEXT = [
  "And it came to pass in those days, that there went out a decree from Caesar Augustus.",
  "The Lord is my shepherd; I shall not want.",
  "Ünïcödé and emoji 😀 lines are fine too.",
]


def test_train_writes_roberta_ids_deterministically(tmp_path):
  texts = _TRAIN_TEXT * 20
  first = tl.train_tokenizer(texts, 300, tmp_path / "a")
  second = tl.train_tokenizer(iter(texts), 300, tmp_path / "b")
  for name in ("vocab.json", "merges.txt"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
  assert list(vocab)[:4] == list(tl.SPECIAL_TOKENS) and list(vocab)[-1] == "<mask>"
  assert first.vocab_size == second.vocab_size == len(vocab) == 300 == first.mask_id + 1
  for text in [*_TRAIN_TEXT, "unseen ☃ text"]:
    assert first.decode(first.encode(text)) == text
  with pytest.raises(ValueError, match="at least"):
    tl.train_tokenizer(texts, 200, tmp_path / "c")
  with pytest.raises(ValueError, match="No text"):
    tl.train_tokenizer(["", " "], 300, tmp_path / "d")
  (tmp_path / "a" / "dict.txt").write_text("13 1\n")
  with pytest.raises(ValueError, match="dict.txt"):
    tl.train_tokenizer(texts, 300, tmp_path / "a")


def test_train_cli_on_a_folder(tmp_path):
  data = tmp_path / "data"
  (data / "sub").mkdir(parents=True)
  text_corpus.write_text_documents(data / "a.txt", [_TRAIN_TEXT * 10, _TRAIN_TEXT[:1]])
  text_corpus.write_text_documents(data / "sub" / "b.txt.gz", [["Zerubbabel Zerubbabel"] * 40])
  (data / "c.txt").write_bytes(b"bad \xff bytes are replaced\n" * 5)
  (data / ".hidden").write_text("qqqqqqqqqqqq\n" * 50)  # hidden files are not read
  out = tmp_path / "tok"
  result = subprocess.run(
    [sys.executable, "-m", "d2v_jax.data.tokenizer", "train", f"--input={data}",
     "--vocab_size=320", f"--out={out}"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert "vocab_size 320" in result.stdout
  assert "invalid UTF-8" in result.stderr  # the bad line was counted and logged
  tok = tl.load_tokenizer(out)
  assert tok.vocab_size == 320 and tok.mask_id == 319
  assert len(tok.encode("qqqqqqqqqqqq")) == 12  # no merges learned from the hidden file
  assert len(tok.encode(" shepherd")) < len(" shepherd")  # merges learned from a.txt
  assert len(tok.encode(" Zerubbabel")) == 1  # and from sub/b.txt.gz
  assert tok.decode(tok.encode(_TRAIN_TEXT[1])) == _TRAIN_TEXT[1]


def test_train_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tl.main(["train", f"--input={tmp_path / 'nope'}", "--vocab_size=300", f"--out={tmp_path}"])
  assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
  (tmp_path / "x.txt").write_text("some text\n")
  with pytest.raises(SystemExit) as exit_info:
    tl.main(["train", f"--input={tmp_path / 'x.txt'}", "--vocab_size=10", f"--out={tmp_path}"])
  assert exit_info.value.code == 2 and "at least 261" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit) as exit_info:
    tl.main(["train", f"--input={tmp_path / 'empty'}", "--vocab_size=300", f"--out={tmp_path}"])
  assert exit_info.value.code == 2 and "No files" in capsys.readouterr().err
