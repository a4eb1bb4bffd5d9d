"""Every layer type x LoRA option against the real `peft` package, both ways: peft's adapter loaded by lorakit and
lorakit's by peft give the same outputs, merges, unmerges and file tensors (<= 1e-5)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterStateError

from conftest import Holder, randomize_lora

TOL = 1e-5


def _hf_conv1d() -> nn.Module:
    layer = Conv1D(12, 10)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


#: layer -> (constructor, input, rank used). Ranks above a layer's smaller side are in the table on purpose.
LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), lambda g: torch.randn(3, 5, 10, generator=g), 4),
    "linear_no_bias": (lambda: nn.Linear(10, 12, bias=False), lambda g: torch.randn(3, 5, 10, generator=g), 4),
    "linear_2_outputs_r8": (lambda: nn.Linear(10, 2), lambda g: torch.randn(3, 10, generator=g), 8),
    "hf_conv1d": (_hf_conv1d, lambda g: torch.randn(3, 5, 10, generator=g), 4),
    "embedding": (lambda: nn.Embedding(30, 12), lambda g: torch.randint(0, 30, (3, 5), generator=g), 4),
    "embedding_r16": (lambda: nn.Embedding(30, 6), lambda g: torch.randint(0, 30, (3, 5), generator=g), 16),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), lambda g: torch.randn(2, 3, 9, generator=g), 4),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda g: torch.randn(2, 3, 9, 9, generator=g), 4),
    "conv2d_1x1_r8": (lambda: nn.Conv2d(6, 4, 1), lambda g: torch.randn(2, 6, 5, 5, generator=g), 8),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1), lambda g: torch.randn(2, 2, 5, 5, 5, generator=g), 4),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda g: torch.randn(2, 4, 7, 7, generator=g), 4),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
                         lambda g: torch.randn(2, 4, 6, 6, generator=g), 4),
}
OPTIONS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
}
GROUPED = {"conv2d_grouped", "conv2d_depthwise"}


def _supported(layer: str, option: str) -> bool:
    """Where peft has the option: no lora_bias on embeddings; DoRA's norm is meaningless on grouped convs (lorakit
    refuses it there)."""
    if option == "lora_bias" and layer.startswith("embedding"):
        return False
    return not (option == "dora" and layer in GROUPED)


CASES = [(layer, option) for layer in LAYERS for option in OPTIONS if _supported(layer, option)]


def _setup(layer: str, option: str):
    torch.manual_seed(0)
    make, inputs, r = LAYERS[layer]
    base = Holder(make()).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    x = inputs(torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=r, lora_alpha=6, target_modules=["layer"], **OPTIONS[option])
    return base, x, config


def _perturb(model: nn.Module, seed: int) -> None:
    """Random LoRA tensors (B's bias included) and magnitudes away from their initial norms."""
    randomize_lora(model, seed=seed, std=0.2)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("layer,option", CASES)
def test_peft_adapter_in_lorakit(layer: str, option: str, tmp_path) -> None:
    """peft trains (random tensors), saves; lorakit loads: same outputs, same merge, same unmerge, same file."""
    base, x, config = _setup(layer, option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.get_peft_model(copy.deepcopy(base), config)
    _perturb(in_peft, seed=5)
    in_peft.eval()
    with torch.no_grad():
        expected = in_peft(x)
    in_peft.save_pretrained(tmp_path / "p")
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks above the layer's size warn
        lorakit.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= TOL
    lorakit.save_adapter(model, tmp_path / "l")
    theirs, ours = load_file(tmp_path / "p" / "adapter_model.safetensors"), \
        load_file(tmp_path / "l" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    assert all(theirs[k].shape == ours[k].shape and _max_diff(theirs[k], ours[k]) == 0 for k in theirs)
    if layer in GROUPED:  # peft refuses too: the update spans every input channel
        with pytest.raises(AdapterStateError, match="grouped convolution"):
            lorakit.merge(model)
        with pytest.raises(NotImplementedError):
            in_peft.merge_adapter()
        return
    if option == "lora_bias" and layer == "linear_no_bias":
        with pytest.raises(AdapterStateError, match="no bias to fold it into"):
            lorakit.merge(model)
        return
    with torch.no_grad():
        lorakit.merge(model)
        in_peft.merge_adapter()
        assert _max_diff(model(x), in_peft(x)) <= TOL and _max_diff(model(x), expected) <= TOL
        for key, value in in_peft.base_model.model.layer.base_layer.state_dict().items():
            assert _max_diff(model.layer.base_layer.state_dict()[key], value) <= TOL, key
        lorakit.unmerge(model)
        in_peft.unmerge_adapter()
        assert _max_diff(model(x), expected) <= TOL
        for key, value in base.layer.state_dict().items():
            assert _max_diff(model.layer.base_layer.state_dict()[key], value) <= TOL, key


@pytest.mark.parametrize("layer,option", CASES)
def test_lorakit_adapter_in_peft(layer: str, option: str, tmp_path) -> None:
    """lorakit injects (random tensors), saves; peft loads: same outputs and, where merging exists, same merge."""
    base, x, config = _setup(layer, option)
    model = copy.deepcopy(base)
    ours = lorakit.LoraConfig.from_peft_dict({**config.to_dict(), "peft_type": "LORA"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(model, ours)
    _perturb(model, seed=7)
    with torch.no_grad():
        expected = model(x)
    lorakit.save_adapter(model, tmp_path / "l")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "l").eval()
    vllm = lorakit.export_adapter(tmp_path / "l", "vllm")  # vLLM serves plain LoRA on linear layers only
    assert vllm.ok == (layer in ("linear", "linear_no_bias", "linear_2_outputs_r8", "hf_conv1d")
                       and option in ("plain", "rslora")), vllm.reasons
    with torch.no_grad():
        assert _max_diff(in_peft(x), expected) <= TOL
        if layer in GROUPED or (option == "lora_bias" and layer == "linear_no_bias"):
            return
        lorakit.merge(model)
        in_peft.merge_adapter()
        assert _max_diff(model(x), in_peft(x)) <= TOL


# -- LoRA on parameters (target_parameters): fused mixture-of-experts weights ---------------------------------
class Experts(nn.Module):
    """Every expert's projections in one 3-D parameter each, indexed per token (as HF MoE blocks do)."""

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, dim, 2 * hidden) * 0.3)  # (E, in, out)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, dim) * 0.3)

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:  # x (tokens, dim), expert (tokens,)
        gate, up = torch.bmm(x.unsqueeze(1), self.gate_up_proj[expert]).squeeze(1).chunk(2, -1)
        return torch.bmm((gate * torch.sigmoid(up)).unsqueeze(1), self.down_proj[expert]).squeeze(1)


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.randn(4, 6) * 0.3)  # a 2-D parameter target (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.T


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(6, 3)
        self.experts = Experts()
        self.out = Projection()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.experts(x, self.router(x).argmax(-1)))


MOE_TARGETS = ["experts.gate_up_proj", "experts.down_proj", "out.proj"]


def _moe() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyMoE().eval(), torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def test_fused_expert_parameters_trained_in_lorakit_load_in_peft(tmp_path) -> None:
    base, x = _moe()
    config = lorakit.LoraConfig(r=2, alpha=4, target_parameters=MOE_TARGETS)
    report = lorakit.targeting_report(base, config)
    assert [(row.name, row.shape, row.parameter) for row in report.rows] == [
        ("experts.gate_up_proj", (3, 6, 10), True), ("experts.down_proj", (3, 5, 6), True), ("out.proj", (4, 6), True)]
    assert report.added_params == 2 * 3 * 16 + 2 * 3 * 11 + 2 * 10 and "experts.down_proj" in str(report)
    model = copy.deepcopy(base)
    lorakit.inject(model, config)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["experts.base_layer.lora_A.default.weight", "experts.base_layer.lora_B.default.weight",
                         "experts.lora_A.default.weight", "experts.lora_B.default.weight",
                         "out.lora_A.default.weight", "out.lora_B.default.weight"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):  # train through the experts' own forward
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        expected = model(x)
        assert _max_diff(expected, base(x)) > 1e-3
    lorakit.save_adapter(model, tmp_path / "moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "moe").eval()
    with torch.no_grad():
        assert _max_diff(in_peft(x), expected) <= TOL
        lorakit.merge(model)
        in_peft.merge_adapter()
        assert _max_diff(model(x), expected) <= TOL and _max_diff(in_peft(x), expected) <= TOL
        assert _max_diff(model.experts.base_layer.base_layer.gate_up_proj,
                         in_peft.base_model.model.experts.base_layer.base_layer.gate_up_proj) <= TOL
        lorakit.unmerge(model)
        assert _max_diff(model.experts.base_layer.base_layer.down_proj, base.experts.down_proj) <= 1e-6
    again = copy.deepcopy(base)  # lorakit's own round trip, fingerprint checked
    lorakit.load_adapter(again, tmp_path / "moe")
    with torch.no_grad():
        assert _max_diff(again(x), expected) <= TOL
    lorakit.unload(again, merge=False)
    assert type(again.experts) is Experts and type(again.out) is Projection


def test_fused_expert_parameters_from_peft_load_in_lorakit(tmp_path) -> None:
    base, x = _moe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, lora_alpha=3, target_modules=[], target_parameters=MOE_TARGETS, use_rslora=True))
    randomize_lora(in_peft, seed=4, std=0.3)
    in_peft.eval()
    with torch.no_grad():
        expected = in_peft(x)
    in_peft.save_pretrained(tmp_path / "p")
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        assert _max_diff(model(x), expected) <= TOL and _max_diff(expected, base(x)) > 1e-3
    lorakit.save_adapter(model, tmp_path / "l")
    theirs, ours = load_file(tmp_path / "p" / "adapter_model.safetensors"), \
        load_file(tmp_path / "l" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with pytest.raises(AdapterStateError, match="not supported for LoRA on parameters"):
        with lorakit.route(model, ["default"] * 16):
            model(x)
    report = lorakit.export_adapter(tmp_path / "l", "vllm")
    assert not report.ok and any("target_parameters" in r for r in report.reasons)
    lorakit.delete_adapter(model, "default")
    assert type(model.experts) is Experts


def test_parameter_targets_refuse_what_peft_refuses() -> None:
    base, _ = _moe()
    with pytest.raises(lorakit.ConfigError, match="no dropout"):
        lorakit.LoraConfig(target_parameters=MOE_TARGETS, dropout=0.1)
    with pytest.raises(lorakit.TargetError, match="'experts.up' matches no parameter.*experts.gate_up_proj"):
        lorakit.targeting_report(base, lorakit.LoraConfig(target_parameters=["experts.up"]))
    with pytest.raises(lorakit.ConfigError, match="choose one"):
        lorakit.targeting_report(base, lorakit.LoraConfig(target_modules=["router"],
                                                          target_parameters=["router.weight"]))


# -- nn.MultiheadAttention ----------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def _attention_reference(base: nn.Module, delta_in: torch.Tensor, delta_out: torch.Tensor) -> nn.Module:
    """The attention model with ``W + ΔW`` written into both weights by hand (LoRA's definition)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.attn.in_proj_weight += delta_in
        model.attn.out_proj.weight += delta_out
    return model


def _lora_deltas(attn) -> tuple[torch.Tensor, torch.Tensor]:
    out = attn.base_layer.out_proj
    return attn.delta_weight("default"), out.delta_weight("default")


def test_multihead_attention_both_ways_with_peft(tmp_path) -> None:
    """lorakit's file and peft's are the same tensors both ways and the in-projection update matches peft's to
    1e-5. peft 0.21.2 adds the out_proj update twice in its forward and merge (peft PR #3774, open): lorakit
    computes ``W + s B A`` there, checked against the weights written by hand."""
    torch.manual_seed(0)
    base, x = TinyAttention().eval(), torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    config = lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn"])
    report = lorakit.targeting_report(base, config)
    assert [(row.name, row.layer_type, row.added_params) for row in report.rows] == [
        ("attn", "MultiheadAttention", 6 * 2 * 8)]
    model = copy.deepcopy(base)
    lorakit.inject(model, config)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "attn.base_layer.out_proj.lora_A.default.weight", "attn.base_layer.out_proj.lora_B.default.weight",
        "attn.lora_A.default.weight", "attn.lora_B.default.weight"]
    model.train()
    model(x).sum().backward()  # both updates are trained (B's gradient is non-zero with B = 0)
    assert model.attn.lora_B["default"].weight.grad.abs().sum() > 0
    assert model.attn.base_layer.out_proj.lora_B["default"].weight.grad.abs().sum() > 0
    model.eval()
    _perturb(model, seed=7)
    with torch.no_grad():
        expected = model(x)
        reference = _attention_reference(base, *_lora_deltas(model.attn))(x)
        assert _max_diff(expected, reference) <= TOL and _max_diff(expected, base(x)) > 1e-2
    lorakit.save_adapter(model, tmp_path / "l")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "l").eval()
        in_peft.save_pretrained(tmp_path / "p")
    theirs, ours = load_file(tmp_path / "p" / "adapter_model.safetensors"), \
        load_file(tmp_path / "l" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with torch.no_grad():
        peft_out = in_peft.base_model.model.attn.base_layer.out_proj
        doubled = _attention_reference(base, model.attn.delta_weight("default"),
                                       2 * model.attn.base_layer.out_proj.delta_weight("default"))(x)
        assert _max_diff(in_peft(x), doubled) <= TOL  # peft's out_proj twice (delete when peft #3774 is released)
        peft_out.lora_B["default"].weight.zero_()  # in-projection alone: the same in both
        model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
        assert _max_diff(in_peft(x), model(x)) <= TOL
    loaded = copy.deepcopy(base)  # peft's folder into lorakit, then merge / unmerge / unload
    lorakit.load_adapter(loaded, tmp_path / "p")
    with torch.no_grad():
        want = _attention_reference(base, *_lora_deltas(loaded.attn))(x)
        assert _max_diff(loaded(x), want) <= TOL
        lorakit.merge(loaded)
        assert _max_diff(loaded(x), want) <= TOL
        lorakit.unmerge(loaded)
        assert _max_diff(loaded.attn.base_layer.in_proj_weight, base.attn.in_proj_weight) <= 1e-6
    with pytest.raises(AdapterStateError, match="not supported for LoRA on parameters"):
        with lorakit.route(loaded, ["default", None]):
            loaded(x)
    report = lorakit.export_adapter(tmp_path / "l", "vllm")
    assert not report.ok and any("nn.MultiheadAttention" in r for r in report.reasons)
    lorakit.unload(loaded, merge=False)
    assert type(loaded.attn) is nn.MultiheadAttention and type(loaded.attn.out_proj) is not type(model.attn)


def test_multihead_attention_out_proj_alone_is_skipped_and_dropout_refused() -> None:
    base = TinyAttention()
    report = lorakit.targeting_report(base, lorakit.LoraConfig(target_modules="all-linear"))
    assert [row.name for row in report.targeted] == ["head"]  # out_proj is read, never called, by attn
    with pytest.raises(lorakit.TargetError, match="reads its weight without calling it"):
        lorakit.targeting_report(base, lorakit.LoraConfig(target_modules=["out_proj"]))
    with pytest.raises(lorakit.ConfigError, match="dropout is not supported on MultiheadAttention"):
        lorakit.inject(base, lorakit.LoraConfig(target_modules=["attn"], dropout=0.1))
    assert type(base.attn) is nn.MultiheadAttention


def test_inspect_reads_every_new_layer_type() -> None:
    """`lorakit inspect`'s analysis sees each update as a matrix beside its weight: experts stacked, a grouped
    kernel expanded to every input channel, the attention's two projections as two layers."""
    from lorakit.analyze import inspect_model

    grouped = Holder(nn.Conv2d(4, 6, 3, groups=2))
    moe, _ = _moe()
    attention = TinyAttention()
    for model, config, names in [
            (grouped, lorakit.LoraConfig(r=2, target_modules=["layer"]), ["layer"]),
            (moe, lorakit.LoraConfig(r=2, target_parameters=MOE_TARGETS), ["experts", "experts.base_layer", "out"]),
            (attention, lorakit.LoraConfig(r=2, target_modules=["attn"]), ["attn", "attn.base_layer.out_proj"])]:
        lorakit.inject(model, config)
        randomize_lora(model)
        layers = inspect_model(model).layers
        assert [layer.name for layer in layers] == names
        assert all(0 < layer.relative_norm < 1 and layer.energy_rank >= 1 for layer in layers)
