"""Tokenizer tests: exact round trips, save/load, caching, bad input."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from revformer import tokenizer as tk
from revformer.data import DataConfig, DataError

TRICKY = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines\n",
    "unicode: é ü ß 你好 𝄞 🙂 \u200b zero-width",
    "def f(x):\n    return x  # comment\n",
    "literal specials <|eos|> <|bos|> <|pad|> stay text",
]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
] * 20


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_bytes_to_unicode_is_printable_bijection():
    mapping = tk.bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(len(c) == 1 and not c.isspace() and c.isprintable() for c in mapping.values())
    assert all(mapping[b] == chr(b) for b in b"azAZ09!~")


def test_byte_tokenizer_ids_are_bytes_and_round_trip(tmp_path):
    tok = tk.byte_tokenizer()
    assert len(tok) == 259
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [256, 257, 258]
    for text in TRICKY:
        ids = _encode(tok, text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tk.BOS, tk.EOS, tk.PAD)
    assert _encode(loaded, TRICKY[4]) == list(TRICKY[4].encode())


def test_trained_bpe_round_trip_and_save_load(tmp_path):
    tok = tk.train_bpe_tokenizer(CORPUS, vocab_size=300)
    assert len(tok) == 300
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    for text in TRICKY:  # includes characters never seen in training
        assert tok.decode(_encode(tok, text)) == text
    assert len(_encode(tok, CORPUS[0])) < len(CORPUS[0].encode())  # merges were learned
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tk.BOS, tk.EOS, tk.PAD)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert len(loaded) == 300
    for text in TRICKY:
        assert _encode(loaded, text) == _encode(tok, text)
        assert loaded.decode(_encode(loaded, text)) == text


def test_bpe_training_is_deterministic():
    a = tk.train_bpe_tokenizer(CORPUS, vocab_size=320)
    b = tk.train_bpe_tokenizer(CORPUS, vocab_size=320)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_byte_cap_matches_naive_prefix():
    texts = ["ab", "cdé", "fgh", "ij"]  # "é" is 2 bytes
    assert list(tk._capped(texts, None)) == texts
    assert list(tk._capped(texts, 5)) == ["ab", "cd"]  # would split é: dropped
    assert list(tk._capped(texts, 6)) == ["ab", "cdé"]
    assert list(tk._capped(texts, 8)) == ["ab", "cdé", "fg"]
    assert list(tk._capped(texts, 0)) == []


def test_vocab_too_small_is_rejected():
    with pytest.raises(DataError, match="vocab_size=100"):
        tk.train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_get_tokenizer_trains_once_then_reuses_cache(tmp_path, monkeypatch):
    cfg = DataConfig(cache_dir=str(tmp_path), vocab_size=300, tokenizer_train_max_bytes=10_000)
    texts = Dataset.from_dict({"text": CORPUS})
    first = tk.get_tokenizer(cfg, texts)

    def fail(*args, **kwargs):
        raise AssertionError("retrained although the cache should be used")

    monkeypatch.setattr(tk, "train_bpe_tokenizer", fail)
    second = tk.get_tokenizer(cfg, texts)
    assert second.get_vocab() == first.get_vocab()
    assert second.eos_token == tk.EOS
    with pytest.raises(AssertionError, match="retrained"):  # other settings: new key
        tk.get_tokenizer(DataConfig(cache_dir=str(tmp_path), vocab_size=301), texts)


def test_get_tokenizer_byte_and_existing_path(tmp_path):
    assert len(tk.get_tokenizer(DataConfig(tokenizer="byte"))) == 259
    saved = tk.train_bpe_tokenizer(CORPUS, vocab_size=300)
    saved.save_pretrained(tmp_path / "tok")
    loaded = tk.get_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok")))
    assert loaded.get_vocab() == saved.get_vocab()
    assert loaded.pad_token == tk.PAD


def test_existing_tokenizer_without_pad_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "[EOS]": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[EOS]").save_pretrained(tmp_path)
    tok = tk.load_tokenizer(str(tmp_path))
    assert tok.pad_token == "[EOS]"


def test_missing_tokenizer_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="could not load tokenizer"):
        tk.load_tokenizer(str(tmp_path / "nope"))
