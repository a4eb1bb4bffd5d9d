"""`lorakit.evidence.runs`: a run through the real subprocess path (the default of compare, sweep and recommend):
its record, its own log and peak, reuse without a new process, and a failing child reported with its log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evidence_helpers import TINY
from lorakit import LorakitError
from lorakit.evidence.runs import RunSpec, launch


def test_a_run_in_its_own_process_is_recorded_and_reused(tmp_path: Path) -> None:
    spec = RunSpec("sentiment-minilm", [*TINY, "method=lora", "train.progress=false"], tmp_path / "run")
    logs: list[str] = []
    record = launch(spec, logs.append)  # isolate=True: python -c "... lorakit.evidence.runs.run_child ..."
    assert any(line.startswith("  done in") for line in logs)  # only the subprocess path logs this
    saved = json.loads((spec.output / "run.json").read_text())
    assert saved == record and saved["spec"] == json.loads(json.dumps(spec.payload()))
    assert record["metrics"]["steps"] == 2 and record["cpu_time_s"] > 0
    assert record["step_time_s"] > 0 and record["train_peak_mb"] is not None  # the child's own step peak
    assert (spec.output / "run.log").is_file()
    assert (spec.output / "adapter" / "adapter_config.json").is_file()
    assert not (spec.output / "checkpoint.pt").exists()

    log_written = (spec.output / "run.log").stat().st_mtime_ns
    logs.clear()
    again = launch(spec, logs.append)
    assert again == record and logs == [f"  reusing {spec.output}"]
    assert (spec.output / "run.log").stat().st_mtime_ns == log_written  # no second process


def test_a_failing_run_reports_the_end_of_its_log(tmp_path: Path) -> None:
    spec = RunSpec("sentiment-minilm", [*TINY, "data=no-such-dataset"], tmp_path / "bad")
    with pytest.raises(LorakitError, match="failed \\(exit [1-9]") as err:
        launch(spec, lambda line: None)
    assert "no-such-dataset" in str(err.value)  # the child's own error, from run.log
    assert not (spec.output / "run.json").exists()
