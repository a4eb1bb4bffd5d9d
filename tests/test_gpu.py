"""The CUDA code paths: LoRA layers against a float64 CPU reference, bf16 autocast, merge/unmerge, mixed-adapter
batches, the quantized base, DDP over nccl, and a real recipe trained under bf16 autocast.

Skipped without a GPU (CI has none); run on a lent GPU machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.quant import QuantizedLinear, dequantize, quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (‖a − b‖ where b is all zeros)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


EVERY_TYPE = ["embed", "q", "v", "conv", "pointwise", "depthwise"]


def lora_model(tiny: nn.Module, seed: int = 0, **kw) -> nn.Module:
    """TinyNet with LoRA on every layer type (DoRA: the Linear ones), B drawn at random (a zero B would hide a
    wrong update)."""
    targets = ["q", "v"] if kw.get("use_dora") else EVERY_TYPE
    model = lorakit.inject(copy.deepcopy(tiny), lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, **kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def ids(rows: int = 6, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 20, (rows, seq), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_forward_and_gradients_match_a_float64_cpu_reference(tiny, kw) -> None:
    model = lora_model(tiny, **kw)
    ref = copy.deepcopy(model).double()
    gpu = copy.deepcopy(model).cuda().train()
    x = ids()
    out_ref, out_gpu = ref(x), gpu(x.cuda())
    assert rel(out_gpu, out_ref) < 5e-3  # cuDNN convolutions may use TF32
    out_ref.pow(2).sum().backward()
    out_gpu.pow(2).sum().backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    grads_gpu = {n: p.grad for n, p in gpu.named_parameters() if p.requires_grad}
    assert grads_ref.keys() == grads_gpu.keys() and grads_ref
    for name in grads_ref:
        assert rel(grads_gpu[name], grads_ref[name]) < 1e-2, name


def test_bf16_autocast_forward_backward(tiny) -> None:
    model = lora_model(tiny).cuda().train()
    x = ids().cuda()
    fp32 = model(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(x)
    assert bf16.dtype == torch.bfloat16 and 1e-5 < rel(bf16.float(), fp32) < 3e-2  # really bf16, still close
    bf16.float().pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_merge_unmerge_round_trip_on_gpu(tiny) -> None:
    model = lora_model(tiny).cuda()
    x = ids().cuda()
    before = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lorakit.merge(model)
    assert rel(model(x), before) < 1e-4
    lorakit.unmerge(model)
    assert rel(model(x), before) < 1e-5
    for n, p in model.named_parameters():
        if n in weights:
            assert rel(p, weights[n]) < 1e-6, n


def test_mixed_adapter_batch_equals_each_adapter_alone(tiny) -> None:
    model = lora_model(tiny, seed=0).cuda()
    for k in (1, 2):  # ranks 2 and 4 (conv allows at most 4)
        lorakit.add_adapter(model, f"t{k}", lorakit.LoraConfig(r=2 * k, alpha=8, target_modules=EVERY_TYPE))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).cuda() * 0.1)
    x = ids(rows=9).cuda()
    alone = {}
    for name in ("default", "t1", "t2"):
        lorakit.set_adapter(model, name)
        alone[name] = model(x)
    for names in (["default"] * 3 + ["t1"] * 3 + ["t2"] * 3, ["default", "t1", "t2"] * 3):  # grouped, interleaved
        with lorakit.route(model, names):
            mixed = model(x)
        expected = torch.stack([alone[n][i] for i, n in enumerate(names)])
        assert rel(mixed, expected) < 1e-5


@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("nf4", 0.15)])
def test_quantized_base_on_gpu_matches_cpu(scheme: str, bound: float) -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    cpu = dequantize(quantize(weight, scheme), scheme, tuple(weight.shape), torch.float32)
    gpu_stored = quantize(weight.cuda(), scheme)
    assert all(t.is_cuda for t in gpu_stored.values())
    gpu = dequantize(gpu_stored, scheme, tuple(weight.shape), torch.float32)
    assert rel(gpu, cpu) < 1e-6 and rel(cpu, weight) < bound
    linear = nn.Linear(256, 64).cuda()
    layer = QuantizedLinear(linear, scheme)
    x = torch.randn(5, 256, device="cuda")
    assert rel(layer(x), linear(x)) < bound


def test_ddp_over_nccl_trains_a_lora_model(tiny) -> None:
    """A world of one (one GPU cannot hold two nccl ranks): DDP over nccl wraps a LoRA model and its gradients
    equal the plain model's."""
    script = f"""
import copy, os, sys, torch, torch.distributed as dist
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT / 'src')!r}]
from conftest import TinyNet
from test_gpu import lora_model, ids, rel
dist.init_process_group("nccl")
torch.manual_seed(0)
model = lora_model(TinyNet().eval()).cuda().train()
plain = copy.deepcopy(model)
ddp = torch.nn.parallel.DistributedDataParallel(model)
x = ids().cuda()
ddp(x).pow(2).sum().backward()
plain(x).pow(2).sum().backward()
worst = max(rel(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters()) if a.requires_grad)
total = torch.ones(1, device="cuda")
dist.all_reduce(total)
print("RESULT", dist.get_backend(), worst, float(total))
dist.destroy_process_group()
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line is not None, done.stderr[-3000:]
    _, backend, worst, total = line.split()
    assert backend == "nccl" and float(worst) < 1e-6 and float(total) == 1.0


def test_recipe_trains_on_gpu_under_bf16_autocast(tmp_path: Path) -> None:
    """A real recipe (MobileNetV2 on MNIST digits) on the GPU with train.precision=bf16: the loss falls and the
    held-out accuracy rises far above chance; metrics record CUDA memory."""
    from lorakit.recipes import load_recipe
    from lorakit.train import train

    recipe = load_recipe("vision-mobilenet-mnist", ["train.device=cuda", "train.precision=bf16",
                                                    "train.max_train_examples=1024", "train.epochs=2",
                                                    "eval.max_examples=500", "train.progress=false"])
    metrics = train(recipe, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    losses = [h["loss"] for h in saved["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    assert saved["eval"]["accuracy"] > 0.5 > saved["base_eval"]["accuracy"]
    assert saved["peak_memory_mb"] > 0 and metrics["eval"]["accuracy"] == saved["eval"]["accuracy"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_serve_engine_runs_on_cuda(tmp_path: Path, dtype: str) -> None:
    """lorakit serve --device cuda --dtype ...: model, adapters, KV cache, routing index and sampling on the GPU;
    concurrent requests for an adapter and the base; fp32 greedy equals generate() on the same GPU model."""
    import httpx

    from lorakit.evaluate import generate
    from lorakit.models import load_model
    from lorakit.serve import Engine, ServeConfig, ServerThread, create_app

    loaded = load_model("smollm2", task="causal-lm")
    trained = lorakit.inject(copy.deepcopy(loaded.model), lorakit.LoraConfig(r=4, alpha=8,
                                                                             target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    lorakit.save_adapter(trained, tmp_path / "ada", tokenizer=loaded.tokenizer)
    engine = Engine(loaded.model, loaded.tokenizer, "causal-lm", "smollm2",
                    ServeConfig(device="cuda", dtype=dtype, max_context=256, max_tokens=16), adapter_dir=tmp_path)
    expected_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert {(p.device.type, p.dtype) for p in engine.model.parameters()} == {("cuda", expected_dtype)}
    chat = lambda http, model, **kw: http.post("/v1/chat/completions", json={  # noqa: E731
        "model": model, "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8,
        "temperature": 0, **kw})
    with ServerThread(create_app(engine)) as running, httpx.Client(base_url=running.url, timeout=120) as http:
        answers = [chat(http, m) for m in ("ada", "smollm2")]
        assert [a.status_code for a in answers] == [200, 200], answers[0].text
        sampled = [chat(http, "ada", temperature=0.8, top_k=20, seed=4).json() for _ in range(2)]
        assert sampled[0]["choices"] == sampled[1]["choices"]  # a CUDA generator, seeded per request
        assert {p.device.type for n, p in engine.model.named_parameters() if "lora_" in n} == {"cuda"}
        if dtype == "fp32":
            lorakit.set_adapter(engine.model, "ada")
            alone = generate(engine.model, loaded.tokenizer, ["Name three colors."], 8)[0]
            assert answers[0].json()["choices"][0]["message"]["content"] == alone
