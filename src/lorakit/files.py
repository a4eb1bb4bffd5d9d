"""Files lorakit writes and reads, done safely: atomic folder and file writes that honour the umask, the one JSON
writer, bounded JSON parsing, and safetensors headers checked before any tensor byte is read.

Every writer here is all or nothing: the new content appears under its final name by one ``rename`` after it
was written and ``fsync``-ed, so a crash or a full disk never leaves half a file or half a folder at the
destination. Permissions follow the process umask as ``mkdir``/``open`` do (a folder is ``0o777 & ~umask``, a
file ``0o666 & ~umask``): a server running as another user can read what training wrote.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from .errors import AdapterError

#: deepest nesting accepted in a JSON document lorakit reads (configs, safetensors headers, metadata); deeper
#: documents are refused before anything recurses into them
MAX_JSON_DEPTH = 64
#: largest safetensors header accepted (the JSON before the tensor bytes); safetensors' own limit is 100 MB
MAX_HEADER_BYTES = 100_000_000
#: safetensors dtype names -> torch dtypes
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
#: one safetensors tensor: dtype name, shape, start and end byte in the body
HeaderEntry = tuple[str, list[int], int, int]


# =========================================================================================================
# JSON
# =========================================================================================================
def json_default(value: Any) -> Any:
    """How lorakit writes what JSON has no type for: tensors and NumPy values as lists/numbers, the rest as
    its ``str`` (paths, dtypes, devices)."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def json_text(data: Any) -> str:
    """``data`` as lorakit writes JSON: indented, keys in insertion order, `json_default` for other types."""
    return json.dumps(data, indent=2, default=json_default) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (see `write_bytes`); returns the path."""
    return write_bytes(path, json_text(data).encode("utf-8"))


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from an untrusted file; `AdapterError` naming ``what`` for bad JSON or nesting deeper than
    ``max_depth`` (Python's parser recurses: deep nesting is a `RecursionError` there, later in any code that
    walks the value)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise AdapterError(f"{what} is nested deeper than {max_depth} levels; the file is corrupted or "
                           "hostile") from None
    except ValueError as err:  # bad JSON, bad UTF-8, or an integer of more than 4,300 digits
        raise AdapterError(f"{what} is not valid JSON ({str(err)[:200]})") from None
    if json_depth(value) > max_depth:
        raise AdapterError(f"{what} is nested deeper than {max_depth} levels; the file is corrupted or hostile")
    return value


# =========================================================================================================
# Atomic writes
# =========================================================================================================
def _write_synced(path: Path, data: bytes, exclusive: bool = False) -> None:
    with open(path, "xb" if exclusive else "wb") as f:  # mode 0o666 & ~umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a new file and ``fsync`` it: for files inside a folder `atomic_directory` stages."""
    _write_synced(Path(path), data)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by a file holding ``data``, atomically: written beside it under a temporary name,
    ``fsync``-ed, then renamed over it. Readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_synced(tmp, data, exclusive=True)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems cannot sync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove staging folders `atomic_directory` left beside ``dest`` when its process was killed (named
    ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` with PID no longer running); returns what was removed."""
    removed = []
    if not dest.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for entry in dest.parent.glob(f".{dest.name}.{kind}-*-*"):
            pid = entry.name[len(f".{dest.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _new_sibling(dest: Path, kind: str) -> Path:
    """A fresh folder beside ``dest``, created with ``mkdir`` so its mode follows the umask (``mkdtemp`` is
    always 0o700)."""
    while True:
        path = dest.parent / f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_directory(dest: str | os.PathLike, replace: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``dest``; on success it becomes ``dest`` by rename.

    If ``dest`` exists, its entries not named in ``replace`` are carried over (hard links where possible) and
    the old folder is swapped out (``replace=None``: nothing is carried over). On any error the staging folder
    is removed and ``dest`` is left as it was: a crash never leaves a half-written folder at ``dest``. Staging
    folders of killed processes beside ``dest`` are removed first.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise AdapterError(f"{dest} exists and is not a folder")
    remove_stale_staging(dest)
    staging = _new_sibling(dest, "tmp")
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if dest.exists():
            if replace is not None:
                owned = set(replace)
                for entry in dest.iterdir():
                    if entry.name not in owned and not (staging / entry.name).exists():
                        _link_or_copy(entry, staging / entry.name)
            old = _new_sibling(dest, "old")
            os.rmdir(old)
            os.rename(dest, old)
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, copy_function=link, symlinks=True)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link(str(source), str(target))


def inside(folder: Path, path: Path) -> Path:
    """``path`` if it stays inside ``folder`` once resolved; `AdapterError` otherwise (a name read from a file
    must never make lorakit write elsewhere)."""
    root, target = folder.resolve(), path.resolve()
    if target != root and root not in target.parents:
        raise AdapterError(f"refusing to write {path}: it is outside {folder}")
    return path


# =========================================================================================================
# safetensors headers, checked before the tensor bytes are read
# =========================================================================================================
def _bad_safetensors(path: Path, why: str) -> AdapterError:
    return AdapterError(f"{path} is not a valid safetensors file ({why}); the file is truncated or corrupted: "
                        "save or download it again")


def parse_safetensors_header(data: bytes, path: Path, total: int | None = None
                             ) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Validate a safetensors header; return ``{key: (dtype, shape, start, end)}`` and ``__metadata__``.

    ``data`` starts at the file's first byte and holds at least the 8-byte length and the header; ``total`` is
    the file's length (default ``len(data)``): every tensor must fit the body exactly, without overlaps or
    gaps, so the header is checked against the file's size without reading the tensors.
    """
    total = len(data) if total is None else total
    if total < 8 or len(data) < 8:
        raise _bad_safetensors(path, f"only {total} bytes")
    size = int.from_bytes(data[:8], "little")
    if size < 2 or size > min(total, len(data)) - 8 or size > MAX_HEADER_BYTES:
        raise _bad_safetensors(path, f"header length {size} does not fit a {total}-byte file")
    header = loads_json(data[8:8 + size], f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise _bad_safetensors(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_safetensors(path, "__metadata__ must map strings to strings")
    body = total - 8 - size
    entries = {key: _header_entry(key, info, body, path) for key, info in header.items()}
    position = 0
    for _, _, start, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if start != position:
            raise _bad_safetensors(path, "tensor data overlaps or leaves gaps")
        position = end
    if position != body:
        raise _bad_safetensors(path, f"{body - position} bytes after the last tensor")
    return entries, metadata


def _header_entry(key: str, info: Any, body: int, path: Path) -> HeaderEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _bad_safetensors(path, f"entry {key!r} is malformed")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise _bad_safetensors(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= body for d in shape):
        raise _bad_safetensors(path, f"tensor {key!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad_safetensors(path, f"tensor {key!r} has data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
    if not 0 <= start <= end <= body or end - start != nbytes:
        raise _bad_safetensors(path, f"tensor {key!r} ({dtype} {shape}) does not fit bytes {start}..{end} of a "
                                     f"{body}-byte body")
    return dtype, shape, start, end


def read_safetensors_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str], int]:
    """Read and check only the header of a safetensors file (8-byte length, then the JSON): entries, metadata
    and the file's size. A file of any size is rejected after reading at most `MAX_HEADER_BYTES`."""
    try:
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            if size > min(total - 8, MAX_HEADER_BYTES):
                raise _bad_safetensors(path, f"header length {size} does not fit a {total}-byte file")
            data = head + f.read(size)
    except OSError as err:
        raise AdapterError(f"cannot read {path}: {err}") from None
    entries, metadata = parse_safetensors_header(data, path, total)
    return entries, metadata, total


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file; the header is checked (`read_safetensors_header`)
    before any tensor byte is read, and every problem is an `AdapterError`."""
    from safetensors.torch import load

    read_safetensors_header(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"cannot read {path}: {err}") from None
    _, metadata = parse_safetensors_header(data, path)  # the file may have changed since its header was read
    try:
        tensors = load(data)
    except BaseException as err:  # the Rust parser raises its own error types (a panic is a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise AdapterError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err})") from None
    return tensors, metadata


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes for ``tensors`` with ``__metadata__`` ``metadata``."""
    from safetensors.torch import save

    return save(dict(tensors), metadata=dict(metadata))


__all__ = ["MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "ST_DTYPES", "atomic_directory", "fsync_dir", "inside",
           "json_default", "json_depth", "json_text", "loads_json", "parse_safetensors_header", "read_safetensors",
           "read_safetensors_header", "remove_stale_staging", "safetensors_bytes", "write_bytes", "write_file",
           "write_json"]
