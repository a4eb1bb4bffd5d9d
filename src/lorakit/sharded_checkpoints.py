"""Checkpoints of ``train.sharding: fsdp`` runs: every process writes its own shard of the trained state, the
checkpoint is committed atomically once all have written, no file is a pickle, and any number of processes can
resume it (the shards are re-cut while reading).

Why not ``torch.distributed.checkpoint``'s files. DCP's idea is kept (each rank writes only its shard; a reader of
any world size takes the pieces it needs), but not its storage: in torch 2.13 ``FileSystemWriter`` pickles the
checkpoint's ``.metadata`` and ``FileSystemReader.read_metadata`` runs ``pickle.load`` on it, so resuming from a
folder someone handed over could run code; lorakit reads no pickle anywhere (`lorakit.checkpoints`). DCP's
safetensors storage is private API. So the shards are written with lorakit's own safetensors writer, the rest is
JSON, and resharding is done here: FSDP2 splits dim 0 of every parameter over the processes in ``torch.chunk``
pieces, so a process's shard is a row range, and safetensors' header gives each tensor's byte range, so reading
any row range of a saved shard is one seek and one read. The state is taken from the parameters' ``DTensor``
local shards (``to_local``) and put back with ``DTensor.from_local``, the same tensors
``torch.distributed.checkpoint.state_dict.get_state_dict`` would return, without a full gather.

What is saved (what `lorakit.checkpoints` keeps for one process, so that resume is exact):
- each trained parameter (LoRA factors, ``modules_to_save`` copies) and its AdamW state tensors: every process
  writes the rows of its local shard; tensors every process holds whole (AdamW's ``step``, the buffers of
  trained modules) are written by the main process;
- each process's RNG states (torch, CUDA, Python, NumPy) in its own file;
- the loop position, scheduler, optimizer hyper-parameters (parameters by name, not index) and recipe: JSON in
  ``manifest.json`` (main process).
The frozen base is not saved: it is read again from the model's files, as torchtune's LoRA recipes do.

Layout and commit::

    OUTPUT/sharded-checkpoint/latest.json                              {"folder": "step-00000004-PID-TOKEN"}
    OUTPUT/sharded-checkpoint/step-00000004-PID-TOKEN/manifest.json
    OUTPUT/sharded-checkpoint/step-00000004-PID-TOKEN/rank-00000-of-00002.safetensors  (and one per process)

Every process writes (and ``fsync``-s) its file into ``.step-...tmp``; after a barrier the main process renames
the folder and then replaces ``latest.json`` by one atomic rename, then removes older folders. A kill at any
point leaves ``latest.json`` naming the previous complete checkpoint; the folders it does not name are removed at
the next start (`stale_entries`, used by `lorakit.checkpoints.clean_stale_temp_files`). Every process must see
the same OUTPUT folder (one node, or a filesystem shared by the nodes), as for DCP.

A world of one is not sharded (`lorakit.distributed.wrap`) but a recipe with ``train.sharding: fsdp`` still
writes this format (one file of whole tensors), so 1 -> N, N -> 1 and N -> M processes all resume.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import distributed
from .checkpoints import (CHECKPOINT_FILE, SHARDED_DIR, decode_state, encode_state, set_rng_state,
                          trained_buffers)
from .errors import AdapterError, TrainingError
from .files import (ST_DTYPES, fsync_dir, json_text, loads_json, read_safetensors_header, safetensors_bytes,
                    write_file, write_json)

LATEST_FILE = "latest.json"
MANIFEST_FILE = "manifest.json"
FORMAT = 1
_SHARD_KEY = "lorakit_shard"
_FOLDER = re.compile(r"step-(\d{8})-(\d+)-([0-9a-f]{16})")
_MANIFEST_KEYS = ("format", "world_size", "recipe", "params", "optimizer", "scheduler", "loop")
_MAX_WORLD = 1 << 16


def rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def local_rows(tensor: Tensor) -> tuple[int, int] | None:
    """Rows ``[lo, hi)`` of dim 0 that this process holds of ``tensor`` (a ``DTensor`` sharded on dim 0 over a
    1-D mesh, as FSDP2 shards: ``torch.chunk`` pieces, the last ones shorter or empty), or None for a tensor
    every process holds whole. `TrainingError` for another layout (it would be saved wrong)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return None
    if tuple(tensor.placements) != (Shard(0),) or tensor.device_mesh.ndim != 1:
        raise TrainingError(f"sharded checkpoint: a tensor sharded as {tuple(tensor.placements)} on a "
                            f"{tensor.device_mesh.ndim}-D mesh is not FSDP2's dim-0 sharding; not supported")
    rows, size = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-rows // size)
    lo = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    hi = min(lo + chunk, rows)
    if tensor.to_local().shape[0] != hi - lo:  # FSDP changed how it splits: refuse rather than save wrong rows
        raise TrainingError(f"sharded checkpoint: local shard of {tuple(tensor.shape)} has "
                            f"{tensor.to_local().shape[0]} rows, torch.chunk gives {hi - lo}")
    return lo, hi


def _json_only(value: Any, name: str) -> Any:
    """`encode_state` of a value that must hold no tensor (it goes to the manifest's JSON)."""
    tensors: dict[str, Tensor] = {}
    encoded = encode_state(value, name, tensors)
    if tensors:
        raise TypeError(f"sharded checkpoint: {name} holds tensors {sorted(tensors)[:3]}; only JSON is expected")
    return encoded


def _trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """The trained state's tensors under checkpoint keys (``param.NAME``, ``buffer.NAME``, ``optim.NAME.KEY``)
    and the optimizer's JSON part (groups with parameter names, state entries that are not tensors)."""
    named = dict(model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    tensors = {f"param.{n}": p for n, p in named.items() if p.requires_grad}
    tensors.update({f"buffer.{n}": b for n, b in trained_buffers(model).items()})
    state: dict[str, dict[str, Any]] = {}
    for param, entries in optimizer.state.items():
        name = names[id(param)]
        state[name] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value
                state[name][key] = "tensor"
            else:
                state[name][key] = _json_only(value, key)
    groups = [{**{k: _json_only(v, k) for k, v in group.items() if k != "params"},
               "params": [names[id(p)] for p in group["params"]]} for group in optimizer.param_groups]
    return tensors, {"groups": groups, "state": state}


def save_sharded_checkpoint(out: str | os.PathLike, world: distributed.World, model: nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any, loop: Mapping[str, Any],
                            recipe: Mapping[str, Any], rng: Mapping[str, Any]) -> Path:
    """Write this process's shard of the checkpoint of step ``loop["global_step"]`` into ``out``'s
    ``sharded-checkpoint`` and commit it once every process has written (a collective: all processes call it).
    ``rng``: this process's `lorakit.checkpoints.rng_state` at that step boundary. Returns the folder."""
    from .sharding import is_sharded, reshard

    if is_sharded(model):
        reshard(model)  # an evaluation forward leaves the root unit gathered; its parameters are not the shards
    root = Path(out) / SHARDED_DIR
    pid, token = distributed.broadcast_ints([os.getpid(), secrets.randbits(62)], world)  # one name for all
    name = f"step-{int(loop['global_step']):08d}-{pid}-{token:016x}"
    staging = root / f".{name}.tmp"
    if world.is_main:
        staging.mkdir(parents=True)
    distributed.barrier(world)
    state, optimizer_json = _trained_state(model, optimizer)
    tensors: dict[str, Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        rows = local_rows(value)
        if rows is None and not world.is_main:
            continue  # held whole by every process: the main process writes it
        local = value.to_local() if rows is not None else value
        if local.numel() == 0 and rows is not None:
            continue  # an empty last chunk
        tensors[key] = local.detach().to("cpu", copy=True).contiguous()
        table[key] = {"rows": list(rows) if rows else None, "shape": list(value.shape)}
    rng_json = encode_state(dict(rng), "rng", tensors)
    meta = {"format": FORMAT, "rank": world.rank, "world_size": world.size, "tensors": table, "rng": rng_json}
    write_file(staging / rank_file(world.rank, world.size), safetensors_bytes(tensors, {_SHARD_KEY: json.dumps(meta)}))
    if world.is_main:
        manifest = {"format": FORMAT, "world_size": world.size, "recipe": dict(recipe),
                    "params": [k.removeprefix("param.") for k in state if k.startswith("param.")],
                    "optimizer": optimizer_json, "scheduler": _json_only(scheduler.state_dict(), "scheduler"),
                    "loop": _json_only(dict(loop), "loop")}
        write_file(staging / MANIFEST_FILE, json_text(manifest).encode())
    distributed.barrier(world)  # every process's file is written and fsync-ed
    if world.is_main:
        _commit(root, staging, name)
    distributed.barrier(world)
    return root / name


def _commit(root: Path, staging: Path, name: str) -> None:
    """Rename the complete folder, point ``latest.json`` at it (the one atomic step), drop older folders."""
    fsync_dir(staging)
    os.rename(staging, root / name)
    fsync_dir(root)
    write_json(root / LATEST_FILE, {"format": FORMAT, "folder": name})
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and _FOLDER.fullmatch(entry.name) and entry.name != name:
            shutil.rmtree(entry, ignore_errors=True)


def stale_entries(out: str | os.PathLike) -> Iterator[tuple[Path, int | None]]:
    """Folders of ``out``'s sharded checkpoint that no complete checkpoint uses, with the PID of the main
    process that wrote them: staging folders, and step folders ``latest.json`` does not name."""
    root = Path(out) / SHARDED_DIR
    if not root.is_dir():
        return
    try:
        current = _latest_name(root)
    except TrainingError:
        current = None  # an unreadable pointer: keep every complete folder, drop only staging ones
    for entry in root.iterdir():
        staged = entry.name.startswith(".step-") and entry.name.endswith(".tmp")
        match = _FOLDER.fullmatch(entry.name[1:-4] if staged else entry.name)
        if match and (staged or (current is not None and entry.name != current)):
            yield entry, int(match.group(2))


# -- reading -------------------------------------------------------------------------------------------------------
@dataclass
class _Piece:
    """One saved tensor in one rank file: rows ``[lo, hi)`` of the whole (``lo=None``: the whole tensor)."""

    path: Path
    offset: int  # byte offset of the tensor in the file
    dtype: torch.dtype
    shape: list[int]  # of the saved piece
    lo: int | None


@dataclass
class ShardedCheckpoint:
    """A sharded checkpoint as found on disk: its folder, manifest, each saved rank's RNG JSON, and where every
    piece of every tensor is (nothing but headers has been read)."""

    folder: Path
    manifest: dict[str, Any]
    rng: list[Any]  # per saved rank
    pieces: dict[str, list[_Piece]]
    shapes: dict[str, list[int]]

    def read(self, key: str, rows: tuple[int, int] | None) -> Tensor:
        """Rows ``[lo, hi)`` of tensor ``key`` (None: all of it), from the pieces that hold them."""
        shape = self.shapes.get(key)
        if shape is None:
            raise TrainingError(f"--resume: sharded checkpoint {self.folder} has no {key!r} (damaged or written "
                                "for another recipe); use a new --output")
        if not shape:
            return _read_rows(self.pieces[key][0], None, None)
        lo, hi = rows if rows is not None else (0, shape[0])
        parts, at = [], lo
        for piece in sorted(self.pieces[key], key=lambda p: p.lo or 0):
            start = piece.lo or 0
            end = start + piece.shape[0]
            if start <= at < end:
                stop = min(end, hi)
                parts.append(_read_rows(piece, at - start, stop - start))
                at = stop
        if at < hi:
            raise TrainingError(f"--resume: sharded checkpoint {self.folder} lacks rows {at}..{hi} of {key} "
                                "(damaged); use a new --output")
        return torch.cat(parts) if parts else torch.empty([0, *shape[1:]], dtype=self.pieces[key][0].dtype)


def _read_rows(piece: _Piece, lo: int | None, hi: int | None) -> Tensor:
    shape = list(piece.shape)
    if lo is not None and hi is not None:
        row = piece.dtype.itemsize
        for size in shape[1:]:
            row *= size
        offset, shape[0] = piece.offset + lo * row, hi - lo
    else:
        offset = piece.offset
    count = piece.dtype.itemsize
    for size in shape:
        count *= size
    if count == 0:
        return torch.empty(shape, dtype=piece.dtype)
    with open(piece.path, "rb") as f:
        f.seek(offset)
        data = f.read(count)
    if len(data) != count:
        raise TrainingError(f"--resume: {piece.path} is truncated; use a new --output")
    return torch.frombuffer(bytearray(data), dtype=piece.dtype).reshape(shape)


def _json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        value = loads_json(path.read_bytes(), f"{path}: {what}")
    except (OSError, AdapterError) as err:
        raise TrainingError(f"--resume: cannot read {path} ({err}); use a new --output") from None
    if not isinstance(value, dict):
        raise TrainingError(f"--resume: {path} is not a JSON object (damaged); use a new --output")
    return value


def _latest_name(root: Path) -> str:
    name = _json_file(root / LATEST_FILE, "latest checkpoint").get("folder")
    if not isinstance(name, str) or not _FOLDER.fullmatch(name):  # a name from a file never leaves the folder
        raise TrainingError(f"--resume: {root / LATEST_FILE} names no checkpoint folder (damaged); use a new "
                            "--output")
    return name


def read_sharded_checkpoint(out: str | os.PathLike) -> ShardedCheckpoint:
    """Find and check ``out``'s latest sharded checkpoint (manifest, every rank file's header); reads no tensor.
    `TrainingError` with what to do for a missing, damaged or incomplete one."""
    out = Path(out)
    root = out / SHARDED_DIR
    if not (root / LATEST_FILE).is_file():
        if (out / CHECKPOINT_FILE).is_file():
            raise TrainingError(f"--resume: {out} holds the checkpoint of a train.sharding=ddp run "
                                f"({CHECKPOINT_FILE}); resume it with train.sharding=ddp")
        raise TrainingError(f"--resume: no sharded checkpoint in {root}; start without --resume")
    folder = root / _latest_name(root)
    manifest = _json_file(folder / MANIFEST_FILE, "checkpoint manifest")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    world = manifest.get("world_size")
    if missing or manifest.get("format") != FORMAT or not isinstance(world, int) or not 0 < world <= _MAX_WORLD:
        raise TrainingError(f"--resume: {folder / MANIFEST_FILE} is damaged or of another format (missing "
                            f"{missing}); use a new --output")
    checkpoint = ShardedCheckpoint(folder, manifest, [], {}, {})
    for rank in range(world):
        _add_rank_file(checkpoint, folder / rank_file(rank, world), rank, world)
    return checkpoint


def _add_rank_file(checkpoint: ShardedCheckpoint, path: Path, rank: int, world: int) -> None:
    if not path.is_file():
        raise TrainingError(f"--resume: {path} is missing: the checkpoint is incomplete; use a new --output")
    try:
        entries, metadata, _ = read_safetensors_header(path)
        with open(path, "rb") as f:
            body = 8 + int.from_bytes(f.read(8), "little")
        meta = loads_json(metadata.get(_SHARD_KEY, "null"), f"{path}: shard metadata")
    except (OSError, AdapterError) as err:
        raise TrainingError(f"--resume: {path} is unreadable ({err}); use a new --output") from None
    if not isinstance(meta, dict) or meta.get("rank") != rank or meta.get("world_size") != world:
        raise TrainingError(f"--resume: {path} is not rank {rank} of {world} (damaged); use a new --output")
    checkpoint.rng.append(meta.get("rng"))
    for key, info in dict(meta.get("tensors") or {}).items():
        entry = entries.get(key)
        rows, shape = info.get("rows"), info.get("shape")
        if entry is None or not isinstance(shape, list) or (rows is not None and (
                not isinstance(rows, list) or len(rows) != 2 or entry[1][:1] != [rows[1] - rows[0]]
                or entry[1][1:] != shape[1:])) or (rows is None and entry[1] != shape):
            raise TrainingError(f"--resume: {path}: tensor {key} does not match its shard table (damaged); use "
                                "a new --output")
        if checkpoint.shapes.setdefault(key, shape) != shape:
            raise TrainingError(f"--resume: {path}: {key} has another whole shape in another rank's file")
        checkpoint.pieces.setdefault(key, []).append(
            _Piece(path, body + entry[2], ST_DTYPES[entry[0]], entry[1], rows[0] if rows else None))
    for key, entry in entries.items():  # RNG tensors: whole, read by name
        if key.startswith("rng."):
            checkpoint.pieces.setdefault(f"{rank}:{key}", []).append(_Piece(path, body + entry[2],
                                                                            ST_DTYPES[entry[0]], entry[1], None))
            checkpoint.shapes[f"{rank}:{key}"] = entry[1]


# -- restoring -----------------------------------------------------------------------------------------------------
def _load_into(checkpoint: ShardedCheckpoint, key: str, target: Tensor) -> None:
    rows = local_rows(target)
    local = target.to_local() if rows is not None else target
    value = checkpoint.read(key, rows)
    if tuple(value.shape) != tuple(local.shape):
        raise TrainingError(f"--resume: {key} has shape {tuple(value.shape)} in the checkpoint, the model's "
                            f"is {tuple(local.shape)}; use a new --output")
    local.copy_(value)


def _optimizer_state(checkpoint: ShardedCheckpoint, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()``-shaped state for this process: the saved state re-cut to its shards."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = checkpoint.manifest["optimizer"]
    if [group.get("params") for group in saved.get("groups", [])] != current:
        raise TrainingError(f"--resume: {checkpoint.folder}: the optimizer's parameter groups differ (written for "
                            "another recipe/model); use a new --output")
    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    groups = [{**decode_state({k: v for k, v in group.items() if k != "params"}, {}),
               "params": [index[n] for n in group["params"]]} for group in saved["groups"]]
    state: dict[int, dict[str, Any]] = {}
    for name, entries in saved.get("state", {}).items():
        param = params[name]
        state[index[name]] = {}
        for key, value in entries.items():
            if value != "tensor":
                state[index[name]][key] = decode_state(value, {})
                continue
            tkey = f"optim.{name}.{key}"
            like_param = isinstance(param, DTensor) and checkpoint.shapes.get(tkey) == list(param.shape)
            local = checkpoint.read(tkey, local_rows(param) if like_param else None)
            if like_param:
                local = DTensor.from_local(local.to(param.to_local().device), param.device_mesh, param.placements,
                                           run_check=False, shape=param.shape, stride=param.stride())
            state[index[name]][key] = local
    return {"state": state, "param_groups": groups}


def resume_sharded(out: str | os.PathLike, world: distributed.World, model: nn.Module,
                   optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[Path, dict[str, Any]]:
    """Restore ``out``'s latest sharded checkpoint into ``model`` (sharded or not, over any number of
    processes), ``optimizer``, ``scheduler`` and this process's RNGs; returns the folder and the loop state."""
    checkpoint = read_sharded_checkpoint(out)
    manifest, folder = checkpoint.manifest, checkpoint.folder
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    buffers = trained_buffers(model)
    saved_buffers = {k.removeprefix("buffer.") for k in checkpoint.shapes if k.startswith("buffer.")}
    if set(manifest["params"]) != set(trainable) or not saved_buffers <= set(buffers):
        raise TrainingError(f"--resume: checkpoint {folder} was written for another recipe/model (recipe "
                            f"{manifest['recipe'].get('name')!r}); use a new --output")
    for name in trainable:  # every shape before any copy: a refused resume changes nothing
        if checkpoint.shapes.get(f"param.{name}") != list(params[name].shape):
            raise TrainingError(f"--resume: checkpoint {folder} holds {name} with shape "
                                f"{checkpoint.shapes.get(f'param.{name}')}, the model's is "
                                f"{list(params[name].shape)} (another recipe); use a new --output")
    try:
        with torch.no_grad():
            for name in trainable:
                _load_into(checkpoint, f"param.{name}", params[name])
            for name in saved_buffers:
                _load_into(checkpoint, f"buffer.{name}", buffers[name])
        optimizer.load_state_dict(_optimizer_state(checkpoint, model, optimizer))
        scheduler.load_state_dict(decode_state(manifest["scheduler"], {}))
        rank = world.rank if manifest["world_size"] == world.size else 0  # another world: one RNG for all
        rng_tensors = {k.split(":", 1)[1]: checkpoint.read(k, None) for k in checkpoint.shapes
                       if k.startswith(f"{rank}:rng.")}
        set_rng_state(decode_state(checkpoint.rng[rank], rng_tensors))
        loop = decode_state(manifest["loop"], {})
    except TrainingError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise TrainingError(f"--resume: checkpoint {folder}: its state does not fit ({type(err).__name__}: "
                            f"{str(err)[:200]}); use a new --output") from None
    return folder, loop


__all__ = ["LATEST_FILE", "MANIFEST_FILE", "ShardedCheckpoint", "local_rows", "rank_file",
           "read_sharded_checkpoint", "resume_sharded", "save_sharded_checkpoint", "stale_entries"]
