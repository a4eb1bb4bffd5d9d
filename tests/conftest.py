"""Shared fixtures: tiny models for invariants, the real packaged models (loaded once per session)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

torch.set_num_threads(min(2, os.cpu_count() or 1))


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TinyNet(nn.Module):
    """Every supported layer type in one small model: Embedding -> Linear -> Conv2d -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 16)})
                                    for _ in range(2))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (batch, seq, 16)
        for layer in self.layers:
            h = torch.tanh(layer["q"](h) + layer["v"](h))
        img = h[:, :4, :].reshape(h.shape[0], 1, 8, 8)  # (batch, 1, 8, 8) when seq >= 4
        img = self.depthwise(self.pointwise(torch.relu(self.conv(img))))
        return self.head(h.mean(1)) + img.mean((1, 2, 3)).unsqueeze(1)


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))


def randomize_lora(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA tensor (A, B, magnitudes excepted) random values so the update is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name or "lora_embedding" in name):
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="session")
def minilm_session():
    from lorakit.models import load_model

    return load_model("minilm")


@pytest.fixture
def minilm(minilm_session):
    """A fresh copy of the real MiniLM encoder (BertModel) and its tokenizer."""
    return copy.deepcopy(minilm_session.model).eval(), minilm_session.tokenizer


@pytest.fixture(scope="session")
def smollm2_session():
    from lorakit.models import load_model

    return load_model("smollm2", task="causal-lm")


@pytest.fixture
def smollm2(smollm2_session):
    """A fresh copy of the real SmolLM2-135M-Instruct causal LM and its tokenizer."""
    return copy.deepcopy(smollm2_session.model).eval(), smollm2_session.tokenizer


def train_steps(model: nn.Module, tokenizer, rows: list[dict], steps: int = 2, max_length: int = 96,
                **encode_kwargs) -> list[float]:
    """A few LoRA steps (q_proj, v_proj) on ``rows``; returns the losses. The model is changed in place."""
    from lorakit import LoraConfig, inject
    from lorakit.evaluate import encode, forward, loss_sum

    inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    batch = encode("causal-lm", rows, tokenizer, max_length, None, **encode_kwargs)
    model.train()
    losses = []
    for _ in range(steps):
        total, count = loss_sum("causal-lm", forward(model, "causal-lm", batch), batch["labels"])
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total.detach() / count))
    model.eval()
    return losses
