"""Text sources, deterministic splits, token packing and data loaders.

Pipeline: ``load_text_splits`` gives (train, validation) datasets with a single ``text``
column; ``prepare_datasets`` tokenizes them (EOS after every document), concatenates the
token stream and cuts it into ``block_size`` blocks; ``build_dataloader`` batches blocks
in an order that is a pure function of ``(seed, epoch)`` so a resumed run sees exactly
the batches an uninterrupted run would.

Every ``Dataset`` step carries an explicit fingerprint derived from its inputs, so reruns
(and a second rank started after the first) reuse the ``datasets`` cache instead of
recomputing, even when the source is a Python generator.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import math
import os
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Sampler

Texts = Dataset | IterableDataset

# Bump when a change here alters what gets cached, so stale caches are never reused.
_CACHE_VERSION = "revformer-data-1"
# Local file suffix -> `datasets` builder. ".txt" files are read by `_read_documents`.
_SUFFIX_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Top-level stdlib entries left out of the default corpus: installed third-party packages,
# generated data (pydoc topics, build configuration) that is not source code.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "pydoc_data"}
_STDLIB_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata_")
_DOC_BATCH = 256  # documents per tokenization/packing batch
# Whole files are held out only when about this many or more would be: fewer make a lumpy, unrepresentative
# validation set (or none at all), so smaller corpora are split inside their documents instead.
_MIN_HELD_OUT_FILES = 8
_MIN_HELD_OUT_PIECES = 8  # in-document split: pieces small enough that about this many are held out
_MAX_PIECE_CHARS = 4096

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A data problem the user must fix; the message names the problem and the fix."""


class DataPathError(DataError, FileNotFoundError):
    """A local dataset path that does not exist."""


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and how it is packed."""

    dataset: str = "stdlib"  # "stdlib" (embedded default) | local file/folder path | hub dataset id
    dataset_config: str | None = None  # hub config name, e.g. "wikitext-103-raw-v1"
    train_split: str = "train"  # split (hub) or file/folder stem (local) used for training
    validation_split: str | None = "validation"  # None or missing -> held out by validation_fraction
    validation_fraction: float = 0.05  # share of documents held out when there is no validation split
    text_column: str = "text"  # column holding the text in jsonl/parquet/hub data
    streaming: bool = False  # stream instead of materializing (corpora larger than disk or memory)
    block_size: int = 1024  # tokens per packed training example
    num_proc: int = 1  # processes for loading/tokenizing (ignored when streaming)
    max_train_documents: int | None = None  # cap on training documents for quick runs
    tokenizer: str = "bpe"  # "bpe" (train one) | "byte" | path or hub id of an existing tokenizer
    vocab_size: int = 8192  # vocabulary size of the trained "bpe" tokenizer, specials included
    tokenizer_train_max_bytes: int = 20_000_000  # UTF-8 bytes of training text the BPE trainer sees
    cache_dir: str | None = None  # datasets/tokenizer cache; None -> the `datasets` default

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise DataError(
                f"validation_fraction={self.validation_fraction} must be in (0, 1); use e.g. 0.02"
            )
        if self.num_proc < 1:
            raise DataError(f"num_proc={self.num_proc} must be >= 1")
        if self.max_train_documents is not None and self.max_train_documents < 1:
            raise DataError(
                f"max_train_documents={self.max_train_documents} must be >= 1 or None (no cap)"
            )
        if self.tokenizer == "bpe" and self.vocab_size < 259:
            raise DataError(f"vocab_size={self.vocab_size} is below the 256 bytes + 3 specials of a byte-level BPE; raise it")
        if self.tokenizer_train_max_bytes < 1:
            raise DataError(f"tokenizer_train_max_bytes={self.tokenizer_train_max_bytes} must be >= 1")
        check_block_size(self.block_size, None)


def check_block_size(block_size: int, max_position_embeddings: int | None) -> None:
    """Raise ``DataError`` unless the model can take blocks of ``block_size`` tokens."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise DataError(
            f"block_size={block_size!r} must be an integer >= 2 (a block needs a token to "
            "predict from); set block_size to e.g. 1024"
        )
    if max_position_embeddings is not None and block_size > max_position_embeddings:
        raise DataError(
            f"block_size={block_size} exceeds the model's max_position_embeddings="
            f"{max_position_embeddings}; lower block_size or raise max_position_embeddings"
        )


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Bits per UTF-8 byte from the summed token cross-entropy (nats) over predicted tokens."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes={total_bytes} must be positive")
    return total_nats / (math.log(2) * total_bytes)


def _fingerprint(*parts: Any) -> str:
    """Stable digest of JSON-able parts (never Python's per-process ``hash``)."""
    blob = json.dumps([_CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _unit_hash(key: str) -> float:
    """Map ``key`` to [0, 1), identically on every machine and process."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the document named ``key`` belongs to a held-out split of ``fraction``."""
    return _unit_hash(key) < fraction


# ----------------------------------------------------------------------------- sources


def stdlib_files() -> tuple[Path, list[str]]:
    """The running interpreter's stdlib ``*.py`` files as (root, sorted relative paths).

    ``sysconfig``'s stdlib folder also holds site-packages, so installed packages are
    excluded, as are generated files (pydoc topics, build configuration).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for top in root.iterdir():  # filter top-level entries first: never walk site-packages
        if top.name in _STDLIB_EXCLUDED_DIRS or top.name.startswith(_STDLIB_EXCLUDED_PREFIXES):
            continue
        paths = [top] if top.is_file() else top.rglob("*.py") if top.is_dir() else []
        files += [p.relative_to(root).as_posix() for p in paths if p.suffix == ".py" and p.is_file()]
    return root, sorted(f for f in files if not _is_generated_codec(root / f))


def _is_generated_codec(path: Path) -> bool:
    """encodings/* charmap tables written by gencodec.py: 256-entry tables far easier to predict than code.

    They were 4% of the training bytes but, by chance of the hash, 15% of the validation bytes.
    """
    if path.parent.name != "encodings":
        return False
    with path.open("rb") as f:
        return b"gencodec.py" in f.read(2048)


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(
        f"{path} is not valid UTF-8 ({err.reason} at byte {offset + err.start}); convert it "
        "(e.g. `iconv -t UTF-8`) or remove it from the dataset"
    )


def _check_utf8(path: Path) -> None:
    """Raise ``DataError`` if ``path`` is not UTF-8; reads in chunks, so any size works.

    Needed for JSON: Arrow's reader accepts invalid UTF-8 and fails only much later.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 24)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, offset) from None
            if not chunk:
                return
            offset += len(chunk)


def _read_documents(
    root: str, files: list[str], strict: bool, inside: tuple[float, int, bool] | None = None
) -> Iterator[dict[str, str]]:
    """Yield one ``{"text": ...}`` document per file, decoded as strict UTF-8.

    ``inside=(fraction, piece_chars, validation)`` splits inside documents instead: each file is cut into pieces
    of whole lines and every run of consecutive pieces on the requested side is one document.
    """
    for rel in files:
        path = Path(root, rel)
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            if not strict:  # the stdlib ships a few deliberately mis-encoded test fixtures
                continue
            raise _not_utf8(path, err) from None
        if inside is None:
            yield {"text": text}
            continue
        fraction, piece_chars, validation = inside
        for run in _held_out_runs(rel, _line_pieces(text, piece_chars), fraction, validation):
            yield {"text": run}


def _line_pieces(text: str, piece_chars: int) -> list[str]:
    """``text`` cut at line ends into pieces of at least ``piece_chars`` characters (the last may be shorter)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= piece_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def _held_out_runs(key: str, pieces: list[str], fraction: float, validation: bool) -> list[str]:
    """Runs of consecutive pieces on one side of a systematic sample: every (1/fraction)-th piece, from an
    offset that is a stable hash of ``key``, is held out, so validation is spread evenly through the document."""
    phase = _unit_hash(key)
    runs, current = [], []
    for k, piece in enumerate(pieces):
        held = math.floor((k + 1) * fraction + phase) > math.floor(k * fraction + phase)
        if held == validation:
            current.append(piece)
        elif current:
            runs.append("".join(current))
            current = []
    if current:
        runs.append("".join(current))
    return runs


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but NUL bytes and whitespace (stops at the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.translate(None, b"\x00 \t\r\n\x0b\x0c"):
                return False
    return True


def _held_out_files(root: Path, files: list[str], fraction: float) -> list[str] | None:
    """Whole files for validation, ``fraction`` of the files of every top-level folder; None if too few.

    Within each top-level folder (a stratum), files sorted by size, every (1/fraction)-th is held out (from an
    offset hashed from the folder's name): validation then has the mix of folders and of file sizes that training
    has, rather than whatever few files one hash of every path happens to pick.
    """
    if fraction * len(files) < _MIN_HELD_OUT_FILES:
        return None
    strata: dict[str, list[str]] = defaultdict(list)
    for f in files:
        strata[f.split("/", 1)[0] if "/" in f else ""].append(f)
    held: set[str] = set()
    for name, members in strata.items():
        phase = _unit_hash(f"stratum:{name}")
        by_size = sorted(members, key=lambda f: ((root / f).stat().st_size, _unit_hash(f)))
        for i, f in enumerate(by_size):  # every (1/fraction)-th file by size: all sizes are represented
            if math.floor((i + 1) * fraction + phase) > math.floor(i * fraction + phase):
                held.add(f)
    if not held or len(held) == len(files):
        return None
    return [f for f in files if f in held]


@contextlib.contextmanager
def _data_errors(what: str) -> Iterator[None]:
    """Turn ``datasets`` generation failures into one ``DataError`` naming ``what``."""
    try:
        yield
    except (DatasetGenerationError, pa.ArrowException) as err:  # corrupt or unparsable files
        cause = err.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(
            f"could not read {what}: {cause or err}; check that the files are valid "
            "UTF-8 text, JSON lines or parquet"
        ) from err


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _file_corpus(
    root: Path, split_files: dict[str, list[str]], cfg: DataConfig, strict: bool
) -> tuple[Texts, Texts]:
    """Datasets of text files (one document each), validation held out as whole files (stratified by folder) or,
    for corpora with too few files for that, inside the documents."""
    inside: dict[str, tuple[float, int, bool] | None] = {"train": None, "validation": None}
    if "validation" not in split_files:
        files, fraction = split_files["train"], cfg.validation_fraction
        held = _held_out_files(root, files, fraction)
        if held is not None:
            split_files = {"train": [f for f in files if f not in set(held)], "validation": held}
        else:
            total = sum((root / f).stat().st_size for f in files)
            piece = int(min(_MAX_PIECE_CHARS, max(1, total * fraction / _MIN_HELD_OUT_PIECES)))
            split_files = {"train": files, "validation": files}
            inside = {"train": (fraction, piece, False), "validation": (fraction, piece, True)}
            logger.warning(
                "data: %s has %d file(s), too few to hold out whole ones; holding out every %.0fth piece of about "
                "%d characters (whole lines) inside each file as validation (validation_fraction=%s).",
                cfg.dataset, len(files), 1 / fraction, piece, fraction,
            )
    out = []
    for split in ("train", "validation"):
        files = split_files[split]
        if not files:
            raise DataError(
                f"the {split} split of {cfg.dataset!r} has no files (validation_fraction="
                f"{cfg.validation_fraction}); add files or raise validation_fraction"
            )
        texts = _text_files(root, files, cfg, strict, inside[split], f"{cfg.dataset!r} ({split})")
        if isinstance(texts, Dataset) and len(texts) == 0:
            raise DataError(
                f"the {split} split of {cfg.dataset!r} is empty: the text is too short to hold out "
                f"validation_fraction={cfg.validation_fraction} of it by lines; add text"
            )
        out.append(texts)
    return out[0], out[1]


def _text_files(
    root: Path, files: list[str], cfg: DataConfig, strict: bool, inside: tuple[float, int, bool] | None, what: str
) -> Texts:
    """One document per text file (or per held-out run of lines, see ``_read_documents``)."""
    gen_kwargs = {"root": str(root), "files": files, "strict": strict, "inside": inside}
    if cfg.streaming:
        return IterableDataset.from_generator(_read_documents, gen_kwargs=gen_kwargs)
    # Size and mtime make edited files invalidate the cache; the file order is the doc order.
    stats = [(f, *_size_and_mtime(root / f)) for f in files]
    with _data_errors(what):
        return Dataset.from_generator(
            _read_documents,
            features=Features({"text": Value("string")}),
            gen_kwargs=gen_kwargs,
            cache_dir=cfg.cache_dir,
            num_proc=min(cfg.num_proc, len(files)) if cfg.num_proc > 1 else None,
            fingerprint=_fingerprint("files", str(root), stats, strict, inside),
        )


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or Path(name).suffix in _SUFFIX_BUILDERS
    )


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix in _SUFFIX_BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _local_split_files(path: Path, cfg: DataConfig) -> dict[str, list[Path]]:
    """Files per split: ``<split>/`` folders or ``<split>.<ext>`` files name splits;
    otherwise every supported file under ``path`` is training data."""
    if path.is_file():
        return {"train": [path]}
    found: dict[str, list[Path]] = {}
    for key, name in (("train", cfg.train_split), ("validation", cfg.validation_split)):
        if not name:
            continue
        files = _data_files(path / name) if (path / name).is_dir() else sorted(
            p for p in path.glob(f"{name}.*") if p.suffix in _SUFFIX_BUILDERS
        )
        if files:
            found[key] = files
    if "train" not in found:
        held = set(found.get("validation", []))
        found["train"] = [p for p in _data_files(path) if p not in held]
    if not found["train"]:
        raise DataError(
            f"{path} contains no {'/'.join(_SUFFIX_BUILDERS)} files; point dataset at a "
            "folder or file with text data"
        )
    return found


def _load_local(cfg: DataConfig) -> tuple[Texts, Texts]:
    path = Path(cfg.dataset).expanduser()
    if not path.exists():
        raise DataPathError(
            f"dataset path {str(path)!r} does not exist; fix the path, or use 'stdlib' or a "
            "hub dataset id"
        )
    split_files = _local_split_files(path, cfg)
    builders = {_SUFFIX_BUILDERS[p.suffix] for files in split_files.values() for p in files}
    if len(builders) > 1:
        raise DataError(
            f"{path} mixes file types {sorted(builders)}; keep one format per dataset folder"
        )
    root = path if path.is_dir() else path.parent
    if builders == {"text"}:
        # An empty file among others is harmless; an empty dataset must say so before any split is made.
        if path.is_file() and _is_blank(path):
            raise DataError(f"file {path} is empty (no text, or only NUL bytes/whitespace); point dataset at text")
        if path.is_dir() and all(_is_blank(p) for files in split_files.values() for p in files):
            raise DataError(f"every file in {path} is empty (no text, or only NUL bytes/whitespace); add text")
        rel = {k: [p.relative_to(root).as_posix() for p in v] for k, v in split_files.items()}
        return _file_corpus(root, rel, cfg, strict=True)
    if all(p.stat().st_size == 0 for p in split_files["train"]):
        raise DataError(f"the training files of {str(path)!r} are empty; point dataset at data with text")
    builder = builders.pop()
    if builder == "json":
        for files in split_files.values():
            for p in files:
                _check_utf8(p)
    with _data_errors(str(path)):
        loaded = load_dataset(
            builder,
            data_files={k: [str(p) for p in v] for k, v in split_files.items()},
            cache_dir=cfg.cache_dir,
            streaming=cfg.streaming,
            **_num_proc_kwargs(cfg),
        )
    return _row_corpus(dict(loaded), cfg, has_validation="validation" in split_files)


def _load_hub(cfg: DataConfig) -> tuple[Texts, Texts]:
    try:
        loaded = load_dataset(
            cfg.dataset,
            cfg.dataset_config,
            cache_dir=cfg.cache_dir,
            streaming=cfg.streaming,
            **_num_proc_kwargs(cfg),
        )
    except Exception as err:  # hub, network, auth and builder failures come in many types
        raise DataError(
            f"could not load hub dataset {cfg.dataset!r} (config {cfg.dataset_config!r}): "
            f"{err}; check the id and config name (or log in for gated data), or pass a local path"
        ) from err
    splits = dict(loaded)
    if cfg.train_split not in splits:
        raise DataError(
            f"{cfg.dataset!r} has no split {cfg.train_split!r}; available splits: "
            f"{sorted(splits)}; set train_split"
        )
    chosen = {"train": splits[cfg.train_split]}
    if cfg.validation_split in splits:
        chosen["validation"] = splits[cfg.validation_split]
    return _row_corpus(chosen, cfg, has_validation="validation" in chosen)


def _num_proc_kwargs(cfg: DataConfig) -> dict[str, int]:
    return {"num_proc": cfg.num_proc} if cfg.num_proc > 1 and not cfg.streaming else {}


def _select_text(ds: Texts, cfg: DataConfig, split: str) -> Texts:
    """Keep only the text column, renamed to ``text``."""
    names = ds.column_names
    if names is None:  # streaming data with unknown features: look at the first row
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"the {split} split of {cfg.dataset!r} is empty; use a dataset with text")
        names = list(first)
    if cfg.text_column not in names:
        raise DataError(
            f"text column {cfg.text_column!r} not found in {cfg.dataset!r}; available columns: "
            f"{names}; set text_column"
        )
    feature = (ds.features or {}).get(cfg.text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(
            f"column {cfg.text_column!r} of {cfg.dataset!r} holds {feature}, not text; set "
            "text_column to a string column"
        )
    ds = ds.select_columns([cfg.text_column])
    return ds if cfg.text_column == "text" else ds.rename_column(cfg.text_column, "text")


def _holdout_mask(batch: dict[str, list], indices: list[int], fraction: float, keep: bool) -> list[bool]:
    return [is_held_out(f"row:{i}", fraction) == keep for i in indices]


def _holdout(ds: Texts, cfg: DataConfig, validation: bool) -> Texts:
    """Rows whose index hashes into (``validation``) or out of the held-out fraction."""
    fn_kwargs = {"fraction": cfg.validation_fraction, "keep": validation}
    if isinstance(ds, IterableDataset):
        return ds.filter(_holdout_mask, with_indices=True, batched=True, fn_kwargs=fn_kwargs)
    return ds.filter(
        _holdout_mask,
        with_indices=True,
        batched=True,
        fn_kwargs=fn_kwargs,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        new_fingerprint=_fingerprint("holdout", ds._fingerprint, fn_kwargs),
    )


def _row_corpus(splits: dict[str, Texts], cfg: DataConfig, has_validation: bool) -> tuple[Texts, Texts]:
    """(train, validation) from row datasets; validation held out by row-index hash if absent."""
    train = _select_text(splits["train"], cfg, "train")
    if has_validation:
        val = _select_text(splits["validation"], cfg, "validation")
    else:
        train, val = _holdout(train, cfg, False), _holdout(train, cfg, True)
    for split, ds in (("train", train), ("validation", val)):
        if isinstance(ds, Dataset) and len(ds) == 0:
            raise DataError(
                f"the {split} split of {cfg.dataset!r} is empty (validation_fraction="
                f"{cfg.validation_fraction}); use more data or raise validation_fraction"
            )
    return train, val


def load_text_splits(cfg: DataConfig) -> tuple[Texts, Texts]:
    """(train, validation) datasets with one ``text`` column; iterable when streaming."""
    if cfg.dataset == "stdlib":
        root, files = stdlib_files()
        train, val = _file_corpus(root, {"train": files}, cfg, strict=False)
    elif _looks_like_path(cfg.dataset) or Path(cfg.dataset).expanduser().exists():
        train, val = _load_local(cfg)
    else:
        train, val = _load_hub(cfg)
    if cfg.max_train_documents is not None:
        if isinstance(train, IterableDataset):
            train = train.take(cfg.max_train_documents)
        else:
            train = train.select(range(min(cfg.max_train_documents, len(train))))
    return train, val


def load_test_texts(cfg: DataConfig, split: str | None = None) -> Texts:
    """The text ``scripts/evaluate.py`` scores; the training split is never tokenized for it.

    ``split=None``: the validation split exactly as training held it out (same documents, same pieces).
    ``split="*"``: every document of ``cfg.dataset``, a file or folder the user names as the test set.
    Otherwise the named split: a hub split, or a local ``<split>/`` folder or ``<split>.<ext>`` file.
    """
    if split is None:
        return load_text_splits(cfg)[1]
    if cfg.dataset == "stdlib":
        raise DataError("the stdlib corpus has no named splits; score its validation split or name a file/folder")
    if not (_looks_like_path(cfg.dataset) or Path(cfg.dataset).expanduser().exists()):
        name = cfg.validation_split if split == "*" else split
        try:
            texts = load_dataset(cfg.dataset, cfg.dataset_config, split=name, cache_dir=cfg.cache_dir,
                                 streaming=cfg.streaming)
        except Exception as err:  # hub, network and missing-split failures come in many types
            raise DataError(f"could not load split {name!r} of hub dataset {cfg.dataset!r}: {err}") from err
        return _select_text(texts, cfg, name)
    path = Path(cfg.dataset).expanduser()
    if not path.exists():
        raise DataPathError(f"test set path {str(path)!r} does not exist; fix the path")
    if split == "*":
        files = [path] if path.is_file() else _data_files(path)
    else:
        found = _local_split_files(path, replace(cfg, validation_split=split)) if path.is_dir() else {}
        if "validation" not in found:
            raise DataError(f"{path} has no split {split!r}: no {split}/ folder or {split}.* file in it")
        files = found["validation"]
    if not files:
        raise DataError(f"{path} contains no {'/'.join(_SUFFIX_BUILDERS)} files to score")
    builders = {_SUFFIX_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path} mixes file types {sorted(builders)}; keep one format per dataset folder")
    if all(_is_blank(p) for p in files):
        raise DataError(f"file {files[0]} is empty (no text, or only NUL bytes/whitespace); point at text")
    root = path if path.is_dir() else path.parent
    if builders == {"text"}:
        return _text_files(root, [p.relative_to(root).as_posix() for p in files], cfg, True, None, str(path))
    with _data_errors(str(path)):
        texts = load_dataset(builders.pop(), data_files={"test": [str(p) for p in files]}, split="test",
                             cache_dir=cfg.cache_dir, streaming=cfg.streaming)
    return _select_text(texts, cfg, "test")


# ----------------------------------------------------------------------------- packing


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Digest of the tokenizer's definition, ignoring call-time padding/truncation state."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return _fingerprint(spec, tokenizer.eos_token_id)


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
        new_fingerprint=_fingerprint("tokenize", texts._fingerprint, _tokenizer_fingerprint(tokenizer), with_bytes),
        desc="Tokenizing",
        **map_kwargs,
    )
    num_tokens = pc.sum(pc.list_value_length(docs.data.column("input_ids"))).as_py() or 0
    if num_tokens < block_size:
        raise DataError(_too_small_message(num_tokens, block_size))
    with _data_errors("tokenized documents"):
        return Dataset.from_generator(
            _pack_blocks,
            features=Features(block_columns),
            gen_kwargs={"docs": docs, **gen_kwargs},
            cache_dir=cache_dir,
            fingerprint=_fingerprint("pack", docs._fingerprint, gen_kwargs),
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
    "is_held_out",
    "load_test_texts",
    "load_text_splits",
    "num_batches",
    "pack_texts",
    "prepare_datasets",
    "stdlib_files",
    "token_byte_lengths",
]
