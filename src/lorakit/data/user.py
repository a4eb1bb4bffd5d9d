"""The user's own data: a file, an image folder, or a folder of train/validation/test parts, split and checked.

What a loader may not return: an empty split, a held-out split too small to say anything without a warning,
or classification data with a single class. Each is a `DataError` (or a warning) naming the file.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .datasets import SPLIT_NAMES, DataError, Dataset, Splits, carve, split_rows
from .images import is_image_folder, read_image_folder
from .readers import TEXT_SUFFIXES, ReadOptions, class_names, read_file

log = logging.getLogger("lorakit.data")

SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
SMALL_SPLIT = 10  # held-out rows below which a metric moves in steps of 10 points or more: warned about


@dataclass(frozen=True)
class SplitOptions:
    """How a user dataset is split: the held-out fractions carved from what comes as one piece, and held-out
    files given apart from the training file."""

    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    validation_file: Path | None = None
    test_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise DataError(f"{name} must be a number between 0 and 1 (exclusive), not {value!r}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise DataError(f"validation_fraction + test_fraction = {self.validation_fraction + self.test_fraction:g}"
                            " leaves nothing to train on (fix: fractions that sum to less than 1, e.g. 0.1 and 0.1)")

    @property
    def fractions(self) -> tuple[float, float, float]:
        """(train, validation, test) fractions of a dataset that comes as one piece."""
        return 1 - self.validation_fraction - self.test_fraction, self.validation_fraction, self.test_fraction

    def percent(self) -> str:
        return "/".join(f"{100 * f:g}" for f in self.fractions)


def split_files(folder: Path) -> dict[str, Path]:
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


def _read_parts(name: str, parts: dict[str, Path], read: ReadOptions) -> dict[str, Dataset]:
    """Each part read with one kind and one class list across parts."""
    if parts["train"].is_dir():
        for split, path in parts.items():
            if not path.is_dir():
                raise DataError(f"{path}: the {split} part is a file but train is an image folder (fix: both "
                                "image folders, or both files)")
        classes = sorted({sub.name for part in parts.values() for sub in part.iterdir() if sub.is_dir()})
        loaded = {split: read_image_folder(path, read, classes) for split, path in parts.items()}
        return {split: Dataset(name, "image-classification", rows, classes, str(parts[split]), skipped)
                for split, (rows, _, skipped) in loaded.items()}
    kind, first_rows, first_skipped = read_file(parts["train"], read)
    texts = {"train": (first_rows, first_skipped)}
    for split, path in parts.items():
        if split != "train":
            if path.is_dir():
                raise DataError(f"{path}: the {split} part is a folder but train is a file (fix: both files, or "
                                "both image folders)")
            _, rows, skipped = read_file(path, read, kind)
            texts[split] = (rows, skipped)
    labels = class_names([rows for rows, _ in texts.values()]) if kind == "text-classification" else None
    return {split: Dataset(name, kind, rows, labels, str(parts[split]), skipped)
            for split, (rows, skipped) in texts.items()}


def _assemble(name: str, datasets: dict[str, Dataset], seed: int, split: SplitOptions) -> tuple[Splits, list[str]]:
    """Splits from the parts read, and what was done to make them (said once the splits pass their checks):
    one piece is split by the fractions, a missing held-out part is carved from train."""
    train = datasets["train"]
    if len(datasets) == 1:  # one piece: split it, and say so
        splits = split_rows(name, train.kind, train.rows, train.labels, train.source, seed,
                            fractions=split.fractions)
        for part in splits:
            part.skipped = train.skipped  # the count of the whole file, reported on each part
        sizes = " / ".join(f"{len(part)} {part_name}" for part, part_name in zip(splits, SPLIT_NAMES))
        return splits, [f"{train.source}: one piece, split {split.percent()} (seed {seed}) into {sizes} rows "
                        "(your own held-out data: a folder of train/validation/test files, or "
                        "data.validation_file= / data.test_file=)"]
    notes = []
    for held_out in ("validation", "test"):
        if held_out not in datasets:  # the one missing part: a seeded fraction of train
            fraction = split.fractions[SPLIT_NAMES.index(held_out)]
            train, datasets[held_out] = carve(train, fraction, seed)
            notes.append(f"{train.source}: no {held_out} file: {100 * fraction:g}% of train (seed {seed}) held out "
                         f"as {held_out}, {len(datasets[held_out])} rows")
    return Splits(train, datasets["validation"], datasets["test"]), notes


def _fewest_rows(split: SplitOptions) -> int:
    """The smallest dataset whose one-piece split leaves every part at least one row."""
    n = 1
    while not (round(n * split.validation_fraction) >= 1 and round(n * split.test_fraction) >= 1
               and n - round(n * split.validation_fraction) - round(n * split.test_fraction) >= 1):
        n += 1
    return n


def check_splits(splits: Splits, origin: str, split: SplitOptions) -> None:
    """Refuse empty splits and single-class data, warn about tiny held-out splits; messages name the files."""
    for name in SPLIT_NAMES:
        part = splits[name]
        if len(part) == 0:
            total = sum(len(p) for p in splits)
            raise DataError(f"{part.source}: the {name} split is empty ({total} usable row(s) in all, split "
                            f"{split.percent()}) (fix: at least {_fewest_rows(split)} rows, or give your own "
                            "validation/test files)")
    for name in ("validation", "test"):
        if len(splits[name]) < SMALL_SPLIT:
            log.warning("%s: the %s split has only %d row(s): its metrics move in steps of %.0f%% (more rows, or "
                        "a larger data.%s_fraction, give a steadier measure)", splits[name].source, name,
                        len(splits[name]), 100 / len(splits[name]), name)
    if splits.train.labels is None:
        return
    counts = Counter(row["label"] for row in splits.train)
    if len(counts) < 2:
        only = splits.train.labels[next(iter(counts))]
        raise DataError(f"{splits.train.source}: every training row has label {only!r}: a classifier needs at "
                        "least 2 classes to learn anything (fix: add rows of the other classes)")
    held_out = {row["label"] for name in ("validation", "test") for row in splits[name]}
    unseen = held_out - set(counts)
    if unseen:
        names = ", ".join(repr(splits.train.labels[i]) for i in sorted(unseen)[:5])
        log.warning("%s: class(es) %s appear in validation/test but never in train", origin, names)
    unused = len(splits.train.labels) - len(held_out | set(counts))
    if unused:  # integer labels name themselves: index 99 makes a 100-way head even if 2 classes are used
        log.warning("%s: %d of the %d class indices have no rows (the head still gets %d outputs; fix: number the "
                    "classes 0..N-1, or use class names)", origin, unused, len(splits.train.labels),
                    len(splits.train.labels))


def load_user(path: Path, seed: int, read: ReadOptions, split: SplitOptions) -> Splits:
    """Read, split and check the user's file or folder (see `lorakit.data.load_dataset`)."""
    if path.is_dir():
        parts = split_files(path)
        if "train" not in parts:
            if not is_image_folder(path):
                raise DataError(f"{path}: neither train/validation/test files nor class sub-folders of images "
                                "(fix: train.jsonl [+ validation.jsonl, test.jsonl], or folder/<class>/<image>.png)")
            parts = {"train": path}
    elif path.suffix.lower() in TEXT_SUFFIXES:
        parts = {"train": path}
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (fix: .jsonl, .json or .csv)")
    for held_out, given in (("validation", split.validation_file), ("test", split.test_file)):
        if given is not None:
            if held_out in parts:
                raise DataError(f"{path} already has a {held_out} part ({parts[held_out]}), and {held_out}_file="
                                f"{given} was given too (fix: one of them)")
            if not given.exists():
                raise DataError(f"{given}: no such {held_out} file (fix: the path of a .jsonl/.csv file)")
            parts[held_out] = given
    name = path.stem if path.is_file() else path.name
    splits, notes = _assemble(name, _read_parts(name, parts, read), seed, split)
    check_splits(splits, str(path), split)
    for note in notes:
        log.warning("%s", note)
    return splits
