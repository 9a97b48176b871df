"""Text tokenizer: lossless round trips, specials typed by users stay text, training errors."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_TEXT_VOCAB, run_cli

TRICKY = [
    "",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "digits 1234567890 and 3.14159",
    "a typed ▁ SentencePiece space ▁▁ and ▁",
    "<boi> <eoi> <bos> <eos> <pad> <det> <gen> <reserved_0>",
    "漢字 かな 한글 عربى עברית",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧",
    "nul \x00 and controls \x07\x1b",
    "combining e\u0301 vs \u00e9 (no normalization)",
]


def test_round_trip_of_tricky_strings(text_tokenizer):
    for s in TRICKY:
        assert text_tokenizer.decode(text_tokenizer.encode(s)) == s, repr(s)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_any_unicode(text_tokenizer, s):
    ids = text_tokenizer.encode(s)
    assert all(0 <= i < TINY_TEXT_VOCAB for i in ids)
    assert text_tokenizer.decode(ids) == s


def test_digits_split_and_pieces_learned(text_tokenizer):
    ids = text_tokenizer.encode("2024")
    assert [text_tokenizer.id_to_piece(i) for i in ids] == ["2", "0", "2", "4"]
    # BPE learned real merges from the corpus: common words are one or two pieces, not bytes.
    assert len(text_tokenizer.encode("the")) == 1
    assert len(text_tokenizer.encode("function")) <= 3


def test_typed_specials_stay_text(tokenizer):
    ids = tokenizer.encode("<boi><eoi><eos>", bos=False)
    assert (tokenizer.modality(ids) == 0).all()  # every id is TEXT
    assert tokenizer.decode(ids).text == "<boi><eoi><eos>"


def test_training_is_deterministic(corpus_file, text_tokenizer):
    from omni.config import TextTokenizerConfig
    from omni.tokenizers.text import train_text_tokenizer

    again = train_text_tokenizer([str(corpus_file)], TextTokenizerConfig(vocab_size=TINY_TEXT_VOCAB), progress=False)
    assert again.fingerprint() == text_tokenizer.fingerprint()


def test_cli_trains_a_bundle_that_loads(tmp_path, corpus_file):
    import omni

    out = tmp_path / "tok"
    rc, stdout, _ = run_cli("tokenizer", "train", "text", "--input", corpus_file, "vocab_size=600",
                            "--out", out, "--quiet", "max_piece_length=8", "n_reserved_specials=2")
    assert rc == 0, stdout
    tok = omni.UnifiedTokenizer.load(out)
    assert tok.vocab.text_size == 600 and tok.vocab.size % 128 == 0
    assert tok.vocab.n_specials == 9 + 2  # the bundle's key, next to the text tokenizer's own
    assert tok.text.config.max_piece_length == 8  # the resolved config was saved and reloaded
    assert (out / "text" / "config.yaml").is_file()
    assert tok.decode(tok.encode("round trip")).text == "round trip"


def test_cli_accepts_globs_and_folders(tmp_path, corpus_file):
    import shutil

    d = tmp_path / "corpus" / "sub"
    d.mkdir(parents=True)
    shutil.copy(corpus_file, d / "a.txt")
    for inp in (str(tmp_path / "corpus" / "**" / "*.txt"), str(tmp_path / "corpus")):
        rc, _, err = run_cli("tokenizer", "train", "text", "--input", inp, "vocab_size=400",
                             "--out", tmp_path / "t", "--quiet")
        assert rc == 0, err


def test_cli_takes_full_dotted_keys_as_well_as_relative_ones(tmp_path, corpus_file):
    """Every command takes both key forms (full ones used to fail: 'tokenizer.text.tokenizer.text...')."""
    import omni

    rc, _, err = run_cli("tokenizer", "train", "text", "--input", corpus_file, "--out", tmp_path / "t", "--quiet",
                         "tokenizer.text.vocab_size=400", "tokenizer.text.split_digits=false",
                         "tokenizer.n_reserved_specials=4")
    assert rc == 0, err
    tok = omni.UnifiedTokenizer.load(tmp_path / "t")
    assert tok.text.config.vocab_size == 400 and tok.text.config.split_digits is False
    from omni.vocab import NAMED_SPECIALS

    assert tok.vocab.n_specials == len(NAMED_SPECIALS) + 4


def test_cli_bad_corpus_and_vocab_size(tmp_path, corpus_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (["--input", tmp_path / "missing.txt"], "no file matches input"),
        (["--input", empty], "the corpus is empty"),
        (["--input", corpus_file, "vocab_size=200000"], "Vocabulary size too high (200000)"),
        (["--input", corpus_file, "vocab_size=10"], "vocab_size=10 is invalid"),
        (["--input", corpus_file, "model_type=wordpiece"], "one of 'bpe', 'unigram'"),
        (["--input", corpus_file, "vocab_sise=300"], "Did you mean 'tokenizer.text.vocab_size'"),
        (["--input", corpus_file, "vocab_size=lots"], "config key 'tokenizer.text.vocab_size': Value 'lots'"),
        (["--input", corpus_file, "--config", tmp_path / "none.yaml"], "config file not found"),
    ]
    for extra, needle in cases:
        rc, out, err = run_cli("tokenizer", "train", "text", *extra, "--out", tmp_path / "o", "--quiet")
        assert rc == 2, (extra, out, err)
        assert needle in err, (needle, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written on failure
