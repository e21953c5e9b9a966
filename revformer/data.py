"""Tokenizing, packing and loading: text datasets -> ``block_size`` token blocks -> batches.

Pipeline: ``revformer.corpus`` gives (train, validation) datasets with a single ``text`` column;
``prepare_datasets`` tokenizes them (EOS after every document), concatenates the token stream and cuts it into
``block_size`` blocks; ``build_dataloader`` batches blocks in an order that is a pure function of
``(seed, epoch)`` so a resumed run sees exactly the batches an uninterrupted run would.

This module is also the data API: the corpus names (``DataConfig``, ``load_text_splits``, ...) are re-exported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Sampler

from .corpus import (
    DataConfig,
    DataError,
    DataPathError,
    Texts,
    check_block_size,
    data_errors,
    fingerprint,
    is_held_out,
    load_test_texts,
    load_text_splits,
    stdlib_files,
)

_DOC_BATCH = 256  # documents per tokenization/packing batch


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Bits per UTF-8 byte from the summed token cross-entropy (nats) over predicted tokens."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes={total_bytes} must be positive")
    return total_nats / (math.log(2) * total_bytes)



# ----------------------------------------------------------------------------- packing


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Digest of the tokenizer's definition, ignoring call-time padding/truncation state."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return fingerprint(spec, tokenizer.eos_token_id)


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """Per-id UTF-8 byte length for byte-level BPE tokenizers (specials: 0), else ``None``.

    In a byte-level vocabulary every character of a token stands for exactly one byte.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        return None
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(vocab.values()) + 1, dtype=np.int32)
    added = tokenizer.added_tokens_decoder
    for token, idx in vocab.items():
        if idx in added:
            table[idx] = 0 if added[idx].special else len(added[idx].content.encode())
        else:
            table[idx] = len(token)
    return table


def _bytes_from_offsets(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes per token from character offsets.

    Each token is charged the text between the previous token's end and its own end, so
    skipped whitespace counts with the next token and per-document sums are exact.
    """
    if not offsets:
        return np.zeros(0, dtype=np.int32)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    prefix = np.concatenate([[0], np.cumsum(char_bytes)])
    ends = np.maximum.accumulate(np.asarray([end for _, end in offsets], dtype=np.int64))
    return np.diff(prefix[ends], prepend=0).astype(np.int32)


def _tokenize_batch(
    batch: dict[str, list[str]],
    backend: Tokenizer,
    eos_id: int,
    byte_table: np.ndarray | None,
    with_bytes: bool,
) -> dict[str, list[np.ndarray]]:
    texts = batch["text"]
    use_offsets = with_bytes and byte_table is None
    # encode_batch_fast skips offset tracking, which costs more than the BPE itself.
    encode = backend.encode_batch if use_offsets else backend.encode_batch_fast
    encodings = encode(texts, add_special_tokens=False)
    eos = np.array([eos_id], dtype=np.int32)
    out = {"input_ids": [np.concatenate([np.asarray(e.ids, dtype=np.int32), eos]) for e in encodings]}
    if with_bytes:
        if use_offsets:
            counts = [_bytes_from_offsets(t, e.offsets) for t, e in zip(texts, encodings)]
        else:
            counts = [byte_table[ids[:-1]] for ids in out["input_ids"]]
        out["token_bytes"] = [np.append(c, 0).astype(np.int32) for c in counts]  # EOS: 0 bytes
    return out


def _flat(column: Any) -> np.ndarray:
    return pc.list_flatten(column).to_numpy()


def _pack_blocks(docs: Texts, block_size: int, with_bytes: bool) -> Iterator[dict[str, Any]]:
    """Concatenate tokenized documents and cut ``block_size`` blocks; only the final
    remainder (< block_size tokens) is dropped. Shared by map-style and streaming paths."""
    ids_tail = np.zeros(0, dtype=np.int32)
    bytes_tail = np.zeros(0, dtype=np.int32)
    produced = False
    for table in docs.with_format("arrow").iter(batch_size=_DOC_BATCH):
        ids = np.concatenate([ids_tail, _flat(table["input_ids"])])
        nbytes = np.concatenate([bytes_tail, _flat(table["token_bytes"])]) if with_bytes else None
        n = len(ids) // block_size
        for k in range(n):
            lo, hi = k * block_size, (k + 1) * block_size
            row: dict[str, Any] = {"input_ids": ids[lo:hi]}
            if with_bytes:
                # Token lo is only context: the model predicts tokens lo+1 .. hi-1.
                row["num_bytes"] = int(nbytes[lo + 1 : hi].sum())
            produced = True
            yield row
        ids_tail = ids[n * block_size :]
        if with_bytes:
            bytes_tail = nbytes[n * block_size :]
    if not produced:  # reached only when streaming; map-style data is checked up front
        raise DataError(_too_small_message(len(ids_tail), block_size))


def _too_small_message(num_tokens: int, block_size: int) -> str:
    return (
        f"the data has {num_tokens} tokens, fewer than one block of block_size={block_size}; "
        "lower block_size, add documents or raise validation_fraction"
    )


def pack_texts(
    texts: Texts,
    tokenizer: Any,
    block_size: int,
    *,
    with_bytes: bool = False,
    num_proc: int = 1,
    cache_dir: str | None = None,
) -> Texts:
    """Tokenize ``texts`` (EOS after each document) and pack into ``block_size`` blocks.

    Columns: ``input_ids`` (int32), plus ``num_bytes`` when ``with_bytes``: the UTF-8 bytes
    of the block's predicted tokens 1..T-1. Streaming input gives an ``IterableDataset``
    with exactly the same blocks in the same order.
    """
    check_block_size(block_size, None)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; use one that defines eos_token")
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError("packing needs a fast (tokenizers-backed) tokenizer; load one with use_fast=True")
    doc_columns = {"input_ids": List(Value("int32"))}
    block_columns: dict[str, Any] = {"input_ids": List(Value("int32"))}
    if with_bytes:
        doc_columns["token_bytes"] = List(Value("int32"))
        block_columns["num_bytes"] = Value("int64")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # private copy to configure
    backend.encode_special_tokens = True  # "<|eos|>" written in a document is text, not a boundary
    backend.no_truncation()
    backend.no_padding()
    fn_kwargs = {
        "backend": backend,
        "eos_id": eos_id,
        "byte_table": token_byte_lengths(tokenizer) if with_bytes else None,
        "with_bytes": with_bytes,
    }
    map_kwargs = dict(
        batched=True,
        batch_size=_DOC_BATCH,
        remove_columns=["text"],
        fn_kwargs=fn_kwargs,
        features=Features(doc_columns),
    )
    gen_kwargs = {"block_size": block_size, "with_bytes": with_bytes}
    if isinstance(texts, IterableDataset):
        docs = texts.map(_tokenize_batch, **map_kwargs)
        return IterableDataset.from_generator(
            _pack_blocks, features=Features(block_columns), gen_kwargs={"docs": docs, **gen_kwargs}
        )
    docs = texts.map(
        _tokenize_batch,
        num_proc=min(num_proc, len(texts)) if num_proc > 1 else None,
        new_fingerprint=fingerprint("tokenize", texts._fingerprint, _tokenizer_fingerprint(tokenizer), with_bytes),
        desc="Tokenizing",
        **map_kwargs,
    )
    num_tokens = pc.sum(pc.list_value_length(docs.data.column("input_ids"))).as_py() or 0
    if num_tokens < block_size:
        raise DataError(_too_small_message(num_tokens, block_size))
    with data_errors("tokenized documents"):
        return Dataset.from_generator(
            _pack_blocks,
            features=Features(block_columns),
            gen_kwargs={"docs": docs, **gen_kwargs},
            cache_dir=cache_dir,
            fingerprint=fingerprint("pack", docs._fingerprint, gen_kwargs),
            writer_batch_size=max(1, 2**22 // block_size),  # bound memory for very long blocks
        )


def prepare_datasets(
    cfg: DataConfig, tokenizer: Any, splits: tuple[Texts, Texts] | None = None
) -> tuple[Texts, Texts]:
    """Packed (train, validation) blocks; validation blocks carry ``num_bytes``."""
    train_texts, val_texts = splits if splits is not None else load_text_splits(cfg)
    common = dict(num_proc=cfg.num_proc, cache_dir=cfg.cache_dir)
    train = pack_texts(train_texts, tokenizer, cfg.block_size, with_bytes=False, **common)
    val = pack_texts(val_texts, tokenizer, cfg.block_size, with_bytes=True, **common)
    return train, val


# ----------------------------------------------------------------------------- loading


def num_batches(num_blocks: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches in one epoch over ``num_blocks`` blocks."""
    return num_blocks // batch_size if drop_last else -(-num_blocks // batch_size)


class EpochBatchSampler(Sampler[list[int]]):
    """Index batches of one epoch, ordered as a pure function of ``(seed, epoch)``.

    Deliberately has no ``set_epoch``: accelerate would call it with its own counter and
    change the order behind the caller's back. Batches before ``skip_batches`` are skipped.
    """

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        skip_batches: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.num_blocks, self.batch_size, self.seed, self.epoch = num_blocks, batch_size, seed, epoch
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch_batches = num_batches(num_blocks, batch_size, drop_last)
        if not 0 <= skip_batches <= self.epoch_batches:
            raise ValueError(f"skip_batches={skip_batches} not in [0, {self.epoch_batches}] (batches per epoch)")
        self.skip_batches = skip_batches

    def __len__(self) -> int:
        return self.epoch_batches - self.skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_blocks)
        else:
            order = np.arange(self.num_blocks)
        for b in range(self.skip_batches, self.epoch_batches):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class _FixedOrderStream(torch.utils.data.IterableDataset):
    """Hides the streaming dataset's ``set_epoch`` from accelerate (see EpochBatchSampler)."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataset)


def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack blocks; ``labels`` equal ``input_ids`` (the model shifts internally).

    Blocks are always full, so no ``attention_mask`` is needed.
    """
    input_ids = torch.from_numpy(np.stack([np.asarray(ex["input_ids"], dtype=np.int64) for ex in examples]))
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}
    if "num_bytes" in examples[0]:
        batch["num_bytes"] = torch.tensor([int(ex["num_bytes"]) for ex in examples], dtype=torch.long)
    return batch


def document_position_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Positions (B, T) that restart after every EOS: each document of a packed block counts from 0.

    Passed as ``position_ids``, they tell the model where documents begin, so attention stays inside each one
    (transformers' padding-free convention). A block that starts inside a document counts from its first token.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    after_eos = torch.nn.functional.pad(input_ids[:, :-1] == eos_token_id, (1, 0), value=False)
    starts = torch.where(after_eos, positions, 0).cummax(dim=-1).values  # start of each token's document
    return positions - starts


def build_dataloader(
    dataset: Any,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    skip_batches: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 10_000,
) -> DataLoader:
    """A DataLoader over packed blocks whose batch order is a pure function of (seed, epoch).

    ``skip_batches`` resumes mid-epoch with the next batch. ``batch_size`` is the global
    batch (accelerate ``split_batches=True`` splits it across ranks). For map-style data
    ``len(loader)`` is the number of remaining batches and
    ``loader.batch_sampler.epoch_batches`` the epoch length; streaming data has no length
    and shuffles through a buffer of ``shuffle_buffer`` blocks.
    """
    if isinstance(dataset, IterableDataset):
        if shuffle:
            mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
            dataset = dataset.shuffle(seed=mixed, buffer_size=shuffle_buffer)
        stream = _FixedOrderStream(dataset.skip(skip_batches * batch_size))
        return DataLoader(stream, batch_size=batch_size, drop_last=drop_last, collate_fn=collate_blocks,
                          generator=torch.Generator().manual_seed(seed))
    sampler = EpochBatchSampler(
        len(dataset),
        batch_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        drop_last=drop_last,
        skip_batches=skip_batches,
    )
    if isinstance(dataset, Dataset):
        dataset = dataset.with_format("numpy")
    # Its own generator: creating an iterator otherwise draws a worker seed from the global RNG, so building a
    # loader (an evaluation, a resume) would shift the dropout stream of the training that follows.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_blocks, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


__all__ = [
    "DataConfig",
    "DataError",
    "DataPathError",
    "EpochBatchSampler",
    "bits_per_byte",
    "build_dataloader",
    "check_block_size",
    "collate_blocks",
    "document_position_ids",
    "is_held_out",
    "load_test_texts",
    "load_text_splits",
    "num_batches",
    "pack_texts",
    "prepare_datasets",
    "stdlib_files",
    "token_byte_lengths",
]
