"""Checkpoints: safetensors + JSON round trip (optimizer, scheduler, RNG, trained buffers), no code run from a
crafted pickle, clean errors for damaged or incomplete files, stale temporary files of killed runs removed."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, inject
from lorakit.checkpoints import (CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, checkpoint_path, clean_stale_temp_files,
                                 read_checkpoint, restore_checkpoint, rng_state, save_checkpoint, trained_buffers)
from lorakit.errors import TrainingError
from lorakit.recipes import TrainArgs
from lorakit.train import build_optimizer, build_scheduler


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    inject(model, LoraConfig(r=2, target_modules=["0", "3"], modules_to_save=["1"]))
    return model


def _train_a_little(model: nn.Module, steps: int = 3) -> tuple[torch.optim.Optimizer, object]:
    args = TrainArgs(lr=1e-2, lora_plus_ratio=4.0, weight_decay=0.01)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args, 10)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_round_trip_restores_tensors_optimizer_scheduler_rng_and_norm_buffers(tmp_path: Path) -> None:
    model = _model()
    optimizer, scheduler = _train_a_little(model)
    buffers = trained_buffers(model)
    assert any(name.endswith("running_mean") for name in buffers)  # the trained BatchNorm copy's statistics
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    rng = rng_state()
    loop = {"epoch": 1, "step_in_epoch": 2, "global_step": 3, "history": [{"step": 1, "loss": float("nan")}]}
    path = save_checkpoint(tmp_path / CHECKPOINT_FILE, model, optimizer, scheduler, loop, {"name": "t"}, rng)
    expected = (torch.rand(3), random.random(), np.random.rand())

    fresh = _model()
    fresh_optimizer, fresh_scheduler = _train_a_little(fresh, steps=1)
    saved = read_checkpoint(path)
    restore_checkpoint(saved, path, fresh, fresh_optimizer, fresh_scheduler)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and running statistics, bit for bit
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    groups = [json.dumps(o.state_dict()["param_groups"]) for o in (fresh_optimizer, optimizer)]
    assert groups[0] == groups[1]
    for k, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh_optimizer.state_dict()["state"][k][key], value)
    assert saved.loop["global_step"] == 3 and saved.loop["history"][0]["step"] == 1


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickle_checkpoint_is_refused_without_running_anything(tmp_path: Path) -> None:
    # the payload is live: plain unpickling creates the file
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"trainable": _Payload(probe)}))
    assert probe.exists()
    marker = tmp_path / "pwned"
    torch.save({"trainable": _Payload(marker), "loop": {}}, tmp_path / LEGACY_CHECKPOINT_FILE)
    assert checkpoint_path(tmp_path) == tmp_path / LEGACY_CHECKPOINT_FILE
    with pytest.raises(TrainingError, match="old pickle format.*cannot be read safely.*nothing in it was run"):
        read_checkpoint(tmp_path / LEGACY_CHECKPOINT_FILE)
    assert not marker.exists()


def test_legacy_checkpoint_of_plain_tensors_still_resumes(tmp_path: Path) -> None:
    model = _model()
    optimizer, scheduler = _train_a_little(model)
    legacy = {"format": 1, "recipe": {"name": "old"}, "optimizer": optimizer.state_dict(),
              "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
              "scheduler": scheduler.state_dict(), "loop": {"global_step": 3}, "rng": rng_state()}
    torch.save(legacy, tmp_path / LEGACY_CHECKPOINT_FILE)
    saved = read_checkpoint(checkpoint_path(tmp_path))
    fresh = _model()
    fresh_optimizer, fresh_scheduler = _train_a_little(fresh, steps=1)
    restore_checkpoint(saved, tmp_path / LEGACY_CHECKPOINT_FILE, fresh, fresh_optimizer, fresh_scheduler)
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, legacy["trainable"][name])


def test_damaged_and_incomplete_checkpoints_are_clean_errors_naming_the_file(tmp_path: Path) -> None:
    model = _model()
    optimizer, scheduler = _train_a_little(model)
    path = save_checkpoint(tmp_path / CHECKPOINT_FILE, model, optimizer, scheduler, {"global_step": 1}, {}, rng_state())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match="cut.safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(TrainingError, match="junk.safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    torch.save({"trainable": {}, "loop": {}}, tmp_path / "partial.pt")  # a legacy dict missing keys
    with pytest.raises(TrainingError, match=r"partial.pt lacks \['recipe', 'optimizer', 'scheduler', 'rng'\]"):
        read_checkpoint(tmp_path / "partial.pt")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))  # a safetensors file, not ours
    with pytest.raises(TrainingError, match="foreign.safetensors.*no lorakit checkpoint"):
        read_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(TrainingError, match="no checkpoint at"):
        read_checkpoint(tmp_path / "none.safetensors")
    other = nn.Sequential(nn.Linear(6, 8))  # another model: refused before anything is copied
    inject(other, LoraConfig(r=2, target_modules=["0"]))
    other_optimizer = build_optimizer(other, TrainArgs())
    with pytest.raises(TrainingError, match="another recipe/model"):
        restore_checkpoint(read_checkpoint(path), path, other, other_optimizer,
                           build_scheduler(other_optimizer, TrainArgs(), 5))


def test_stale_temp_files_of_killed_runs_are_cleaned_and_nothing_else(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    stale = [tmp_path / f".checkpoint.pt.{dead}.tmp", tmp_path / f".{CHECKPOINT_FILE}.tmp-{dead}-ab12cd34",
             tmp_path / ".metrics.json.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    folders = [tmp_path / ".adapter.tmp-k2j4_x9q", tmp_path / f".adapter.tmp-{dead}-0011aabb", tmp_path / ".model.tmp"]
    for folder in folders:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    live = tmp_path / f".{CHECKPOINT_FILE}.tmp-{os.getppid()}-ffff0000"  # a running process's file: kept
    live.write_bytes(b"writing")
    kept = [tmp_path / "notes.tmp", tmp_path / "adapter", tmp_path / ".other.tmp-1-2", tmp_path / CHECKPOINT_FILE]
    kept[0].write_text("mine")
    kept[1].mkdir()
    kept[2].write_text("not ours")
    kept[3].write_text("the checkpoint")
    outside = tmp_path.parent / f".checkpoint.pt.{dead}.tmp"  # only the run's own folder is cleaned
    outside.write_bytes(b"x")
    try:
        removed = clean_stale_temp_files(tmp_path)
        assert sorted(removed) == sorted(stale + folders)
        assert not any(p.exists() for p in stale + folders)
        assert live.exists() and all(p.exists() for p in kept) and outside.exists()
    finally:
        outside.unlink()
