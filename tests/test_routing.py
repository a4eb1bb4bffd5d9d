"""Mixed-adapter batches (`lorakit.routing`): row planning, the grouped product and the per-adapter path, each
against every row computed with its own adapter alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, inject
from lorakit.routing import Routing, grouped_lora, per_adapter, stack_adapters

from conftest import randomize_lora


def test_routing_for_rows_keeps_a_host_copy_of_its_index() -> None:
    routing = Routing.for_rows(["a", None, "b", "a"], "cpu", shared=["s"])
    assert routing.names == ["a", "b"] and routing.shared == ["s"]
    assert routing.index.tolist() == [0, -1, 1, 0] and routing.index.dtype == torch.long
    routing.index = torch.zeros(4, dtype=torch.long)  # planning must use the host copy, not read the index back
    assert routing.host_index() == [0, -1, 1, 0]
    assert routing.runs() is None  # "a" rows are not contiguous
    used, members, place, keep = routing.groups_in(["a", "b"])
    assert members.tolist()[:2] == [0, 3] and keep.tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("tokens", [1, 7])  # fewer tokens per row than the rank: groups; more: per-row weights
@pytest.mark.parametrize("rows", [["a", "b", None, "a", "c"], ["a", "a", "b", "b"], ["c", None, None, "c"],
                                  ["a", "b", "c"], ["b", "c", "a", "b"]])
def test_grouped_product_equals_each_row_with_its_own_adapter(rows, tokens) -> None:
    gen = torch.Generator().manual_seed(0)
    ranks = {"a": 2, "b": 4, "c": 3}
    weights = {n: (torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen), 0.5 + r) for n, r in
               ranks.items()}
    names = list(weights)
    A_stack, B_stack = stack_adapters([weights[n] for n in names])
    assert A_stack.shape == (3, 4, 6) and B_stack.shape == (3, 5, 4)  # ranks padded to the largest
    x = torch.randn(len(rows), tokens, 6, generator=gen)
    base = torch.zeros(len(rows), tokens, 5)
    routing = Routing.for_rows(rows, "cpu")
    got = grouped_lora(x, routing, names, A_stack, B_stack, base)
    in_order = rows == names  # one row per adapter, in order: views, whatever the token count
    assert (("rows", *names) in routing._memo) == (tokens >= 4 and not in_order)  # which layout ran
    for i, name in enumerate(rows):
        want = torch.zeros(tokens, 5) if name is None else weights[name][2] * x[i] @ weights[name][0].T @ \
            weights[name][1].T
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    out = torch.ones(len(rows), tokens, 5)
    assert grouped_lora(x, Routing.for_rows(rows, "cpu"), names, A_stack, B_stack, base, out=out) is out
    torch.testing.assert_close(out, got + 1)
    with pytest.raises(ValueError, match=f"{len(rows) - 1} adapter names for a batch of"):
        grouped_lora(x, Routing.for_rows(rows[:-1], "cpu"), names, A_stack, B_stack, base)


@pytest.mark.parametrize("rows", [["a", None, "b", "a"], ["a", "a", "b", None]])
def test_per_adapter_calls_each_adapter_once_on_its_rows(rows) -> None:
    x = torch.arange(len(rows), dtype=torch.float32).reshape(-1, 1).repeat(1, 3)
    calls = []

    def part(xr: torch.Tensor, name: str, base_rows: torch.Tensor) -> torch.Tensor | None:
        calls.append((name, xr[:, 0].tolist()))
        return None if name == "b" else xr * 10

    out = per_adapter(x, Routing.for_rows(rows, "cpu"), torch.zeros_like(x), part)
    assert sorted(n for n, _ in calls) == ["a", "b"]
    for i, name in enumerate(rows):
        assert torch.equal(out[i], x[i] * 10 if name == "a" else torch.zeros(3))


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 3, 6)),
    "embedding": (lambda: nn.Embedding(11, 5), lambda: torch.randint(0, 11, (4, 3))),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(4, 3, 7)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(4, 4, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(4, 2, 3, 4, 4)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("option", ["plain", "dora", "lora_bias"])
def test_route_on_every_layer_type_equals_each_adapter_alone(layer: str, option: str) -> None:
    if option == "dora" and layer == "conv2d_grouped" or option == "lora_bias" and layer == "embedding":
        pytest.skip("refused there (as in PEFT)")
    torch.manual_seed(0)
    make, inputs = LAYERS[layer]
    model = nn.Sequential(make()).eval()
    extra = {"use_dora": option == "dora", "lora_bias": option == "lora_bias"}
    inject(model, LoraConfig(r=2, target_modules=["0"], **extra), "a")
    lorakit.add_adapter(model, "b", LoraConfig(r=4, alpha=3, target_modules=["0"], **extra))
    randomize_lora(model, std=0.3)  # (B's bias too, under lora_bias)
    x = inputs()
    rows = ["b", None, "a", "b"]
    alone = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        alone[name] = model(x)
    with lorakit.disable_adapters(model):
        alone[None] = model(x)
    with lorakit.route(model, rows):
        mixed = model(x)
        with torch.no_grad():
            mixed_no_grad = model(x)
    want = torch.stack([alone[n][i] for i, n in enumerate(rows)])
    torch.testing.assert_close(mixed, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_no_grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 6])
@pytest.mark.parametrize("rows", [["a", "b"], ["b", None, "a", "b"]])
def test_route_under_bf16_autocast_matches_each_adapter_alone(rows, tokens) -> None:
    """Under autocast the rank-r intermediate is bf16 while the stacked B is fp32: the in-place accumulation must
    cast B (the rows-in-order case raised "Bad in-place call" before, e.g. `bench.py --precision bf16`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval()
    inject(model, LoraConfig(r=4, target_modules="all-linear"), "a")
    lorakit.add_adapter(model, "b", LoraConfig(r=2, target_modules="all-linear"))
    randomize_lora(model, std=0.3)
    x = torch.randn(len(rows), tokens, 16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        with lorakit.route(model, rows):
            mixed = model(x)
        alone = []
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disable_adapters(model):
                    alone.append(model(x[i:i + 1]))
            else:
                lorakit.set_adapter(model, name)
                alone.append(model(x[i:i + 1]))
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), torch.cat(alone).float(), atol=0.05, rtol=0.02)
