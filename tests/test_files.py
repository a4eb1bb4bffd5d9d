"""Safe file handling (`lorakit.files`): safetensors headers checked before tensor bytes, bounded JSON, the one
JSON writer, atomic writes that honour the umask, stale staging folders of killed runs removed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import AdapterError
from lorakit.files import (MAX_JSON_DEPTH, atomic_directory, inside, json_depth, loads_json, read_safetensors,
                           read_safetensors_header, remove_stale_staging, write_bytes, write_json)


# -- safetensors: the header first --------------------------------------------------------------------------------
def test_header_is_checked_before_any_tensor_byte_is_read(tmp_path, monkeypatch) -> None:
    """A 3 GiB file (sparse) whose header does not fit its body is refused after reading 8 + header bytes."""
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(3 << 30)
    reads = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real_read_bytes(self))
    with pytest.raises(AdapterError, match="bytes after the last tensor"):
        read_safetensors(path)
    assert reads == []  # never read whole


def _framed(header: bytes, body: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + body


@pytest.mark.parametrize("damage,match", [
    (lambda h, b: _framed(h, b, 10 ** 12), "header length"),
    (lambda h, b: _framed(h.replace(b'"F32"', b'["F32"]'), b), "unknown dtype"),  # was TypeError (unhashable)
    (lambda h, b: _framed(h.replace(b"[4]", b'"abc"'), b), "has shape"),
    (lambda h, b: _framed(h, b[:-4]), "does not fit"),
    (lambda h, b: _framed(h, b + b"xxxx"), "bytes after the last tensor"),
    (lambda h, b: _framed(h.rstrip()[:-1], b), "not valid JSON"),
    (lambda h, b: _framed(b"[1, 2]", b), "not a JSON object"),
])
def test_malformed_headers_are_adapter_errors(damage, match, tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4)}, good)
    data = good.read_bytes()
    size = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(data[8:8 + size], data[8 + size:]))
    with pytest.raises(AdapterError, match=match):
        read_safetensors_header(bad)
    with pytest.raises(AdapterError):
        read_safetensors(bad)


def test_header_nesting_is_bounded(tmp_path) -> None:
    deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(AdapterError, match="nested deeper"):
        read_safetensors(path)  # was RecursionError


# -- JSON -------------------------------------------------------------------------------------------------------
def test_loads_json_bounds_nesting_and_big_integers() -> None:
    assert loads_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    with pytest.raises(AdapterError, match="nested deeper"):
        loads_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")
    with pytest.raises(AdapterError, match="nested deeper"):
        loads_json("[" * 100_000 + "]" * 100_000, "x")
    with pytest.raises(AdapterError, match="not valid JSON"):
        loads_json('{"r": ' + "9" * 5000 + "}", "x")  # was ValueError (int digits limit)
    with pytest.raises(AdapterError, match="not valid JSON"):
        loads_json(b"\xff\xfe", "x")
    assert json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(5) == 0


def test_write_json_one_default_for_tensors_numpy_paths(tmp_path) -> None:
    import numpy as np

    path = write_json(tmp_path / "sub" / "m.json", {"t": torch.tensor([1.5, 2.0]), "s": torch.tensor(3),
                                                    "n": np.float32(0.5), "a": np.arange(2), "p": tmp_path,
                                                    "d": torch.float32})
    assert json.loads(path.read_text()) == {"t": [1.5, 2.0], "s": 3, "n": 0.5, "a": [0, 1], "p": str(tmp_path),
                                            "d": "torch.float32"}
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temporary file left


def test_write_bytes_is_atomic(tmp_path, monkeypatch) -> None:
    target = write_bytes(tmp_path / "f.bin", b"old")

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="no space"):
        write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_inside_refuses_paths_that_leave_the_folder(tmp_path) -> None:
    assert inside(tmp_path, tmp_path / "a" / "b") == tmp_path / "a" / "b"
    for bad in (tmp_path / ".." / "x", Path("/tmp/x"), tmp_path / "a" / ".." / ".." / "y"):
        with pytest.raises(AdapterError, match="outside"):
            inside(tmp_path, bad)


# -- permissions follow the umask (issue 17) ------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                         (0o002, 0o775, 0o664)])
def test_written_folders_and_files_follow_the_umask(umask, folder_mode, file_mode, tmp_path) -> None:
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "a.txt").write_text("x")
        write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == folder_mode  # was 0o700 whatever the umask (mkdtemp)
    assert _mode(tmp_path / "out" / "a.txt") == file_mode and _mode(tmp_path / "m.json") == file_mode


# -- staging folders of killed processes ----------------------------------------------------------------------------
def test_stale_staging_of_a_killed_process_is_removed(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abcd1234"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.tmp-{os.getppid()}-abcd1234"  # a running process: left alone
    alive.mkdir()
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "x").write_text("y")
    assert not stale.exists() and alive.exists() and (tmp_path / "out" / "x").is_file()
    assert remove_stale_staging(tmp_path / "out") == []
