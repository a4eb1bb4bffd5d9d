"""What a training run writes into its folder: as it goes, a per-step JSONL log a user can ``tail -f`` or load
into a tracker and TensorBoard event files when ``tensorboard`` is installed (optional, not a dependency); at
the end, a plot of the loss and the validation metric and the trained weights (`save_result`).

``train_log.jsonl``: one JSON object per line, flushed after each line. A step line is
``{"step", "epoch", "loss", "lr", "grad_norm", "elapsed_s"}`` (``grad_norm`` before clipping, ``elapsed_s``
since the loop started); a validation line is ``{"step", "epoch", "validation": {metric: value}}``.
A resumed run keeps the lines up to the step it resumes from and appends after them.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .files import atomic_directory, write_bytes

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "training.png"
TENSORBOARD_DIR = "tensorboard"


class TrainingLog:
    """Appends step and validation records to ``folder/train_log.jsonl`` (and TensorBoard when importable)."""

    def __init__(self, folder: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(folder) / LOG_FILE
        kept = _lines_up_to(self.path, resume_step) if resume_step is not None else []
        write_bytes(self.path, "".join(line + "\n" for line in kept).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")
        self.writer = _summary_writer(Path(folder) / TENSORBOARD_DIR) if tensorboard else None

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def step(self, step: int, epoch: int, result: Any, elapsed_s: float) -> None:
        """Record optimizer step ``step`` (a `lorakit.train.StepResult`)."""
        record = {"step": step, "epoch": epoch, "loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "elapsed_s": round(elapsed_s, 3)}
        if len(result.losses) > 1:
            record["losses"] = result.losses
        self._write(record)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", result.loss, step)
            self.writer.add_scalar("train/lr", result.lr, step)
            if result.grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", result.grad_norm, step)

    def validation(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        """Record the validation metrics measured after step ``step`` (the end of ``epoch``)."""
        self._write({"step": step, "epoch": epoch, "validation": metrics})
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and name != "examples":
                    self.writer.add_scalar(f"validation/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The log's lines of steps up to ``step`` (a resumed run drops what came after its checkpoint)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


def _summary_writer(folder: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` when ``tensorboard`` is installed, else None."""
    try:
        import tensorboard  # noqa: F401 - only to know whether torch's writer can work
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder), filename_suffix=f".{int(time.time())}")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (lines that do not parse are skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_training(history: Sequence[dict[str, Any]], path: str | Path, metric: str, title: str = "") -> Path:
    """Training loss per step (left) and the validation ``metric`` at each epoch's end (right) from a run's
    history (`lorakit.train.LoopState.history`), as a PNG at ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    steps = [(h["step"], h["loss"]) for h in history if "loss" in h and math.isfinite(h["loss"])]
    checks = [(h["step"], h["validation"][metric]) for h in history
              if "validation" in h and metric in h["validation"]]
    fig = Figure(figsize=(10, 3.8))
    loss_ax, metric_ax = fig.subplots(1, 2)
    if steps:
        loss_ax.plot(*zip(*steps), color="#1f77b4", linewidth=1, label="loss per step")
        if len(steps) >= 10:  # a moving average shows the trend under the step-to-step noise
            window = max(2, len(steps) // 10)
            values = [v for _, v in steps]
            smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                      for i in range(len(values))]
            loss_ax.plot([s for s, _ in steps], smooth, color="#d62728", linewidth=1.5,
                         label=f"mean of {window} steps")
        loss_ax.legend(fontsize=8)
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    if checks:
        metric_ax.plot(*zip(*checks), marker="o", color="#2ca02c")
    else:
        metric_ax.text(0.5, 0.5, "no validation yet\n(it runs at the end of each epoch)", ha="center",
                       va="center", transform=metric_ax.transAxes, fontsize=9)
    metric_ax.set(xlabel="optimizer step", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return write_bytes(path, buffer.getvalue())


def save_result(model: Any, tokenizer: Any, recipe: Any, out: Path, metrics: dict[str, Any], train_data: Any,
                extras: dict[str, Any]) -> int:
    """Write ``out/adapter/`` (LoRA: PEFT format with the recipe, dataset hash, steps and metrics as provenance;
    ``extras`` go to `lorakit.io.save_adapter`) or ``out/model/`` (full fine-tuning), atomically; returns its size
    in bytes."""
    if recipe.method == "lora":
        from .io import save_adapter

        target = out / "adapter"
        provenance = {"recipe": recipe.to_dict(), "dataset": recipe.data, "dataset_hash": train_data.fingerprint(),
                      "steps": metrics["steps"], "eval": metrics["eval"]}
        save_adapter(model, target, provenance=provenance, tokenizer=tokenizer, **extras)
    else:
        target = out / "model"
        with atomic_directory(target) as staging:
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(staging, safe_serialization=True)
            else:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())


__all__ = ["save_result", "LOG_FILE", "PLOT_FILE", "TENSORBOARD_DIR", "TrainingLog", "plot_training", "read_log"]
