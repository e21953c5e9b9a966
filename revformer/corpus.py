"""Text sources and their splits: where the text comes from and which of it is held out.

``load_text_splits`` gives (train, validation) datasets with a single ``text`` column from the embedded ``stdlib``
corpus, a local file or folder (``.txt``, ``.jsonl``, ``.parquet``) or a hub dataset; ``load_test_texts`` gives the
text ``scripts/evaluate.py`` scores. Without a named validation split, whole files are held out, stratified by
top-level folder and size, so validation has the mix training has; a corpus with too few files for that is split
inside its documents (by runs of lines) instead, and says so. Tokenizing, packing and loading: ``revformer.data``.

Every ``Dataset`` step carries an explicit fingerprint derived from its inputs, so reruns (and a second rank
started after the first) reuse the ``datasets`` cache instead of recomputing, even when the source is a generator.
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

import pyarrow as pa
from datasets import Dataset, Features, IterableDataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

Texts = Dataset | IterableDataset

# Bump when a change here alters what gets cached, so stale caches are never reused.
_CACHE_VERSION = "revformer-data-1"
# Local file suffix -> `datasets` builder. ".txt" files are read by `_read_documents`.
_SUFFIX_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Top-level stdlib entries left out of the default corpus: installed third-party packages,
# generated data (pydoc topics, build configuration) that is not source code.
_STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "pydoc_data"}
_STDLIB_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata_")
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
    # Attention stays inside each document of a packed block: position_ids restart after every EOS, and the model
    # masks attention across those borders (transformers' padding-free convention).
    document_attention: bool = True
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



def fingerprint(*parts: Any) -> str:
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
def data_errors(what: str) -> Iterator[None]:
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
    with data_errors(what):
        return Dataset.from_generator(
            _read_documents,
            features=Features({"text": Value("string")}),
            gen_kwargs=gen_kwargs,
            cache_dir=cfg.cache_dir,
            num_proc=min(cfg.num_proc, len(files)) if cfg.num_proc > 1 else None,
            fingerprint=fingerprint("files", str(root), stats, strict, inside),
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
    with data_errors(str(path)):
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
        new_fingerprint=fingerprint("holdout", ds._fingerprint, fn_kwargs),
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
    with data_errors(str(path)):
        texts = load_dataset(builders.pop(), data_files={"test": [str(p) for p in files]}, split="test",
                             cache_dir=cfg.cache_dir, streaming=cfg.streaming)
    return _select_text(texts, cfg, "test")


__all__ = [
    "DataConfig",
    "DataError",
    "DataPathError",
    "Texts",
    "check_block_size",
    "is_held_out",
    "load_test_texts",
    "load_text_splits",
    "stdlib_files",
]
