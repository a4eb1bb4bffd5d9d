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

from conftest import randomize_lora

TOL = 1e-5


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


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
    with torch.no_grad():
        assert _max_diff(in_peft(x), expected) <= TOL
        if layer in GROUPED or (option == "lora_bias" and layer == "linear_no_bias"):
            return
        lorakit.merge(model)
        in_peft.merge_adapter()
        assert _max_diff(model(x), in_peft(x)) <= TOL
