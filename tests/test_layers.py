"""Invariants of every LoRA wrapper, over a small list of layer types x options (PEFT's TEST_CASES idea)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, inject
from lorakit.layers import LoraConv1D, LoraLayer, LoraLinear, wrapper_for

from conftest import Holder, randomize_lora


def _conv1d() -> nn.Module:
    layer = Conv1D(12, 10)  # nf=12 outputs, nx=10 inputs; weight (10, 12)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), lambda g: torch.randn(3, 5, 10, generator=g)),
    "hf_conv1d": (_conv1d, lambda g: torch.randn(3, 5, 10, generator=g)),
    "embedding": (lambda: nn.Embedding(30, 12), lambda g: torch.randint(0, 30, (3, 5), generator=g)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), lambda g: torch.randn(2, 3, 9, generator=g)),
    "conv2d_3x3": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda g: torch.randn(2, 3, 9, 9, generator=g)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 4, 1), lambda g: torch.randn(2, 6, 5, 5, generator=g)),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda g: torch.randn(2, 4, 7, 7, generator=g)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), lambda g: torch.randn(2, 2, 5, 5, 5, generator=g)),
}
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "dropout": {"dropout": 0.2},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "lora_bias": {"lora_bias": True},
}


def _supported(layer: str, option: str) -> bool:
    if option == "pissa":
        return layer in ("linear", "hf_conv1d")
    if option == "lora_bias":
        return layer != "embedding"
    return not (option == "dora" and layer == "conv2d_grouped")


TEST_CASES = [(layer, option) for layer in LAYERS for option in OPTIONS if _supported(layer, option)]


def _build(layer: str, option: str, seed: int = 0):
    torch.manual_seed(seed)
    make, inputs = LAYERS[layer]
    model = Holder(make()).eval()
    x = inputs(torch.Generator().manual_seed(seed + 1))
    config = LoraConfig(r=2, alpha=4, target_modules=["layer"], **OPTIONS[option])
    return model, x, config


@pytest.mark.parametrize("layer,option", TEST_CASES)
def test_fresh_adapter_gives_base_output_exactly(layer: str, option: str) -> None:
    model, x, config = _build(layer, option)
    expected = model(x)
    inject(model, config)
    if option == "pissa":  # the base weight became the residual: W_res + s B A == W up to rounding
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("layer,option", TEST_CASES)
def test_inference_paths_equal_autograd_path_with_two_adapters(layer: str, option: str) -> None:
    """Without autograd the additions go into the output in place (one fused addmm for Linear-like layers);
    with two active adapters, a transposed (non-contiguous) input, no_grad and inference_mode must give the
    autograd forward's output, and the sum must be base + each adapter's own update."""
    model, x, config = _build(layer, option)
    if option == "dropout":
        config = LoraConfig(r=2, alpha=4, target_modules=["layer"])
    inject(model, config)
    lorakit.add_adapter(model, "b", LoraConfig(r=4, alpha=3, target_modules=["layer"]))
    randomize_lora(model, std=0.3)
    if layer == "linear":  # (transformers' Conv1D itself refuses non-contiguous inputs)
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    lorakit.set_adapter(model, ["default", "b"])
    with_grad = model(x)
    with torch.no_grad():
        no_grad = model(x)
    with torch.inference_mode():
        inference = model(x)
    torch.testing.assert_close(no_grad, with_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inference, with_grad, atol=1e-6, rtol=1e-6)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(x)
    parts = []
    for name in ("default", "b"):
        lorakit.set_adapter(model, name)
        with torch.no_grad():
            parts.append(model(x) - base)
    torch.testing.assert_close(no_grad, base + parts[0] + parts[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer,option", TEST_CASES)
def test_merge_equals_unmerged_and_unmerge_restores(layer: str, option: str) -> None:
    model, x, config = _build(layer, option)
    inject(model, config)
    randomize_lora(model, std=0.3)
    weight_before = model.layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    if layer == "conv2d_grouped":  # refused, nothing changed (as peft)
        with pytest.raises(lorakit.AdapterStateError, match="grouped convolution"):
            lorakit.merge(model)
        assert not model.layer.merged and torch.equal(model.layer.base_layer.weight, weight_before)
        return
    lorakit.merge(model)
    assert model.layer.merged
    assert (model(x) - unmerged).abs().max() <= 1e-5
    assert not torch.equal(model.layer.base_layer.weight, weight_before)
    lorakit.unmerge(model)
    assert (model.layer.base_layer.weight - weight_before).abs().max() <= 1e-6
    assert torch.allclose(model(x), unmerged, atol=1e-6)


@pytest.mark.parametrize("layer,option", TEST_CASES)
def test_only_adapter_trains_and_a_step_changes_only_it(layer: str, option: str) -> None:
    model, x, config = _build(layer, option)
    inject(model, config)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(k in n for k in ("lora_", )) for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: with B = 0 at the start, A only moves from the second step
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name in trainable:
            assert changed or "magnitude" in name, f"{name} did not train"
        else:
            assert not changed, f"frozen {name} changed"


def test_fixed_value_regression() -> None:
    """Seeded Kaiming A and a hand-set B give these exact numbers (catches silent changes of the math)."""
    torch.manual_seed(0)
    model = Holder(nn.Linear(4, 3))
    inject(model, LoraConfig(r=2, alpha=4, target_modules=["layer"]))
    with torch.no_grad():
        model.layer.lora_B["default"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    out = model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    expected = torch.tensor([[-3.6849012, -5.7017603, 5.1364555]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_scaling_rslora_vs_plain() -> None:
    plain = LoraConfig(r=16, alpha=32, target_modules=["layer"])
    rs = plain.replace(use_rslora=True)
    assert plain.scaling(16, 32) == 2.0
    assert rs.scaling(16, 32) == 8.0


def test_conv1d_update_is_transposed_like_its_weight() -> None:
    torch.manual_seed(0)
    model = Holder(_conv1d())
    inject(model, LoraConfig(r=2, alpha=2, target_modules=["layer"]))
    assert isinstance(model.layer, LoraConv1D)
    randomize_lora(model, std=0.5)
    delta = model.layer.delta_weight("default")
    assert delta.shape == model.layer.base_layer.weight.shape == (10, 12)
    x = torch.randn(2, 10)
    torch.testing.assert_close(model(x), x @ (model.layer.base_layer.weight + delta) + model.layer.bias)


def test_registry_dispatch_and_custom_layer() -> None:
    class MyLinear(nn.Linear):
        pass

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    assert wrapper_for(MyLinear(3, 3)) is LoraLinear  # subclasses found through the MRO
    assert wrapper_for(Odd()) is None
    model = Holder(Odd())
    with pytest.raises(lorakit.TargetError, match="register_layer"):
        inject(model, LoraConfig(r=2, target_modules=["layer"]))
    try:
        lorakit.register_layer(Odd, LoraLinear)  # same weight layout as Linear, no bias
        inject(model, LoraConfig(r=2, target_modules=["layer"]))
        assert isinstance(model.layer, LoraLinear)
    finally:
        lorakit.LAYER_REGISTRY.pop(Odd)
    with pytest.raises(TypeError):
        lorakit.register_layer(Odd, nn.Linear)  # type: ignore[arg-type]


def test_depthwise_conv_is_adapted_when_rank_fits_its_groups_else_skipped_with_reason(tiny, tiny_ids) -> None:
    """PEFT adapts grouped/depthwise convolutions with B grouped like the base, which needs r % groups == 0."""
    report = lorakit.targeting_report(tiny, LoraConfig(r=2, target_modules=["conv", "pointwise", "depthwise"]))
    skipped = {row.name: row.skipped for row in report.rows if row.skipped}
    assert list(skipped) == ["depthwise"] and "multiple of groups=4" in skipped["depthwise"]
    assert "skipped" in str(report)
    inject(tiny, LoraConfig(r=4, target_modules=["conv", "pointwise", "depthwise"]))
    assert isinstance(tiny.depthwise, LoraLayer) and tiny.depthwise.lora_B["default"].groups == 4
    randomize_lora(tiny, std=0.3)
    with torch.no_grad(), lorakit.disable_adapters(tiny):
        base = tiny(tiny_ids)
    assert not torch.allclose(tiny(tiny_ids), base)
    with pytest.raises(lorakit.AdapterStateError, match="grouped convolution"):
        lorakit.merge(tiny)
    assert not tiny.conv.merged  # the refusal rolled back the layers merged before it


def test_wrapper_keeps_weight_and_bias_visible() -> None:
    model = Holder(nn.Linear(3, 2))
    weight = model.layer.weight
    inject(model, LoraConfig(r=1, target_modules=["layer"]))
    assert model.layer.weight is weight and model.layer.bias is model.layer.base_layer.bias


def test_dropout_only_in_training() -> None:
    model, x, config = _build("linear", "dropout")
    inject(model, config)
    randomize_lora(model, std=0.5)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_dora_magnitude_starts_at_weight_norm() -> None:
    model, _, config = _build("linear", "dora")
    weight = copy.deepcopy(model.layer.weight.detach())
    inject(model, config)
    torch.testing.assert_close(model.layer.lora_magnitude_vector["default"].detach(), weight.norm(dim=1))


def test_training_dropout_path_keeps_a_mask_not_a_copy(monkeypatch) -> None:
    """With dropout in training, Linear's LoRA path saves its input (shared with whatever else keeps it: the layer
    before, the other projections reading the same input) and a boolean mask, not a dropped-out fp32 copy per
    adapted layer; values and gradients equal dropout followed by the two products (same masks)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    inject(model, LoraConfig(r=3, alpha=6, target_modules=["0", "2"], dropout=0.3))
    randomize_lora(model, std=0.3)
    model.train()
    x = torch.randn(4, 5, 10, requires_grad=True)

    def run() -> tuple[torch.Tensor, dict, int]:
        model.zero_grad()
        x.grad = None
        saved: dict[int, int] = {}  # storage -> bytes: a tensor saved by two layers counts once

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return y.detach(), {**grads, "x": x.grad.clone()}, sum(saved.values())

    fused_y, fused_grads, fused_bytes = run()

    def reference(self, result, x_, name, inplace=False):  # the unfused path with the same mask draws
        p = self.lora_dropout[name].p
        keep = torch.rand(x_.shape) < 1 - p
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return result + F.linear(F.linear(x_ * keep * (1 / (1 - p)), A) * self.scaling[name], B)

    monkeypatch.setattr(LoraLinear, "add_lora_output", reference)
    ref_y, ref_grads, ref_bytes = run()
    torch.testing.assert_close(fused_y, ref_y, atol=1e-6, rtol=0)
    assert fused_grads.keys() == ref_grads.keys() and len(fused_grads) == 5  # 2 x (A, B) and the input
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-6)
    # layer 2's input is tanh's output, which autograd keeps anyway: the fused path adds only its mask, the
    # unfused one a dropped-out fp32 copy (4 x 5 x 12 floats). Layer 0's input is kept only for LoRA in both.
    assert fused_bytes <= ref_bytes - 4 * 5 * 12 * 4


def test_training_dropout_mask_keeps_one_minus_p() -> None:
    """The fused path's mask (the boolean tensor it saves for backward) keeps a fraction 1 - p of the inputs."""
    layer = LoraLinear(nn.Linear(64, 32))
    layer.add("a", r=4, alpha=8, dropout=0.3, init="default", use_rslora=False, use_dora=False)
    layer.active_adapters = ["a"]
    layer.train()
    masks: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool:
            masks.append(t)
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(500, 64, requires_grad=True))
    assert len(masks) == 1 and masks[0].shape == (500, 64)
    assert abs(masks[0].float().mean().item() - 0.7) < 0.01  # 32,000 draws: standard error 0.0026


class Conv2dSame(nn.Conv2d):
    """TF "same" padding computed from the input size inside forward (timm's ``Conv2dSame``, TF-ported models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s in ((iw, self.kernel_size[1], self.stride[1]), (ih, self.kernel_size[0], self.stride[0])):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0,
                                    self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not a plain linear map of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).tanh()


@pytest.mark.parametrize("dora", [False, True])
def test_same_padding_conv_subclass_keeps_its_own_forward(dora: bool) -> None:
    """Issue 14: a Conv2d subclass padding inside forward was wrapped as a plain Conv2d and crashed on the first
    forward (size 5 vs 4); LoRA now runs A through the subclass's forward, so it sees the same padded input."""
    torch.manual_seed(0)
    model = Holder(Conv2dSame(3, 4, 3, stride=2)).eval()
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    assert expected.shape == (2, 4, 5, 5)
    inject(model, LoraConfig(r=2, target_modules=["layer"], use_dora=dora))
    assert torch.equal(model(x), expected)  # B = 0: the base output exactly
    randomize_lora(model, std=0.3)
    unmerged = model(x)
    assert unmerged.shape == expected.shape and not torch.allclose(unmerged, expected)
    lorakit.merge(model)  # the merged kernel through the subclass's forward: W + s B A on the same padded input
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    model.train()
    model(x).sum().backward()
    assert model.layer.lora_A["default"].weight.grad is not None


def test_layer_overriding_forward_is_skipped_with_the_reason(tiny) -> None:
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4))
    report = lorakit.targeting_report(model, LoraConfig(r=2, target_modules=["0", "1"]))
    skipped = {row.name: row.skipped for row in report.rows if row.skipped}
    assert list(skipped) == ["1"] and "ScaledLinear overrides Linear.forward" in skipped["1"]
    assert "register_layer(ScaledLinear" in str(report)
    inject(model, LoraConfig(r=2, target_modules=["0", "1"]))
    assert isinstance(model[0], LoraLayer) and type(model[1]) is ScaledLinear
    lorakit.register_layer(ScaledLinear, LoraLinear)  # registered explicitly: the user vouches for it
    try:
        assert lorakit.targeting_report(nn.Sequential(ScaledLinear(4, 4)), LoraConfig(r=2, target_modules=["0"])
                                        ).rows[0].skipped is None
    finally:
        lorakit.LAYER_REGISTRY.pop(ScaledLinear)


def test_inference_on_many_tokens_folds_the_adapters_into_a_temporary_weight(monkeypatch) -> None:
    """Without autograd, with at least as many activation values as weight values, a plain Linear
    reads ``W + Σ s B A`` (built per forward, never stored) instead of adding the two skinny products; the output
    equals the unfolded path up to rounding, and every case the fold does not cover takes the unfolded path."""
    torch.manual_seed(0)
    model = Holder(nn.Linear(8, 6)).eval()
    inject(model, LoraConfig(r=2, alpha=4, target_modules=["layer"]), "a")
    for name in ("b", "c"):
        lorakit.add_adapter(model, name, LoraConfig(r=3, alpha=5, target_modules=["layer"]))
    randomize_lora(model, std=0.3)
    lorakit.merge(model, ["c"])  # already in W: not folded twice
    lorakit.set_adapter(model, ["a", "b", "c"])
    layer = model.layer
    folds = _FoldCount(monkeypatch)
    many, few = torch.randn(4, 16, 8), torch.randn(1, 2, 8)  # 64 x (8 + 6) >= 48; 2 x 14 < 48
    for x, folded in ((many, 1), (few, 0)):
        unfolded = model(x)  # autograd on: the usual path
        with torch.no_grad():
            out = model(x)
        assert folds.pop() == folded
        torch.testing.assert_close(out, unfolded, atol=1e-6, rtol=1e-6)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(many)
    with torch.no_grad():
        lorakit.set_adapter(model, "a")
        only_a = model(many)
        a_alone = layer.base_layer(many) + layer.lora_output(many, "a")
        torch.testing.assert_close(only_a, a_alone, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(only_a, base)
        assert folds.pop() == 1
        model.train()  # training mode (dropout would apply): not folded
        model(many)
        model.eval()
        assert folds.pop() == 0
        plain = layer.base_layer(many)  # W with "c" merged in
        hook = layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)  # a hook: not bypassed
        torch.testing.assert_close(model(many), 2 * plain + (a_alone - plain), atol=1e-6, rtol=1e-6)
        hook.remove()
        layer.base_layer.forward = lambda x: nn.Linear.forward(layer.base_layer, x) * 2  # as accelerate's hooks do
        torch.testing.assert_close(model(many), 2 * plain + (a_alone - plain), atol=1e-6, rtol=1e-6)
        del layer.base_layer.forward
        calls: list[nn.Module] = []  # a hook on every module (profilers, FLOP counters) must see the base layer run
        handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(module))
        model(many)
        handle.remove()
        assert layer.base_layer in calls
        assert folds.pop() == 0
    lorakit.unmerge(model)  # (mixed batches need unmerged adapters)
    unfolded, plain = model(many), model.layer.base_layer(many)  # autograd on: "a" unfolded; the base
    with torch.no_grad():
        with lorakit.route(model, ["a"] * 4):  # a routed batch on one adapter is its single-adapter batch
            torch.testing.assert_close(model(many), unfolded, atol=1e-6, rtol=1e-6)
        assert folds.pop() == 1
        with lorakit.route(model, ["a", "a", None, "a"]):  # "a" in two runs: routed as usual
            routed = model(many)
        assert folds.pop() == 0
    torch.testing.assert_close(routed[2], plain[2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(routed[[0, 1, 3]], unfolded[[0, 1, 3]], atol=1e-6, rtol=1e-6)


class _FoldCount:
    """Counts the folded weights built (`lorakit.layers.linear._fold`, patched): ``pop()`` returns how many since the
    last ``pop()``."""

    def __init__(self, monkeypatch) -> None:
        from lorakit.layers import linear

        self.built = 0
        fold = linear._fold

        def counted(weight, parts):
            self.built += 1
            return fold(weight, parts)

        monkeypatch.setattr(linear, "_fold", counted)

    def pop(self) -> int:
        built, self.built = self.built, 0
        return built


def test_mixed_batch_rows_grouped_by_adapter_fold_each_run_into_its_own_weight(monkeypatch) -> None:
    """Rows grouped by adapter (one run each), each run long enough: one folded weight per adapter run, base rows
    and an adapter the layer lacks read W alone; outputs equal each row alone with its adapter. A run too short to
    fold, an adapter in two runs or a shared adapter: the routed products serve the whole batch."""
    from lorakit.layers import linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 6)).eval()
    inject(model, LoraConfig(r=2, alpha=4, target_modules=["0"]), "a")
    lorakit.add_adapter(model, "b", LoraConfig(r=3, alpha=5, target_modules=["0"]))
    lorakit.add_adapter(model, "elsewhere", LoraConfig(r=2, alpha=2, target_modules=["1"]))
    randomize_lora(model, std=0.3)
    folds = _FoldCount(monkeypatch)
    monkeypatch.setattr(linear, "RUN_FOLD_TOKENS", 12)  # (2,048 on real layers)
    x = torch.randn(7, 6, 8)  # runs of layer 0: a (3 rows x 6 tokens: 18), base (1 row), b (12 tokens), elsewhere (1)
    names = ["a", "a", "a", None, "b", "b", "elsewhere"]
    with torch.no_grad():
        expected = []
        for row, name in zip(x, names):
            with contextlib.ExitStack() as scope:
                if name is None:
                    scope.enter_context(lorakit.disable_adapters(model))
                else:
                    lorakit.set_adapter(model, name)
                expected.append(model(row[None]))
        expected = torch.cat(expected)
        folds.pop()
        with lorakit.route(model, names):
            grouped = model(x)
        assert folds.pop() == 2  # layer 0: one weight for "a", one for "b"; layer 1: "elsewhere" on 6 tokens < 12
        torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)
        for short, rows, shared in ((x[:, :2], names, []),  # a: 6 tokens, b: 4
                                    (x, ["b"] * 3 + [None] * 4, ["a"]),  # "a" shared on every row
                                    (x, ["a", "b", "a", None, "b", "b", "a"], [])):  # interleaved
            with lorakit.route(model, rows, shared=shared):
                routed = model(short)
            assert folds.pop() == 0
            with monkeypatch.context() as patch, lorakit.route(model, rows, shared=shared):
                patch.setattr(linear, "FOLD_RATIO", float("inf"))  # the routed products alone
                torch.testing.assert_close(routed, model(short), atol=0, rtol=0)
