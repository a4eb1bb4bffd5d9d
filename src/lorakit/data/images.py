"""Image folders: ``folder/<class>/<image>.png|jpg``, one sub-folder per class, read into uint8 tensors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from .datasets import DataError
from .readers import BadRow, ReadOptions

log = logging.getLogger("lorakit.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image(path: Path) -> Tensor:
    """uint8 (H, W) for grayscale files, (3, H, W) otherwise; an unreadable file is a `BadRow`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if image.mode in ("L", "I;16", "1") else "RGB")
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            width, height = image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise BadRow(f"cannot read image: {err}", "remove or re-save the file as PNG/JPEG") from None
    return pixels.reshape(height, width) if image.mode == "L" else pixels.reshape(height, width, 3).permute(2, 0, 1)


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` has at least one sub-folder holding PNG/JPEG files."""
    return any(sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir())
               for sub in folder.iterdir())


def read_image_folder(folder: Path, options: ReadOptions, classes: list[str] | None = None
                      ) -> tuple[list[dict], list[str], int]:
    """(rows, class names, skipped) of ``folder/<class>/<image>``; classes are the sorted sub-folder names."""
    classes = classes or sorted(sub.name for sub in folder.iterdir() if sub.is_dir())
    rows, skipped = [], 0
    for index, name in enumerate(classes):
        files = sorted(f for f in (folder / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        for file in files:
            try:
                rows.append({"image": load_image(file), "label": index})
            except BadRow as bad:
                if not options.skip_bad_rows:
                    raise bad.at(str(file)) from None
                skipped += 1
    if not rows:
        raise DataError(f"{folder}: no PNG/JPEG images in class sub-folders (fix: folder/<class>/<image>.png)")
    if skipped:
        log.warning("%s: skipped %d unreadable image(s)", folder, skipped)
    return rows, classes, skipped
