"""The in-memory dataset types and the seeded split every loader uses.

Splits are a permutation ordered by ``sha256(seed:key)``: the same on every machine and Python/NumPy/torch
version, with no RNG involved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from torch import Tensor

from ..errors import ConfigError

KINDS = ("text-classification", "prompt-completion", "chat", "image-classification")
SPLIT_NAMES = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test of a dataset that comes as one piece


class DataError(ConfigError):
    """A dataset cannot be found, or one of its rows is malformed. Messages read ``file:line: problem (fix)``."""


@dataclass
class Dataset:
    """An in-memory, list-like dataset of dict rows (see `lorakit.data` for each kind's fields)."""

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


def split_rows(name: str, kind: str, rows: list[dict], labels: list[str] | None, source: str, seed: int,
               keys: Sequence[str] | None = None, fractions: tuple[float, float, float] = FRACTIONS) -> Splits:
    """Seeded train/validation/test split of one list of rows; ``keys`` (default: the index) decide the order.

    ``fractions`` are (train, validation, test); validation and test get ``round(n * fraction)`` rows each.
    """
    order = split_order(keys if keys is not None else [str(i) for i in range(len(rows))], seed)
    n_val, n_test = round(len(rows) * fractions[1]), round(len(rows) * fractions[2])
    parts = (order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test])
    return Splits(*(Dataset(name, kind, [rows[i] for i in part], labels, source) for part in parts))


def carve(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split a held-out part of ``fraction`` off ``train`` (seeded): (rest, held out), rows in file order."""
    order = split_order([str(i) for i in range(len(train))], seed)
    n_held = round(len(train) * fraction)
    return train.select(sorted(order[n_held:])), train.select(sorted(order[:n_held]))
