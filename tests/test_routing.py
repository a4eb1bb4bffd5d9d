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


def test_pickers_select_the_batchs_adapters_from_per_adapter_lists() -> None:
    routing = Routing.for_rows(["c", None, "a", "c"], "cpu")
    used, pick_ab, pick = routing.pickers(["a", "b", "c"])
    assert used == ["c", "a"]  # in the routing's order
    assert pick_ab(["A_a", "A_b", "A_c", "B_a", "B_b", "B_c"]) == ("A_c", "A_a", "B_c", "B_a")
    assert pick([1, 2, 3]) == (3, 1)
    whole = Routing.for_rows(["a", "b"], "cpu").pickers(["a", "b"])
    assert whole[0] == ["a", "b"] and whole[1]([1, 2, 3, 4]) == [1, 2, 3, 4]
    one = Routing.for_rows(["b"], "cpu").pickers(["a", "b"])
    assert one[1](["A_a", "A_b", "B_a", "B_b"]) == ("A_b", "B_b") and one[2]([1, 2]) == (2,)


def test_inference_stacks_follow_every_kind_of_adapter_change(tiny, tiny_ids) -> None:
    """Without autograd the layers reuse stacked adapters, checking only the batch's adapters each forward; every
    way of changing an adapter is seen the next time a batch uses it."""
    inject(tiny, LoraConfig(r=4, target_modules=["q", "v"]), "a")
    for name in ("b", "c"):
        lorakit.add_adapter(tiny, name, LoraConfig(r=4, alpha=8, target_modules=["q", "v"]))
    randomize_lora(tiny)
    q = tiny.layers[0]["q"]

    def check(rows: list[str | None]) -> torch.Tensor:
        with torch.no_grad():
            with lorakit.route(tiny, rows):
                mixed = tiny(tiny_ids)
            for i, name in enumerate(rows):
                lorakit.set_adapter(tiny, name)
                torch.testing.assert_close(mixed[i:i + 1], tiny(tiny_ids[i:i + 1]), atol=1e-6, rtol=1e-5)
        return mixed

    before = check(["a", "b", "a", "b"])
    changes = [
        lambda: q.lora_B["c"].weight.add_(0.5),  # in place, on an adapter outside the last batch
        lambda: q.lora_B["c"]._parameters.__setitem__("weight", nn.Parameter(q.lora_B["c"].weight + 0.2)),
        lambda: q.lora_A.__setitem__("c", nn.Linear(16, 4, bias=False)),  # a new module, new weights
        lambda: q.scaling.__setitem__("c", 3.0),
        lambda: setattr(q.lora_B["c"], "bias", nn.Parameter(torch.full((16,), 0.7))),  # generic path from now on
    ]
    for change in changes:
        check(["a", "b", "a", "b"])  # stacks built and checked without "c"
        seen = check(["c", "b", "a", "c"])
        with torch.no_grad():
            change()
        assert not torch.allclose(check(["c", "b", "a", "c"])[0], seen[0])
    # written around autograd's version counter: seen after the eval() that follows such a write in training
    check(["a", "b", "a", "b"])
    with torch.no_grad():
        q.lora_B["a"].weight.data.copy_(q.lora_B["a"].weight * 3 + 0.1)
    tiny.eval()
    assert not torch.allclose(check(["a", "b", "a", "b"]), before)
