"""Data pipeline tests: sources, splits, packing against naive references, loaders, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from revformer import corpus
from revformer import data as rd
from revformer.data import DataConfig, DataError
from revformer.tokenizer import byte_tokenizer, bytes_to_unicode, train_bpe_tokenizer

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "unicode é 你好 🙂\n\ttabbed\r\n",
    "x",
    "",
    "  spaces  around  ",
    "class Point:\n    x: int = 0\n    y: int = 0\n" * 3,
    "literal <|eos|> inside a document",
] * 3


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(DOCS, vocab_size=300)


def _naive_tokens(tok, docs):
    """Reference token stream: each document's ids, then EOS."""
    out = []
    for doc in docs:
        out += tok(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return out


def _token_bytes(tok, ids):
    """Reference bytes per token for byte-level vocabularies (specials: none)."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    return [b"" if i in special else bytes(inverse[c] for c in tok.convert_ids_to_tokens(i)) for i in ids]


def _rows(ds):
    return [{k: (np.asarray(v).tolist() if k == "input_ids" else v) for k, v in row.items()} for row in ds]


# ----------------------------------------------------------------------------- basics


def test_bits_per_byte_hand_computed():
    # 4 predicted tokens each at probability 1/2 covering 2 bytes: 4 bits / 2 bytes.
    assert rd.bits_per_byte(4 * math.log(2), 2) == pytest.approx(2.0)
    # A uniform guess over 256 byte values costs exactly 8 bits per byte.
    assert rd.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        rd.bits_per_byte(1.0, 0)


def test_check_block_size():
    rd.check_block_size(1024, 1024)
    rd.check_block_size(1 << 20, None)
    with pytest.raises(DataError, match="max_position_embeddings=512"):
        rd.check_block_size(1024, 512)
    for bad in (1, 0, -5, 2.0, True):
        with pytest.raises(DataError, match="block_size"):
            rd.check_block_size(bad, None)


@pytest.mark.parametrize("kwargs", [{"validation_fraction": 0.0}, {"validation_fraction": 1.5}, {"block_size": 1}])
def test_bad_config_values(kwargs):
    with pytest.raises(DataError):
        DataConfig(**kwargs)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("block_size", [2, 7, 64])
@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_packing_matches_naive_reference(tmp_path, monkeypatch, bpe, block_size, which):
    monkeypatch.setattr(rd, "_DOC_BATCH", 4)  # blocks straddle packing batches
    tok = byte_tokenizer() if which == "byte" else bpe
    blocks = rd.pack_texts(Dataset.from_dict({"text": DOCS}), tok, block_size, with_bytes=True, cache_dir=str(tmp_path))
    stream = _naive_tokens(tok, DOCS)
    n = len(stream) // block_size
    expected = [stream[k * block_size : (k + 1) * block_size] for k in range(n)]
    rows = _rows(blocks)
    assert [r["input_ids"] for r in rows] == expected  # every token kept, in order
    per_token = _token_bytes(tok, stream)
    assert b"".join(per_token) == "".join(DOCS).encode()  # the reference itself is exact
    for k, row in enumerate(rows):
        assert row["num_bytes"] == sum(len(b) for b in per_token[k * block_size + 1 : (k + 1) * block_size])
    # Corpus bytes minus those of the dropped remainder and of each block's first token.
    dropped = sum(len(b) for b in per_token[n * block_size :])
    firsts = sum(len(per_token[k * block_size]) for k in range(n))
    assert sum(r["num_bytes"] for r in rows) == len("".join(DOCS).encode()) - dropped - firsts
    # The loader's labels are the inputs (the model shifts internally).
    batch = next(iter(rd.build_dataloader(blocks, 2, seed=0, shuffle=False)))
    assert batch["input_ids"].tolist() == expected[:2]
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].dtype == torch.long
    assert batch["num_bytes"].tolist() == [rows[0]["num_bytes"], rows[1]["num_bytes"]]


def test_streaming_packing_equals_in_memory(tmp_path, bpe):
    texts = Dataset.from_dict({"text": DOCS * 40})  # several packing batches
    mem = rd.pack_texts(texts, bpe, 16, with_bytes=True, cache_dir=str(tmp_path))
    streamed = rd.pack_texts(texts.to_iterable_dataset(num_shards=3), bpe, 16, with_bytes=True)
    assert isinstance(streamed, IterableDataset)
    assert _rows(streamed) == _rows(mem)


def test_offsets_byte_counts_for_non_byte_level_tokenizer(tmp_path):
    words = sorted({w for d in DOCS for w in d.split()})
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[EOS]", *words])}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[EOS]")
    assert rd.token_byte_lengths(tok) is None  # not byte level: offsets are used
    docs = [d.rstrip() for d in DOCS]  # trailing whitespace is covered by no token
    blocks = _rows(rd.pack_texts(Dataset.from_dict({"text": docs}), tok, 3, with_bytes=True, cache_dir=str(tmp_path)))
    per_token = []  # naive: each token pays for the text since the previous token's end
    for doc in docs:
        end = 0
        for _, stop in tok(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
            per_token.append(len(doc[end:max(end, stop)].encode()))
            end = max(end, stop)
        per_token.append(0)  # EOS
    assert sum(per_token) == sum(len(d.encode()) for d in docs)
    assert [b["num_bytes"] for b in blocks] == [sum(per_token[3 * k + 1 : 3 * k + 3]) for k in range(len(blocks))]


def test_prepare_datasets_reuses_cache(tmp_path, bpe):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS * 3):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    cfg = DataConfig(dataset=str(folder), block_size=8, validation_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    train, val = rd.prepare_datasets(cfg, bpe)
    again_train, again_val = rd.prepare_datasets(cfg, bpe)
    assert [f["filename"] for f in again_train.cache_files] == [f["filename"] for f in train.cache_files]
    assert again_val._fingerprint == val._fingerprint and len(again_val) == len(val)
    assert set(val.column_names) == {"input_ids", "num_bytes"} and train.column_names == ["input_ids"]


# ----------------------------------------------------------------------------- sources and splits


def _write_txt_corpus(folder, n=30):
    folder.mkdir(parents=True)
    texts = {}
    for i in range(n):
        rel = f"sub{i % 3}/file{i:02d}.txt"
        (folder / rel).parent.mkdir(exist_ok=True)
        texts[rel] = f"document {i}\n  ünïcode ✓ line\n" * (i + 1)
        (folder / rel).write_bytes(texts[rel].encode())
    return texts


def test_text_folder_split_holds_out_whole_files_by_folder(tmp_path):
    texts = _write_txt_corpus(tmp_path / "c")
    cfg = DataConfig(dataset=str(tmp_path / "c"), validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    train, val = rd.load_text_splits(cfg)
    rels = sorted(texts)
    # Reference: per top-level folder, files by size; a counter advancing 0.3 per file (from a hashed start)
    # holds out the file at which it passes a whole number.
    held = set()
    for folder in ("sub0", "sub1", "sub2"):
        members = sorted((r for r in rels if r.startswith(folder)), key=lambda r: len(texts[r].encode()))
        counter = corpus._unit_hash(f"stratum:{folder}")
        for rel in members:
            if int(counter + 0.3) > int(counter):
                held.add(rel)
            counter += 0.3
        assert 2 <= len(held & set(members)) <= 4  # each folder gives its share: 3 of 10 files, give or take one
    want_val = [texts[r] for r in rels if r in held]
    want_train = [texts[r] for r in rels if r not in held]
    assert want_val and want_train
    assert list(val["text"]) == want_val and list(train["text"]) == want_train
    streamed, _ = rd.load_text_splits(DataConfig(dataset=str(tmp_path / "c"), validation_fraction=0.3, streaming=True))
    assert [r["text"] for r in streamed] == want_train
    capped = DataConfig(dataset=str(tmp_path / "c"), validation_fraction=0.3, max_train_documents=4,
                        cache_dir=str(tmp_path / "cache"))
    assert list(rd.load_text_splits(capped)[0]["text"]) == want_train[:4]


@pytest.mark.parametrize("streaming", [False, True])
def test_single_text_file_is_split_inside_and_says_so(tmp_path, caplog, streaming):
    lines = [f"line {i}: {'é' * (i % 7)} text\n" for i in range(500)]
    (tmp_path / "one.txt").write_text("".join(lines))
    cfg = DataConfig(dataset=str(tmp_path / "one.txt"), validation_fraction=0.1, streaming=streaming,
                     cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        train, val = rd.load_text_splits(cfg)
    assert "too few to hold out whole ones" in caplog.text
    train_docs, val_docs = [r["text"] for r in train], [r["text"] for r in val]
    val_lines = [line for doc in val_docs for line in doc.splitlines(keepends=True)]
    train_lines = [line for doc in train_docs for line in doc.splitlines(keepends=True)]
    assert sorted(val_lines + train_lines) == sorted(lines)  # every line once, on one side
    assert 0.07 < len(val_lines) / len(lines) < 0.13
    positions = sorted(lines.index(line) for line in val_lines)
    assert positions[0] < 100 and positions[-1] > 400  # spread through the file, not one end of it
    assert len(val_docs) >= 5  # each held-out run is its own document (no artificial joins)


def test_readme_finetune_example_small_folder_has_validation(tmp_path):
    texts = _write_txt_corpus(tmp_path / "c", n=6)
    cfg = DataConfig(dataset=str(tmp_path / "c"), validation_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    train, val = rd.load_text_splits(cfg)
    assert len(val) > 0 and len(train) > 0
    assert sum(map(len, val["text"])) + sum(map(len, train["text"])) == sum(map(len, texts.values()))


@pytest.mark.parametrize("content", [b"", b"\0\0\0\0", b"\n \0\n"])
def test_empty_or_nul_only_file_is_named(tmp_path, content):
    (tmp_path / "blank.txt").write_bytes(content)
    with pytest.raises(DataError, match=r"file .*blank\.txt is empty"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "blank.txt"), cache_dir=str(tmp_path / "cache")))


def test_jsonl_named_splits_and_text_column(tmp_path):
    for split, n in (("train", 12), ("validation", 3)):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"id": i, "content": f"{split} row {i} é"}) + "\n")
    cfg = DataConfig(dataset=str(tmp_path), text_column="content", cache_dir=str(tmp_path / "cache"))
    train, val = rd.load_text_splits(cfg)
    assert train.column_names == ["text"]
    assert list(train["text"]) == [f"train row {i} é" for i in range(12)]
    assert list(val["text"]) == [f"validation row {i} é" for i in range(3)]
    cfg_stream = DataConfig(dataset=str(tmp_path), text_column="content", streaming=True)
    assert [r["text"] for r in rd.load_text_splits(cfg_stream)[1]] == list(val["text"])


def test_parquet_holdout_by_row_hash_same_when_streaming(tmp_path):
    rows = [f"row {i}" for i in range(200)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "data.parquet")
    cfg = DataConfig(dataset=str(tmp_path / "data.parquet"), validation_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    train, val = rd.load_text_splits(cfg)
    assert list(val["text"]) == [r for i, r in enumerate(rows) if rd.is_held_out(f"row:{i}", 0.1)]
    assert sorted(list(train["text"]) + list(val["text"])) == sorted(rows)
    streaming = DataConfig(dataset=str(tmp_path / "data.parquet"), validation_fraction=0.1, streaming=True)
    s_train, s_val = rd.load_text_splits(streaming)
    assert [r["text"] for r in s_val] == list(val["text"])
    assert [r["text"] for r in s_train] == list(train["text"])


def test_hub_source_split_selection(monkeypatch):
    """The hub code path, with `load_dataset` replaced by a local DatasetDict."""
    hub = DatasetDict({"train": Dataset.from_dict({"body": [f"t{i}" for i in range(50)]}),
                       "test": Dataset.from_dict({"body": ["x"]})})
    calls = []
    monkeypatch.setattr(corpus, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub)
    cfg = DataConfig(dataset="owner/name", dataset_config="cfg", text_column="body", validation_fraction=0.2)
    train, val = rd.load_text_splits(cfg)
    assert calls[0][0] == ("owner/name", "cfg")
    assert len(train) + len(val) == 50 and set(train["text"]).isdisjoint(val["text"])
    with pytest.raises(DataError, match="no split 'training'.*'test', 'train'"):
        rd.load_text_splits(DataConfig(dataset="owner/name", train_split="training", text_column="body"))

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(corpus, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load hub dataset 'owner/name'.*no network"):
        rd.load_text_splits(DataConfig(dataset="owner/name"))


def test_stdlib_corpus_listing_and_cross_process_split():
    root, files = rd.stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any(f.startswith(("site-packages/", "pydoc_data/")) for f in files)
    assert "encodings/cp1252.py" not in files and "encodings/aliases.py" in files  # generated tables left out
    size = sum((root / f).stat().st_size for f in files)
    assert 15e6 < size < 40e6, size
    val = corpus._held_out_files(root, files, 0.02)
    assert 0 < len(val) < 0.05 * len(files)
    code = ("from revformer.corpus import stdlib_files, _held_out_files; "
            "root, files = stdlib_files(); print(_held_out_files(root, files, 0.02))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash seed must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(val)


def test_stdlib_validation_resembles_training():
    """The mix of top-level folders (by bytes) is nearly the same in validation as in training."""
    root, files = rd.stdlib_files()
    held = set(corpus._held_out_files(root, files, DataConfig().validation_fraction))
    shares = {}
    for side in (True, False):
        sizes = {}
        for f in files:
            if (f in held) == side:
                top = f.split("/")[0] if "/" in f else ""
                sizes[top] = sizes.get(top, 0) + (root / f).stat().st_size
        shares[side] = {k: v / sum(sizes.values()) for k, v in sizes.items()}
    folders = set(shares[True]) | set(shares[False])
    distance = 0.5 * sum(abs(shares[True].get(k, 0.0) - shares[False].get(k, 0.0)) for k in folders)
    assert distance < 0.15, distance  # one hash of every path (and the codec tables) gave 0.33


# ----------------------------------------------------------------------------- loaders


def _order(loader):
    return [b["input_ids"][:, 0].tolist() for b in loader]


def test_dataloader_order_is_pure_function_of_seed_and_epoch():
    blocks = Dataset.from_dict({"input_ids": [[i, i, i] for i in range(23)]})
    full = _order(rd.build_dataloader(blocks, 4, seed=7, epoch=2))
    assert len(full) == rd.num_batches(23, 4) == 5
    assert full == _order(rd.build_dataloader(blocks, 4, seed=7, epoch=2))
    assert full != _order(rd.build_dataloader(blocks, 4, seed=7, epoch=3))
    assert full != _order(rd.build_dataloader(blocks, 4, seed=8, epoch=2))
    flat = sum(full, [])
    assert len(set(flat)) == 20 and all(len(b) == 4 for b in full)
    resumed = rd.build_dataloader(blocks, 4, seed=7, epoch=2, skip_batches=3)
    assert len(resumed) == 2 and resumed.batch_sampler.epoch_batches == 5
    assert _order(resumed) == full[3:]
    tail = _order(rd.build_dataloader(blocks, 4, seed=0, shuffle=False, drop_last=False))
    assert sum(tail, []) == list(range(23))
    with pytest.raises(ValueError):
        rd.build_dataloader(blocks, 4, seed=7, skip_batches=6)


def test_streaming_dataloader_resumes_and_is_deterministic():
    blocks = Dataset.from_dict({"input_ids": [[i, i] for i in range(30)]}).to_iterable_dataset(num_shards=2)
    full = _order(rd.build_dataloader(blocks, 4, seed=1, epoch=1, shuffle_buffer=8))
    assert full == _order(rd.build_dataloader(blocks, 4, seed=1, epoch=1, shuffle_buffer=8))
    assert full != _order(rd.build_dataloader(blocks, 4, seed=1, epoch=2, shuffle_buffer=8))
    assert sorted(sum(full, [])) != sum(full, []) and len(full) == 7
    assert _order(rd.build_dataloader(blocks, 4, seed=1, epoch=1, shuffle_buffer=8, skip_batches=2)) == full[2:]


def test_accelerate_split_batches_and_skip():
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    blocks = Dataset.from_dict({"input_ids": [[i] for i in range(10)]})
    full = _order(rd.build_dataloader(blocks, 4, seed=3))
    shards = []
    for rank in range(2):
        dl = prepare_data_loader(rd.build_dataloader(blocks, 4, seed=3), device=torch.device("cpu"),
                                 num_processes=2, process_index=rank, split_batches=True, put_on_device=False)
        shards.append(_order(dl))
        assert _order(skip_first_batches(dl, 1)) == shards[rank][1:]
    assert [a + b for a, b in zip(*shards)] == full


# ----------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "missing.txt")))
    with pytest.raises(DataError):
        rd.load_text_splits(DataConfig(dataset="./no/such/folder"))


def test_empty_folder_and_empty_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "empty")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty|could not read"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "c")))


def test_not_utf8_file(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.txt").write_text("fine")
    (tmp_path / "c" / "bad.txt").write_bytes("caf\xe9".encode("latin-1"))
    cfg = DataConfig(dataset=str(tmp_path / "c"), validation_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8.*iconv"):
        rd.load_text_splits(cfg)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl is not valid UTF-8 \(.* at byte 28\)"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path / "cache")))


def test_corrupt_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"could not read .*x\.parquet.*parquet"):
        rd.load_text_splits(DataConfig(dataset=str(tmp_path / "x.parquet"), cache_dir=str(tmp_path / "cache")))


def test_missing_text_column(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    for streaming in (False, True):
        cfg = DataConfig(dataset=str(tmp_path / "d.jsonl"), streaming=streaming, cache_dir=str(tmp_path / "c"))
        with pytest.raises(DataError, match=r"text column 'text' not found.*\['body'\]"):
            rd.load_text_splits(cfg)


def test_dataset_smaller_than_one_block(tmp_path):
    texts = Dataset.from_dict({"text": ["tiny"]})
    with pytest.raises(DataError, match="5 tokens, fewer than one block of block_size=8"):
        rd.pack_texts(texts, byte_tokenizer(), 8, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="fewer than one block"):
        list(rd.pack_texts(texts.to_iterable_dataset(), byte_tokenizer(), 8))


def test_test_texts_named_split_whole_file_and_held_out(tmp_path):
    (tmp_path / "c" / "test").mkdir(parents=True)
    (tmp_path / "c" / "train.txt").write_text("train text\n" * 50)
    (tmp_path / "c" / "test" / "a.txt").write_text("held-out text\n" * 20)
    cache = str(tmp_path / "cache")
    split = rd.load_test_texts(DataConfig(dataset=str(tmp_path / "c"), cache_dir=cache), "test")
    whole = rd.load_test_texts(DataConfig(dataset=str(tmp_path / "c" / "test" / "a.txt"), cache_dir=cache), "*")
    assert list(split["text"]) == list(whole["text"]) == ["held-out text\n" * 20]
    everything = rd.load_test_texts(DataConfig(dataset=str(tmp_path / "c"), cache_dir=cache), "*")
    assert sorted(everything["text"]) == sorted(["train text\n" * 50, "held-out text\n" * 20])
    cfg = DataConfig(dataset=str(tmp_path / "c"), validation_split="test", cache_dir=cache)
    assert list(rd.load_test_texts(cfg)["text"]) == list(rd.load_text_splits(cfg)[1]["text"])  # as training held out
    with pytest.raises(DataError, match="has no split 'dev': no dev/ folder or dev.* file"):
        rd.load_test_texts(DataConfig(dataset=str(tmp_path / "c"), cache_dir=cache), "dev")
    with pytest.raises(DataError, match="no named splits"):
        rd.load_test_texts(DataConfig(), "test")
