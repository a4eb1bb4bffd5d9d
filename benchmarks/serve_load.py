"""Load test of ``lorakit serve``: N concurrent clients over M adapters for T seconds, against a baseline.

    .venv/bin/python benchmarks/serve_load.py --clients 32 --adapters 16 --seconds 60 --max-tokens 32

1. Makes M LoRA adapters for SmolLM2-135M-Instruct (all-linear, r=8, seeded random weights: serving cost does
   not depend on what an adapter learned) unless ``--adapter-dir`` already holds them.
2. Starts ``lorakit serve`` in a subprocess on 127.0.0.1, loads every adapter with one warm-up request, then
   runs N clients for T seconds; each sends streaming chat requests (greedy, ``max_tokens``) one after
   another, cycling through prompts and adapters. Requests in flight at T are waited for.
3. Baseline, the way adapters are served without such a server: the same requests in the same order, one at a
   time, with transformers' ``generate`` on a ``peft.PeftModel`` holding the M adapters and ``set_adapter``
   switching between them, for T seconds.

Prints requests/s, tokens/s, time to first token, p50/p99 latency and errors for both, checks that both gave
the same greedy answers, and writes everything to ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.", "What is 12 times 7?", "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?", "What does a carpenter do?", "Describe a cat in two sentences.",
    "Why is the sky blue?", "Suggest a name for a bakery.", "How do I boil an egg?",
    "What is the largest planet in our solar system?", "Translate 'good morning' to Spanish.",
    "List two benefits of exercise.", "What is a prime number?", "How many legs does a spider have?",
    "Write a short greeting for a birthday card.", "What is the boiling point of water?",
    "Give an example of a renewable energy source.", "What is the opposite of 'ancient'?",
    "Summarize the plot of Cinderella in one sentence.", "What is machine learning?", "How do plants drink water?",
]


# ---------------------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------------------
def adapter_names(count: int) -> list[str]:
    return [f"a{i:02d}" for i in range(count)]


def make_adapters(folder: Path, count: int, rank: int, base: str = "smollm2") -> None:
    """``count`` all-linear LoRA adapters of rank ``rank`` with seeded random A and B (skips existing ones)."""
    from lorakit import LoraConfig, inject, save_adapter
    from lorakit.models import load_model

    todo = [n for n in adapter_names(count) if not (folder / n / "adapter_config.json").is_file()]
    if not todo:
        return
    loaded = load_model(base, task="causal-lm")
    model = inject(loaded.model, LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    for name in todo:
        generator = torch.Generator().manual_seed(int(name[1:]))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_A" in key or "lora_B" in key:
                    std = param.shape[1] ** -0.5 if "lora_A" in key else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        save_adapter(model, folder / name, tokenizer=loaded.tokenizer, provenance={"made_by": "serve_load.py"})
        print(f"  made adapter {name}", flush=True)


def request_for(client: int, k: int, clients: int, adapters: list[str]) -> tuple[str, str]:
    """The k-th request of a client: (adapter, prompt). Neighbouring clients use different adapters."""
    n = client + clients * k
    return adapters[n % len(adapters)], PROMPTS[(client * 5 + k) % len(PROMPTS)]


# ---------------------------------------------------------------------------------------------------------
# the server side
# ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(http: httpx.AsyncClient, adapter: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": adapter, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, pieces, tokens, error = None, [], 0, None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                        break
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            ttft = ttft if ttft is not None else time.perf_counter() - started
                            pieces.append(choice["delta"]["content"])
    except httpx.HTTPError as err:
        error = f"{type(err).__name__}: {err}"
    latency = time.perf_counter() - started
    return {"adapter": adapter, "prompt": prompt, "started": started, "latency": latency,
            "ttft": ttft if ttft is not None else latency, "tokens": tokens, "text": "".join(pieces), "error": error}


async def load_test(url: str, clients: int, adapters: list[str], seconds: float, max_tokens: int) -> tuple[list, float]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        # warm-up: every adapter loaded (and the engine's code paths run) before the clock starts
        await asyncio.gather(*(one_request(http, a, PROMPTS[0], 2) for a in adapters))
        results: list[dict] = []
        start = time.perf_counter()

        async def client(c: int) -> None:
            k = 0
            while time.perf_counter() - start < seconds:
                adapter, prompt = request_for(c, k, clients, adapters)
                results.append(await one_request(http, adapter, prompt, max_tokens))
                k += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    for r in results:
        r["started"] -= start
    return sorted(results, key=lambda r: r["started"]), elapsed


def run_server_side(args: argparse.Namespace, adapter_dir: Path, adapters: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-c", "import sys; from lorakit.cli import main; sys.exit(main())", "serve",
               "--base", args.base, "--adapter-dir", str(adapter_dir),
               "--max-adapters", str(max(len(adapters), 1)), "--max-batch", str(args.max_batch), "--port", str(port),
               "--max-tokens", str(max(args.max_tokens, 64)), "--log-level", "warning", "--device", args.device,
               "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        results, elapsed = asyncio.run(load_test(url, args.clients, adapters, args.seconds, args.max_tokens))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.terminate()
        server.wait(timeout=60)
    summary = summarize(results, elapsed)
    summary["mean_batch_size"] = _mean_batch(metrics)
    summary["command"] = "lorakit " + " ".join(command[3:]).replace(str(adapter_dir), "ADAPTER_DIR")
    return {"summary": summary, "requests": results}


def _mean_batch(metrics: str) -> float | None:
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("lorakit_batch_size_sum", "lorakit_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("lorakit_batch_size_count")
    return round(values["lorakit_batch_size_sum"] / count, 2) if count else None


# ---------------------------------------------------------------------------------------------------------
# the baseline: transformers generate + peft set_adapter, one request at a time
# ---------------------------------------------------------------------------------------------------------
class _FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def run_baseline(args: argparse.Namespace, adapter_dir: Path, adapters: list[str], requests: list[dict]) -> dict:
    from peft import PeftModel

    from lorakit.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.serve.config import resolve_device, resolve_dtype

    loaded = load_model(args.base, task="causal-lm")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)  # the server's, on the same terms
    tokenizer = loaded.tokenizer
    model = PeftModel.from_pretrained(loaded.model.to(device=device, dtype=dtype or torch.float32),
                                      adapter_dir / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    model.eval()
    eos = tokenizer.eos_token_id

    def answer(adapter: str, prompt: str, max_tokens: int) -> dict:
        model.set_adapter(adapter)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        timer = _FirstToken()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 streamer=timer)
        latency = time.perf_counter() - started
        new = [t for t in out[0, enc["input_ids"].shape[1]:].tolist() if t != eos]
        return {"adapter": adapter, "prompt": prompt, "started": started, "latency": latency,
                "ttft": (timer.at - started) if timer.at else latency, "tokens": len(new),
                "text": tokenizer.decode(new, skip_special_tokens=True), "error": None}

    answer(adapters[0], PROMPTS[0], 2)  # warm-up
    results = []
    start = time.perf_counter()
    for request in requests:
        if time.perf_counter() - start >= args.seconds:
            break
        result = answer(request["adapter"], request["prompt"], args.max_tokens)
        result["started"] -= start
        results.append(result)
    elapsed = time.perf_counter() - start
    return {"summary": summarize(results, elapsed), "requests": results}


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarize(results: list[dict], elapsed: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    latencies, ttfts = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"requests": len(ok), "errors": len(results) - len(ok), "seconds": round(elapsed, 2),
            "completion_tokens": tokens, "requests_per_s": round(len(ok) / elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 2),
            "ttft_p50_s": _round(_percentile(ttfts, 50)), "ttft_p99_s": _round(_percentile(ttfts, 99)),
            "latency_p50_s": _round(_percentile(latencies, 50)), "latency_p99_s": _round(_percentile(latencies, 99)),
            "latency_mean_s": _round(statistics.fmean(latencies) if latencies else None)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def print_table(server: dict, baseline: dict, same: tuple[int, int]) -> None:
    rows = [("requests", "requests"), ("errors", "errors"), ("completion tokens", "completion_tokens"),
            ("seconds", "seconds"), ("requests/s", "requests_per_s"), ("tokens/s", "tokens_per_s"),
            ("TTFT p50 (s)", "ttft_p50_s"), ("TTFT p99 (s)", "ttft_p99_s"), ("latency p50 (s)", "latency_p50_s"),
            ("latency p99 (s)", "latency_p99_s")]
    print(f"\n{'':20}{'lorakit serve':>16}{'peft baseline':>16}")
    for label, key in rows:
        print(f"{label:20}{str(server[key]):>16}{str(baseline[key]):>16}")
    print(f"{'mean batch size':20}{str(server.get('mean_batch_size')):>16}{'1':>16}")
    speedup = server["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else float("nan")
    print(f"\ntokens/s speedup: {speedup:.2f}x; same greedy answer on {same[0]}/{same[1]} requests both served")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--base", default="smollm2",
                        help="base model: packaged name or a SmolLM2-architecture folder (e.g. random weights on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto, both sides (default: auto)")
    parser.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (as loaded), both sides")
    parser.add_argument("--adapter-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--baseline-seconds", type=float, default=None, help="default: --seconds")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()

    adapters = adapter_names(args.adapters)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        adapter_dir = args.adapter_dir or Path(tmp)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        print(f"adapters: {len(adapters)} x all-linear r={args.rank} in {adapter_dir}", flush=True)
        make_adapters(adapter_dir, args.adapters, args.rank, args.base)
        before = machine()
        print(f"server: {args.clients} clients, {args.seconds:g} s ...", flush=True)
        server = run_server_side(args, adapter_dir, adapters)
        print(f"baseline: the same requests one at a time with peft, {args.baseline_seconds or args.seconds:g} s ...",
              flush=True)
        baseline_args = argparse.Namespace(**{**vars(args), "seconds": args.baseline_seconds or args.seconds})
        baseline = run_baseline(baseline_args, adapter_dir, adapters, server["requests"])
    both = list(zip(server["requests"], baseline["requests"]))
    same = (sum(a["text"] == b["text"] for a, b in both), len(both))
    print_table(server["summary"], baseline["summary"], same)
    speedup = server["summary"]["tokens_per_s"] / max(baseline["summary"]["tokens_per_s"], 1e-9)
    report = {"settings": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if k != "adapter_dir"},
              "machine_before": before, "machine_after": machine(), "server": server["summary"],
              "baseline": baseline["summary"], "tokens_per_s_speedup": round(speedup, 2),
              "same_greedy_answers": {"equal": same[0], "compared": same[1]},
              "mismatches": [{"adapter": a["adapter"], "prompt": a["prompt"], "server": a["text"],
                              "baseline": b["text"]} for a, b in both if a["text"] != b["text"]][:10]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if server["summary"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
