"""Tokenizers: a byte-level BPE trained on the training split, a pure byte tokenizer, or
an existing tokenizer loaded by path or hub id. All are ``PreTrainedTokenizerFast`` with
BOS/EOS/PAD tokens, and ``decode(encode(text)) == text`` exactly for any Unicode text.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import datasets
import tokenizers
from datasets import Dataset, IterableDataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from revformer.corpus import DataConfig, DataError, fingerprint, load_text_splits

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0..2 for trained BPE, 256..258 for bytes
_TRAIN_SEED = 0  # document order seen by the BPE trainer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte as one printable character.

    Printable Latin-1 bytes stand for themselves; the others are moved to code points
    from 256 up, so no byte maps to whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Cleanup would rewrite " ." as "." and break exact round trips.
        clean_up_tokenization_spaces=False,
    )


def _byte_level(tok: Tokenizer, use_regex: bool) -> Tokenizer:
    # No normalizer and no prefix space: the pre-tokenizer only maps bytes to characters,
    # so decoding restores the exact input.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes as tokens (id == byte value) plus PAD/BOS/EOS at 256..258; no training."""
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def _capped(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Texts until ``max_bytes`` UTF-8 bytes have been yielded (the last one cut to fit)."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for text in texts:
        if budget <= 0:
            return
        data = text.encode()
        if len(data) > budget:
            text = data[: int(budget)].decode(errors="ignore")  # don't split a character
        budget -= len(data)
        yield text


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, max_bytes: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (specials included in ``vocab_size``) on streamed ``texts``."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise DataError(f"vocab_size={vocab_size} is below the {minimum} bytes+specials; raise vocab_size")
    tok = _byte_level(Tokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, max_bytes), trainer=trainer)
    return _wrap(tok)


def _iter_texts(ds: Dataset | IterableDataset) -> Iterator[str]:
    # Shuffled so a byte cap samples the whole split rather than its first files.
    shuffled = ds.shuffle(seed=_TRAIN_SEED)
    for batch in shuffled.iter(batch_size=256):
        yield from batch["text"]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """An existing fast tokenizer by local path or hub id; PAD defaults to EOS."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise DataError(
            f"could not load tokenizer {name_or_path!r}: {err}; use 'bpe', 'byte', a "
            "tokenizer folder or a hub id"
        ) from err
    if not hasattr(tok, "backend_tokenizer"):
        raise DataError(f"tokenizer {name_or_path!r} is not a fast tokenizer; use one with a tokenizer.json")
    if tok.eos_token is None:
        raise DataError(f"tokenizer {name_or_path!r} has no EOS token, needed between documents; pick another")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # blocks are never padded; this only satisfies collators
    return tok


def get_tokenizer(
    cfg: DataConfig, train_texts: Dataset | IterableDataset | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer ``cfg.tokenizer`` names: "bpe" (trained, cached), "byte", or a path/id.

    A trained BPE is saved under the cache keyed by its training data and settings, so
    reruns and other ranks load the same files instead of training again.
    """
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    if train_texts is None:
        train_texts = load_text_splits(cfg)[0]
    # Map-style data has a content fingerprint; a stream is identified by its config.
    source = getattr(train_texts, "_fingerprint", None) if isinstance(train_texts, Dataset) else None
    if source is None:
        source = [cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.validation_split,
                  cfg.validation_fraction, cfg.text_column, cfg.max_train_documents]
    key = fingerprint("bpe", source, cfg.vocab_size, cfg.tokenizer_train_max_bytes, tokenizers.__version__)
    cache_root = Path(cfg.cache_dir or datasets.config.HF_DATASETS_CACHE) / "revformer_tokenizers"
    target = cache_root / key
    if not (target / "tokenizer.json").exists():
        tok = train_bpe_tokenizer(_iter_texts(train_texts), cfg.vocab_size, cfg.tokenizer_train_max_bytes)
        tmp = cache_root / f"{key}.tmp-{os.getpid()}"
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent rank sees all files or none
        except OSError:  # another process saved it first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    # Always load from disk so the first run and every later one return the same object.
    return load_tokenizer(str(target))


__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "byte_tokenizer",
    "bytes_to_unicode",
    "get_tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
]
