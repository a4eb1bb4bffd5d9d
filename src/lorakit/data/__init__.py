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

The package by job: `datasets` (the types and the seeded split), `packaged` (datasets shipped in pip
packages), `readers` (CSV / JSONL / JSON rows, checked), `images` (image folders), `user` (the user's file or
folder: parts, splits, checks), `encode` (rows -> model inputs). README "Your own data" is the user's guide.
"""

from __future__ import annotations

import os
from pathlib import Path

from .datasets import FRACTIONS, KINDS, SPLIT_NAMES, DataError, Dataset, Splits, split_order
from .encode import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PLAIN_SEPARATOR, collate_images,
                     encode_causal_lm, encode_classification, has_chat_template, pad_multiple, pad_to_multiple,
                     plain_prompt_ids)
from .images import IMAGE_SUFFIXES
from .packaged import DATASETS, FASHION_MNIST_CLASSES, PackagedDataset, fashion_mnist_dir
from .readers import MAX_CLASSES, MAX_FIELD_CHARS, TEXT_SUFFIXES, ReadOptions
from .user import SplitOptions, load_user

__all__ = [
    "DATASETS", "FASHION_MNIST_CLASSES", "FRACTIONS", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_SUFFIXES", "KINDS", "MAX_CLASSES", "MAX_FIELD_CHARS", "PLAIN_SEPARATOR", "SPLIT_NAMES", "TEXT_SUFFIXES",
    "DataError", "Dataset", "PackagedDataset", "ReadOptions", "SplitOptions", "Splits", "collate_images",
    "encode_causal_lm", "encode_classification", "fashion_mnist_dir", "has_chat_template", "load_dataset",
    "pad_multiple", "pad_to_multiple", "plain_prompt_ids", "split_order",
]


def load_dataset(name_or_path: str | os.PathLike, seed: int = 0, skip_bad_rows: bool = False, *,
                 encoding: str = "utf-8", validation_fraction: float = FRACTIONS[1],
                 test_fraction: float = FRACTIONS[2], validation_file: str | os.PathLike | None = None,
                 test_file: str | os.PathLike | None = None) -> Splits:
    """Load a packaged dataset by name (see `DATASETS`) or the user's file / folder, split train/validation/test.

    Every option is checked before anything is read. A user dataset is refused (`DataError` naming the file)
    when a split would be empty or a classification dataset has one class; a held-out split under 10 rows is
    warned about. Packaged datasets have fixed splits: giving them a user-data option is an error.

    Args:
        name_or_path: a name in `DATASETS`, a ``.jsonl`` / ``.json`` / ``.csv`` file, an image folder
            (``<class>/<image>``), or a folder with ``train`` (+ ``validation``, ``test``) files or folders.
        seed: seed of the split; the same seed gives the same split on every machine.
        skip_bad_rows: drop malformed rows (counted in ``Dataset.skipped``, logged) instead of raising `DataError`.
        encoding: text encoding of the user's files (a UTF-8 byte-order mark is dropped either way).
        validation_fraction, test_fraction: held-out shares of a dataset that comes as one file (default
            80/10/10, said in one log line), or carved from train when a split folder lacks that part.
        validation_file, test_file: the user's own held-out files; ``name_or_path`` is then the training file.
    """
    name = str(name_or_path)
    read = ReadOptions(encoding, bool(skip_bad_rows))
    split = SplitOptions(validation_fraction, test_fraction,
                         Path(validation_file).expanduser() if validation_file is not None else None,
                         Path(test_file).expanduser() if test_file is not None else None)
    if name in DATASETS:
        if read != ReadOptions() or split != SplitOptions():
            raise DataError(f"{name} is a packaged dataset with fixed splits: encoding, skip_bad_rows, fractions "
                            "and validation/test files apply to your own files only (fix: drop those options)")
        return DATASETS[name].load(seed)
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"{name}: no such dataset or file (fix: a packaged dataset ({', '.join(DATASETS)}), "
                        "a .jsonl/.csv file, or a folder)")
    return load_user(path, seed, read, split)
