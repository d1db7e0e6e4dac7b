"""Word level without optimism: the open vocabulary pays for every byte; PTB's closed vocabulary scores as published."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lmlab.tokenizers import WordTokenizer, load_tokenizer
from lmlab.tokenizers.word import EOS, UNK, byte_symbols

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = (REPO / "data" / "tinyshakespeare.txt").read_text()
TRAIN = SHAKESPEARE[:100_000]

# rare and made-up words, accents, CJK, emoji, tabs, CRLF, runs of spaces, blank lines, no final newline
ODD = (
    "Zyzzyva's antidisestablishmentarianism, quixotically ΣΦΧ-naïveté!\r\n"
    "\t  thee  \u00a0 thou\u2003ART 42,000.5 日本語のテキスト 🙂🙂\n\n\n"
    "   <unk> <|endoftext|> ﬁ ẞ \x00\x7f end"
)


@pytest.fixture(scope="module", params=["words", "whitespace"])
def open_word(request) -> WordTokenizer:
    tokenizer = WordTokenizer(split=request.param)
    tokenizer.train(TRAIN)
    return tokenizer


def token_bytes(tokenizer: WordTokenizer, token_id: int) -> bytes:
    """The raw bytes one open-vocabulary token stands for."""
    to_byte = {symbol: b for b, symbol in enumerate(byte_symbols())}
    return bytes(to_byte[c] for c in tokenizer._hf.id_to_token(token_id))


def test_default_word_tokenizer_is_open_and_round_trips_anything_exactly(open_word):
    assert WordTokenizer().unk is False and not open_word.emits_unk and open_word.unk_id is None
    for text in (ODD, SHAKESPEARE[500_000:520_000], " ", "\n", "", "a  \n \n"):
        ids = open_word.encode(text)
        assert open_word.decode(ids) == text
        assert open_word.unknown_symbols(text) == [] and open_word.count_unknown(text) == 0
        # every byte of the text lies in exactly one token: all of it is predicted and paid for
        assert b"".join(token_bytes(open_word, i) for i in ids) == text.encode("utf-8")


def test_known_words_are_one_token_and_others_are_spelled_in_bytes(open_word):
    ids = open_word.encode("the people quixotically")
    tokens = [open_word._hf.id_to_token(i) for i in ids]
    assert tokens[:2] == ["the", "Ġpeople"]  # a leading space belongs to its word
    assert tokens[2:] == ["Ġ", *"quixotically"]  # unseen: one byte token each
    assert ids[2:].tolist() == list(b" quixotically")  # ids 0-255 are the byte values
    assert open_word.encode("é").tolist() == [0xC3, 0xA9]
    assert len(open_word.encode(" the")) == 1 < len(open_word.encode(" thé"))


def test_open_vocabulary_bits_per_byte_equal_a_hand_computation():
    """Under any model of the ids (here a random unigram model), the text costs what its pieces cost
    by hand: a known word its own probability, an unseen one the probabilities of each of its bytes."""
    tokenizer = WordTokenizer()  # split="words"
    tokenizer.train(TRAIN)
    text = "the people quixotically said: naïve!\n"
    pieces = ["the", " people", " quixotically", " said", ":", " naïve", "!", "\n"]
    log2_p = np.log2(np.random.default_rng(0).dirichlet(np.ones(tokenizer.vocab_size)))
    vocab, symbols = tokenizer._hf.get_vocab(), byte_symbols()
    bits_by_hand = 0.0
    for piece in pieces:
        utf8 = piece.encode("utf-8")
        as_symbols = "".join(symbols[b] for b in utf8)
        bits_by_hand -= log2_p[vocab[as_symbols]] if as_symbols in vocab else log2_p[list(utf8)].sum()
    ids = tokenizer.encode(text)
    assert tokenizer.count_unknown(text) == 0 and "Ġquixotically" not in vocab and "Ġsaid" in vocab
    bpb = -log2_p[ids].sum() / len(text.encode("utf-8"))
    assert bpb == pytest.approx(bits_by_hand / len(text.encode("utf-8")), rel=1e-12)


def test_open_vocabulary_counts_bytes_plus_frequent_pieces():
    tokenizer = WordTokenizer(min_frequency=2)
    tokenizer.train("b a b b a c\n")
    vocab = tokenizer._hf.get_vocab()
    assert tokenizer.vocab_size == 256 + 2  # " b" (3 times) and " a" (twice); "b", "a", "\n" are bytes already
    assert {"Ġb", "Ġa"} <= vocab.keys() and "Ġc" not in vocab
    assert tokenizer.decode(tokenizer.encode("c b a")) == "c b a"


def test_open_vocabulary_saves_and_loads_exactly(open_word, tmp_path):
    open_word.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.config() == open_word.config()
    assert np.array_equal(loaded.encode(ODD), open_word.encode(ODD))
    assert loaded.decode(loaded.encode(ODD)) == ODD


def write_ptb(folder: Path) -> dict[str, Path]:
    """Tiny files shaped like Mikolov's PTB: pre-tokenized, a space at both ends of each line, <unk>, N."""
    lines = {
        "train": [" the cat sat on the mat ", " a <unk> cat 's N dogs ", " the dogs sat "],
        "valid": [" the cat sat ", " a dog ran on the mat "],  # "dog" and "ran" were never seen
        "test": [" the <unk> sat on a mat "],
    }
    paths = {}
    for split, split_lines in lines.items():
        paths[split] = folder / f"ptb.{split}.txt"
        paths[split].write_text("".join(line + "\n" for line in split_lines))
    return paths


@pytest.fixture
def ptb(tmp_path) -> tuple[WordTokenizer, dict[str, str]]:
    """The recipe's own tokenizer config, trained on the tiny training file."""
    tokenizer = instantiate(OmegaConf.load(REPO / "conf" / "tokenizer" / "ptb_word.yaml"))
    texts = {split: path.read_text() for split, path in write_ptb(tmp_path).items()}
    tokenizer.train(texts["train"])
    return tokenizer, texts


def reference_tokens(text: str) -> list[str]:
    """The standard PTB readers (Zaremba's, PyTorch's word_language_model): words, then <eos> per line."""
    return [word for line in text.splitlines() for word in [*line.split(), EOS]]


def test_ptb_vocabulary_is_the_training_words_plus_eos(ptb):
    tokenizer, texts = ptb
    assert tokenizer.emits_unk
    assert set(tokenizer._hf.get_vocab()) == set(reference_tokens(texts["train"]))  # PTB's own <unk> included
    assert tokenizer.vocab_size == len(set(texts["train"].split())) + 1 == 11
    assert tokenizer.unk_id == tokenizer._hf.token_to_id(UNK)


def test_ptb_token_counts_and_eos_per_line(ptb):
    tokenizer, texts = ptb
    expected = {"train": 6 + 6 + 3 + 3, "valid": 3 + 6 + 2, "test": 6 + 1}  # words + one <eos> per line
    eos = tokenizer._hf.token_to_id(EOS)
    for split, text in texts.items():
        ids = tokenizer.encode(text)
        assert len(ids) == expected[split]
        assert np.count_nonzero(ids == eos) == text.count("\n")
        assert [tokenizer._hf.id_to_token(i) for i in ids] == [
            w if w in tokenizer._hf.get_vocab() else UNK for w in reference_tokens(text)
        ]
    assert tokenizer.decode(tokenizer.encode(texts["test"])) == "the <unk> sat on a mat\n"


def test_ptb_per_word_perplexity_follows_from_the_token_counts(ptb):
    """A unigram model of the training ids, scored on test: exp(nats / tokens incl. <eos>) as a PTB
    reader computes it by hand."""
    tokenizer, texts = ptb
    counts = np.bincount(tokenizer.encode(texts["train"]), minlength=tokenizer.vocab_size)
    test_ids = tokenizer.encode(texts["test"])
    ppl = math.exp(-np.log(counts[test_ids] / counts.sum()).sum() / len(test_ids))
    by_hand = Counter(reference_tokens(texts["train"]))
    words = reference_tokens(texts["test"])
    expected = math.exp(-sum(math.log(by_hand[w] / sum(by_hand.values())) for w in words) / len(words))
    assert ppl == pytest.approx(expected, rel=1e-12)


def test_closed_vocabulary_counts_the_unseen_words_of_each_split(ptb):
    tokenizer, texts = ptb
    unseen = {split: tokenizer.count_unknown(text) for split, text in texts.items()}
    assert unseen == {"train": 0, "valid": 2, "test": 0}  # "dog", "ran"; PTB's own <unk> is no surprise
    assert tokenizer.unknown_symbols(texts["valid"]) == ["dog", "ran"]
    ids = tokenizer.encode(texts["valid"])
    assert np.count_nonzero(ids == tokenizer.unk_id) == 2
