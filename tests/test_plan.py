"""The memory planner against real models: parameter counts from transformers, saved activations from autograd,
peaks from a tracked training step; the `lorakit plan` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.plan import (PlanRequest, architecture_from_config, estimate_memory, layer_activation_elements,
                          parse_bytes, read_architecture, smallest_fit)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 500, "tie_word_embeddings": True,
              "max_position_embeddings": 256}
TINY_BERT = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 128, "type_vocab_size": 2,
             "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1}
TINY_OPT = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 128,
            "word_embed_proj_dim": 64, "do_layer_norm_before": True}
TINY_QWEN2 = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
              "attention_bias": True}


def _hf_model(config: dict, task: str) -> nn.Module:
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    torch.manual_seed(0)
    return auto.from_config(cfg)


@pytest.mark.parametrize("config, task", [(TINY_LLAMA, "causal-lm"), (TINY_BERT, "base"), (TINY_OPT, "causal-lm"),
                                          ({**TINY_LLAMA, "tie_word_embeddings": False}, "causal-lm")])
def test_parameter_count_equals_transformers(config: dict, task: str) -> None:
    import transformers

    with torch.device("meta"):
        model = (transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel).from_config(
            transformers.AutoConfig.for_model(**config))
    arch = architecture_from_config(config, task=task)
    assert arch.parameter_count() == sum(p.numel() for p in model.parameters())


def test_qwen2_attention_bias_counted() -> None:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY_QWEN2))
    arch = architecture_from_config(TINY_QWEN2, task="causal-lm")
    # qwen2 has q/k/v biases only, the planner counts a bias on every block linear: an overestimate, bounded
    assert 0 <= arch.parameter_count() - sum(p.numel() for p in model.parameters()) <= 2 * (64 + 64 + 160 * 3)


def _saved_bytes_per_block(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> int:
    """Bytes autograd saves inside block 1 (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where: list[str] = ["before"]
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = (t.untyped_storage().nbytes(), where[0])
        return t

    blocks[1].register_forward_pre_hook(lambda *_: where.__setitem__(0, "block"))
    blocks[1].register_forward_hook(lambda *_: where.__setitem__(0, "after"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(n for n, w in seen.values() if w == "block")


@pytest.mark.parametrize("config, targets", [
    (TINY_LLAMA, "all-linear"), (TINY_LLAMA, "q_proj,v_proj"), (TINY_LLAMA, None),
    (TINY_BERT, "query,key,value,attention.output.dense"), (TINY_BERT, None)])
def test_block_activations_match_autograd(config: dict, targets: str | None) -> None:
    """The per-token count of `layer_activation_elements` is what autograd really keeps in a block."""
    from lorakit.config import LoraConfig
    from lorakit.inject import inject
    from lorakit.plan import adapted_linears

    task = "causal-lm" if config["model_type"] == "llama" else "base"
    model = _hf_model(config, task).train()
    arch = architecture_from_config(config, task=task)
    if targets is None:
        model.requires_grad_(True)
        trained, adapted = {lin.name for lin in arch.linears}, 0
    else:
        inject(model, LoraConfig(r=4, target_modules=targets if targets == "all-linear" else targets.split(",")))
        lins = adapted_linears(arch, targets)
        trained, adapted = {lin.name for lin in lins}, sum(1 for lin in lins if lin.in_block)
    batch, seq = 2, 32
    ids = torch.randint(3, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    blocks = model.model.layers if task == "causal-lm" else model.encoder.layer
    measured = _saved_bytes_per_block(model, blocks, ids)
    low, high = layer_activation_elements(arch, trained, adapted, 4, seq, norms_train=targets is None)
    estimated = (low + high) * batch * seq * 4  # an fp32 model
    assert abs(estimated / measured - 1) < 0.08, (estimated, measured)


@pytest.mark.parametrize("method, checkpointing, dropout, dtype", [
    ("lora", False, 0.0, "fp32"), ("lora", True, 0.0, "fp32"), ("full", False, 0.0, "fp32"),
    ("lora", False, 0.1, "fp32"), ("lora", False, 0.1, "bf16")])
def test_estimate_within_15_percent_of_a_tracked_step(method: str, checkpointing: bool, dropout: float,
                                                      dtype: str) -> None:
    """Peak live-tensor bytes of real training steps (forward, backward, AdamW) vs the estimate."""
    from lorakit.config import LoraConfig
    from lorakit.evaluate import forward, loss_sum
    from lorakit.inject import inject
    from lorakit.memory import LiveTensorBytes
    from lorakit.precision import keep_trainable_fp32

    config = {**TINY_LLAMA, "vocab_size": 4000, "num_hidden_layers": 4}
    model = _hf_model(config, "causal-lm").to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    if method == "lora":
        inject(model, LoraConfig(r=8, dropout=dropout, target_modules="all-linear"))
        keep_trainable_fp32(model)
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 4000, (4, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with LiveTensorBytes([*model.parameters(), *model.buffers()]) as tracker:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            logits = forward(model, "causal-lm", batch)
            loss, count = loss_sum("causal-lm", logits, ids)
            (loss / count).backward()
            optimizer.step()
    request = PlanRequest(method=method, batch=4, seq=64, gradient_checkpointing=checkpointing, dtype=dtype, r=8,
                          device_type="cpu", lora_dropout=dropout)
    estimate = estimate_memory(architecture_from_config(config, task="causal-lm"), request).total
    assert abs(estimate / tracker.peak - 1) < 0.15, (estimate, tracker.peak)


def test_quantized_layer_keeps_no_dequantized_weight_for_backward() -> None:
    """A QLoRA base only saves memory if backward does not hold each layer's dequantized weight (it did: SmolLM2
    int8 LoRA peaked at 1,616 MiB, above the fp32 base's 1,516)."""
    from lorakit.quant import QuantizedLinear

    layer = QuantizedLinear(nn.Linear(256, 256), "int8")
    x = torch.randn(2, 256, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                  lambda t: t):
        out = layer(x)
    assert sum(saved) < 256 * 256  # an fp32 copy of the weight would be 4 x this
    out.sum().backward()
    expected = layer.dequantize().sum(0).expand(2, 256)
    torch.testing.assert_close(x.grad, expected)


def test_sharding_divides_the_model_state() -> None:
    arch = read_architecture("benchmarks/model_configs/llama-3-8b")
    ddp = estimate_memory(arch, PlanRequest(method="full", devices=8, batch=1, seq=512))
    fsdp = estimate_memory(arch, PlanRequest(method="full", devices=8, sharding="fsdp", batch=1, seq=512))
    assert fsdp.base_weights * 8 == pytest.approx(ddp.base_weights, rel=1e-6)
    assert fsdp.optimizer_state * 8 == pytest.approx(ddp.optimizer_state, rel=1e-6)
    assert fsdp.total < ddp.total / 4
    # loading, each process holds the whole base in CPU memory, sharded or not (not sharded as it is read)
    assert fsdp.host_loading == ddp.host_loading == ddp.base_weights


def test_smallest_fit_fits_and_nothing_is_said_when_nothing_fits() -> None:
    arch = read_architecture("benchmarks/model_configs/llama-3-70b")
    request = PlanRequest(method="lora", batch=4, seq=2048, device_memory=parse_bytes("80GB"))
    assert estimate_memory(arch, request).total > request.device_memory
    found = smallest_fit(arch, request)
    assert found is not None and found[1].total <= request.device_memory
    assert estimate_memory(arch, found[0]).total == found[1].total
    assert smallest_fit(arch, PlanRequest(device_memory=parse_bytes("10MB"))) is None


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lorakit.cli import main

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert main(["plan", str(tmp_path), "--batch", "2", "--seq", "64", "--device-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "total (peak)" in out and "fits" in out and "does not fit" not in out
    assert main(["plan", "benchmarks/model_configs/llama-3-8b", "--device-memory", "24GB", "--batch", "8",
                 "--seq", "4096", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["smallest_fit"] is not None
    assert report["host_loading_per_process"] == report["components"]["base weights"]
    assert main(["plan", "benchmarks/model_configs/llama-3-70b", "--devices", "8", "--sharding", "fsdp"]) == 0
    assert "host (CPU) memory while the base loads: 131.42 GiB per process" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--device-memory", "lots"], "not a size"),
    (["--method", "full", "--quantize", "nf4"], "--method qlora"),
    (["--targets", "nothing_here"], "match no linear layer"),
])
def test_plan_command_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                        message: str) -> None:
    from lorakit.cli import main

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert main(["plan", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_model_type_names_the_known_ones(tmp_path: Path) -> None:
    from lorakit.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, "model_type": "mamba"}))
    with pytest.raises(ConfigError, match="llama"):
        read_architecture(str(tmp_path))


def test_quantizing_frees_each_full_precision_layer_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_model held every replaced fp32 Linear until the end (SmolLM2 nf4: 470 MiB of live tensors while
    quantizing, 69 MiB once each layer is freed when replaced)."""
    import gc
    import weakref

    from lorakit import quant

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    originals = [weakref.ref(layer) for layer in model]
    alive_at_build: list[int] = []
    real_init = quant.QuantizedLinear.__init__

    def counting_init(self, linear, scheme):  # how many original layers still exist when each one is built
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in originals))
        real_init(self, linear, scheme)

    monkeypatch.setattr(quant.QuantizedLinear, "__init__", counting_init)
    quant.quantize_model(model, "int8")
    assert alive_at_build == [4, 3, 2, 1]
