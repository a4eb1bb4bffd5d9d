"""`lorakit.evidence.recommend`: the rank and learning-rate rules, the race's arms, and `sweep` -> `inspect` ->
`recommend` (with its check and with --race) end to end on tiny slices of the real data; reproducibility."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from evidence_helpers import TINY, check_report
from lorakit import ConfigError
from lorakit.cli import main as cli_main
from lorakit.evidence import next_power_of_two, race_arms, recommend, suggest_lr, suggest_rank
from lorakit.evidence.ranks import FixedScale, recipe_from
from lorakit.evidence.recommend import BaseProbe, lr_range_test
from lorakit.recipes import load_recipe


def test_suggestion_rules() -> None:
    assert [next_power_of_two(x) for x in (0.5, 1, 3, 8, 9)] == [1, 1, 4, 8, 16]
    assert suggest_rank([1, 2, 5, 7, 100]) == 8  # median 5 -> 8
    assert suggest_rank([300, 300], max_rank=64) == 64
    lrs = [1e-4 * 2 ** k for k in range(10)]
    losses = [1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.7, 1.5, 4.0]
    lr, smoothed = suggest_lr(lrs, losses)
    best = lrs[smoothed.index(min(smoothed))]
    assert lr == pytest.approx(best / 3) and len(smoothed) == len(losses)


def test_sweep_inspect_and_recommend(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "sweep"
    # the real CLI: every run in its own process
    assert cli_main(["sweep", "sentiment-minilm", *TINY, "--ranks", "1,4", "-o", str(sweep_dir)]) == 0
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert [row["r"] for row in result["rows"]] == [1, 4]
    assert result["rows"][0]["trainable_params"] < result["rows"][1]["trainable_params"]
    assert len(result["claims"]) == 2
    check_report(sweep_dir, figures=1)

    out = tmp_path / "inspect"
    assert cli_main(["inspect", str(sweep_dir / "r4-lr0.002"), "--against", str(sweep_dir / "r1-lr0.002"),
                     "-o", str(out)]) == 0
    inspected = json.loads((out / "inspect.json").read_text())
    assert len(inspected["layers"]) == 25 and {x["r"] for x in inspected["layers"]} == {4}
    assert all(s["r_a"] == 4 and s["r_b"] == 1 and 0 <= s["full"] <= 1 + 1e-9 for s in inspected["similarity"])
    check_report(out, figures=4)
    assert "subspace similarity" in capsys.readouterr().out

    rec = tmp_path / "recommend"  # the API, its check run in this process (one process start less)
    recommend("sentiment-minilm", TINY, rec, grad_batches=2, lr_steps=4, sweep_dir=sweep_dir, isolate=False,
              log=lambda line: None)
    suggestion = json.loads((rec / "recommend.json").read_text())
    assert suggestion["rank"] in (1, 2, 4, 8, 16, 32, 64) and 1e-5 / 3 <= suggestion["lr"] <= 1e-1
    assert len(suggestion["layers"]) == 25 and len(suggestion["lr_range"]["lrs"]) <= 4
    check = suggestion["check"]
    assert check["verdict"] in ("holds", "does not hold") and check["cost_fraction"] > 0
    check_report(rec, figures=2)

    raced = tmp_path / "race"  # --race: both arms train a whole epoch (validation) and the better is suggested
    one_epoch = [o for o in TINY if not o.startswith("train.max_steps")]
    with pytest.raises(ConfigError, match="validated nothing"):  # a sweep of 2 steps never reaches validation
        recommend("sentiment-minilm", TINY, raced, grad_batches=2, lr_steps=4, max_rank=8, sweep_dir=sweep_dir,
                  isolate=False, race=True, log=lambda line: None)
    recommend("sentiment-minilm", one_epoch, raced, grad_batches=2, lr_steps=4, max_rank=8, isolate=False,
              race=True, log=lambda line: None)
    suggestion = json.loads((raced / "recommend.json").read_text())
    arms = suggestion["race"]
    assert [(a["rank"], a["lr"]) for a in arms] == race_arms(suggestion["spectrum_suggestion"]["rank"],
                                                             suggestion["spectrum_suggestion"]["lr"], 8)
    chosen = next(a for a in arms if a["rank"] == suggestion["rank"])
    assert all(chosen["validation"] >= a["validation"] for a in arms)  # accuracy: higher is better
    assert suggestion["cpu_time_s"] >= sum(a["cpu_time_s"] for a in arms) and "check" not in suggestion
    check_report(raced, figures=2)


def test_recommend_is_reproducible(tmp_path: Path) -> None:
    """Same recipe and seed, same suggestion and the same range-test losses (the probes run the base model in
    train mode: its dropout must be seeded)."""
    runs = [recommend("sentiment-minilm", TINY, tmp_path / str(k), grad_batches=3, lr_steps=5, isolate=False,
                      log=lambda line: None) for k in range(2)]
    assert runs[0]["lr_range"]["losses"] == runs[1]["lr_range"]["losses"]
    assert [x["energy_rank"] for x in runs[0]["layers"]] == [x["energy_rank"] for x in runs[1]["layers"]]
    assert (runs[0]["rank"], runs[0]["lr"]) == (runs[1]["rank"], runs[1]["lr"])


def test_recommend_refuses_a_quantized_base_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quantize=int8.*fix: run recommend with quantize=null"):
        recommend("sentiment-minilm", [*TINY, "quantize=int8"], tmp_path, log=lambda line: None)
    assert not any(tmp_path.iterdir())


def test_range_test_takes_training_steps_and_keeps_frozen_norm_statistics() -> None:
    """The range test is `lorakit.train.train_step` on the recipe's setup: MobileNet's frozen BatchNorms keep the
    base's running statistics, as in training (a plain ``model.train()`` loop moved them)."""
    recipe = load_recipe("vision-mobilenet-mnist", ["train.max_train_examples=64", "train.batch_size=4",
                                                    "train.grad_accum=2", "train.num_threads=1", "image_size=32",
                                                    "lora.target_modules=[features.18.0]"])
    probe = BaseProbe.load(recipe)
    before = {n: b.clone() for n, b in probe.model.named_buffers() if n.endswith("running_mean")}
    lrs, losses = lr_range_test(probe, recipe_from(recipe, 4, FixedScale.of(recipe), {}), 3, 1e-4, 1e-2, 0)
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2]) and all(math.isfinite(x) for x in losses)
    after = dict(probe.model.named_buffers())
    assert len(before) == 52 and all(torch.equal(after[n], v) for n, v in before.items())


@pytest.mark.parametrize("kwargs, message", [
    ({"sweep_dir": "no-such-sweep"}, "no sweep.json there"),
    ({"energy": 1.5}, "in \\(0, 1\\]"),
    ({"lr_steps": 1}, "--lr-steps >= 2"),
])
def test_recommend_checks_its_settings_before_loading(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # before: a FileNotFoundError after both probes, for the sweep
        recommend("sentiment-minilm", TINY, tmp_path / "out", log=lambda line: None, **kwargs)
    assert not any(tmp_path.iterdir())


def test_gradient_ranks_reads_attention_and_parameter_targets() -> None:
    """The rank probe reads every targeted weight: nn.MultiheadAttention's in-projection and out_proj, a
    ``target_parameters`` expert tensor (one matrix per expert), a Linear; it used to read ``.weight`` only and
    failed on the first two. Modes, ``requires_grad`` and weights are left as they were."""
    from types import SimpleNamespace

    from lorakit import LoraConfig
    from lorakit.evidence.recommend import gradient_ranks

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 8) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bsi,eio->bso", x, self.w)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.experts = Experts()
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.experts(self.attn(x, x, x)[0]))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 5, 8)
    config = LoraConfig(r=2, target_modules=["attn", "head"], target_parameters=["experts.w"])
    probe = SimpleNamespace(model=model, recipe=SimpleNamespace(lora_config=lambda base: config),
                            loaded=SimpleNamespace(path=None, name="net"),
                            loss=lambda k: model(x[k:k + 2]).square().mean())
    before = {n: p.clone() for n, p in model.named_parameters()}
    layers = {row["name"]: row for row in gradient_ranks(probe, batches=2, energy=0.9)}
    assert set(layers) == {"attn.in_proj_weight", "attn.out_proj.weight", "experts.w", "head"}
    assert layers["experts.w"]["shape"] == [3, 8, 8] and all(1 <= row["energy_rank"] <= 8 for row in layers.values())
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
