"""`lorakit serve` against a live server on 127.0.0.1: SmolLM2-135M-Instruct with three small adapters.

Greedy answers equal `lorakit.evaluate.generate` / ``lorakit generate``; concurrent requests for different
adapters share decoding steps and still get their own adapter's answer; the official ``openai`` client works;
every bad input gets its status code and the server keeps serving; adapter administration needs the token.
"""

from __future__ import annotations

import copy
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import lorakit
from lorakit import LoraConfig, inject, save_adapter
from lorakit.evaluate import generate, stop_token_ids
from lorakit.io import load_adapter
from lorakit.serve import Engine, ServeConfig, ServerThread, create_app

from conftest import randomize_lora

ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = ("Name three colors.", "Write a haiku about the sea.")
TOKENS = 12
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smollm2_session):
    """Small real adapters (LoRA on q/v, seeded random B: B = 0 would be the base model) in ``adapters/``, one
    more outside it, and one saved for another base (its fingerprint does not match)."""
    root = tmp_path_factory.mktemp("serve")
    model = inject(copy.deepcopy(smollm2_session.model), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    targets = [(ADAPTERS[0], 10, root / "adapters"), (ADAPTERS[1], 11, root / "adapters"),
               (ADAPTERS[2], 12, root / "adapters"), ("delta", 20, root / "outside"), ("foreign", 21, root / "outside")]
    for name, seed, folder in targets:
        if name == "foreign":
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_A" in key or "lora_B" in key:
                    std = param.shape[1] ** -0.5 if "lora_A" in key else 0.06
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        save_adapter(model, folder / name, tokenizer=smollm2_session.tokenizer)
    (root / "secret").mkdir()
    return root / "adapters"


@pytest.fixture(scope="module")
def reference(adapter_dir, smollm2_session):
    """Greedy answers of `lorakit.evaluate.generate` (one prompt at a time), computed on demand."""
    model = copy.deepcopy(smollm2_session.model)
    for name in ADAPTERS:
        load_adapter(model, adapter_dir / name, adapter_name=name)
    answers: dict[tuple[str, str], str] = {}

    def answer(adapter: str, prompt: str) -> str:
        if (adapter, prompt) not in answers:
            if adapter == "smollm2":
                with lorakit.disable_adapters(model):
                    answers[adapter, prompt] = generate(model, smollm2_session.tokenizer, [prompt], TOKENS)[0]
            else:
                lorakit.set_adapter(model, adapter)
                answers[adapter, prompt] = generate(model, smollm2_session.tokenizer, [prompt], TOKENS)[0]
        return answers[adapter, prompt]

    return answer


@pytest.fixture(scope="module")
def server(adapter_dir, smollm2_session):
    # two adapter slots for three adapters: requests also exercise LRU unloading and waiting for a slot
    config = ServeConfig(max_batch=8, max_tokens=200, max_context=512, max_adapters=2, admin_token=TOKEN,
                         request_timeout=120, device="cpu")
    engine = Engine(copy.deepcopy(smollm2_session.model), smollm2_session.tokenizer, "causal-lm", "smollm2",
                    config, adapter_dir=adapter_dir)
    with ServerThread(create_app(engine)) as running:
        running.engine = engine
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def _chat(client: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def _wait_idle(client: httpx.Client, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/health").json()
        if health["active"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------------------
def test_greedy_chat_and_completion_equal_generate(client, reference, smollm2_session) -> None:
    for model in ("smollm2", "alpha"):
        response = _chat(client, model, PROMPTS[0])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == model
        assert body["choices"][0]["message"]["content"] == reference(model, PROMPTS[0])
        assert body["usage"]["completion_tokens"] <= TOKENS
    # /v1/completions takes the raw prompt: the chat-templated text gives the same answer
    text = smollm2_session.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                                         add_generation_prompt=True)
    response = client.post("/v1/completions", json={"model": "beta", "prompt": text, "max_tokens": TOKENS,
                                                     "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference("beta", PROMPTS[0])


def test_equals_lorakit_generate_cli(client, adapter_dir, capsys) -> None:
    from lorakit.cli import main

    assert main(["generate", PROMPTS[1], "--adapter", str(adapter_dir / "gamma"),
                 "--max-new-tokens", str(TOKENS)]) == 0
    printed = capsys.readouterr().out
    served = _chat(client, "gamma", PROMPTS[1]).json()["choices"][0]["message"]["content"]
    assert printed.strip() == served.strip()


def test_concurrent_mixed_adapters_share_steps(client, reference, server) -> None:
    steps_before = _metric(client, "lorakit_decode_steps_total")
    jobs = [(model, PROMPTS[1]) for model in ("smollm2", *ADAPTERS)] + [("alpha", PROMPTS[0]), ("smollm2", PROMPTS[0])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _chat(client, *job), jobs))
    for (model, prompt), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == reference(model, prompt), (model, prompt)
    # the four models answer the second prompt four different ways, so a mix-up would show
    assert len({reference(model, PROMPTS[1]) for model in ("smollm2", *ADAPTERS)}) == 4
    metrics = client.get("/metrics").text
    steps = _metric(client, "lorakit_decode_steps_total") - steps_before
    single = float(re.search(r'^lorakit_batch_size_bucket\{le="1.0"\} (\S+)$', metrics, re.M).group(1))
    total = _metric(client, "lorakit_batch_size_count")
    assert single < total  # some decoding steps carried several requests (and adapters) at once
    assert steps < len(jobs) * TOKENS  # far fewer steps than one request at a time would need
    assert _metric(client, "lorakit_adapters_loaded") <= 2  # LRU limit held with three adapters in use
    assert _metric(client, "lorakit_adapter_unloads_total") >= 1


def test_sampling_seed_and_stop(client, reference) -> None:
    sampled = [_chat(client, "alpha", PROMPTS[1], temperature=0.9, top_p=0.9, seed=7).json() for _ in range(2)]
    assert sampled[0]["choices"][0]["message"]["content"] == sampled[1]["choices"][0]["message"]["content"]
    full = reference("smollm2", PROMPTS[0])
    stop = full.split()[1]  # a word from the middle of the greedy answer
    body = _chat(client, "smollm2", PROMPTS[0], stop=[stop]).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == full[:full.index(stop)]


def test_prefix_cache_hits_and_answers_stay_the_same(client, server, reference) -> None:
    """The second request with the same chat-template start takes its first blocks from the prefix cache (the
    hit is counted, in the engine and in /metrics) and still answers what generate() answers without a cache."""
    hits, reused = server.engine.prefix.hits, _metric(client, "lorakit_prefix_cache_tokens_total")
    first = _chat(client, "beta", PROMPTS[0]).json()["choices"][0]["message"]["content"]
    second = _chat(client, "beta", PROMPTS[0]).json()["choices"][0]["message"]["content"]
    assert server.engine.prefix.hits > hits
    assert _metric(client, "lorakit_prefix_cache_tokens_total") >= reused + 24  # at least the system prompt
    assert first == second == reference("beta", PROMPTS[0])


# ---------------------------------------------------------------------------------------------------------
# the official client
# ---------------------------------------------------------------------------------------------------------
def test_openai_client(server, reference) -> None:
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in api.models.list().data]
    assert ids[0] == "smollm2" and set(ADAPTERS) <= set(ids)
    chat = api.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[1]}],
                                       max_tokens=TOKENS, temperature=0)
    assert chat.choices[0].message.content == reference("beta", PROMPTS[1])
    chunks = list(api.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[1]}],
                                              max_tokens=TOKENS, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference("beta", PROMPTS[1])
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    completion = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                        temperature=0)
    streamed = api.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                      temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_vllm_load_and_unload_lora_adapter_with_the_openai_client(server, adapter_dir, reference) -> None:
    """vLLM's runtime LoRA endpoints and bodies; the admin token is the client's API key (as vLLM's --api-key)."""
    delta = str(adapter_dir.parent / "outside" / "delta")
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        anonymous.post("/load_lora_adapter", body={"lora_name": "epsilon", "lora_path": delta}, cast_to=httpx.Response)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    loaded = api.post("/load_lora_adapter", body={"lora_name": "epsilon", "lora_path": delta}, cast_to=httpx.Response)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'epsilon' added successfully."
    assert "epsilon" in [m.id for m in api.models.list().data]
    chat = api.chat.completions.create(model="epsilon", messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=TOKENS, temperature=0)
    assert chat.choices[0].message.content and chat.model == "epsilon"
    with pytest.raises(openai.ConflictError):
        api.post("/load_lora_adapter", body={"lora_name": "epsilon", "lora_path": delta}, cast_to=httpx.Response)
    unloaded = api.post("/unload_lora_adapter", body={"lora_name": "epsilon"}, cast_to=httpx.Response)
    assert unloaded.text == "Success: LoRA adapter 'epsilon' removed successfully."
    assert "epsilon" not in [m.id for m in api.models.list().data]
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="epsilon", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.post("/unload_lora_adapter", body={"lora_name": "epsilon"}, cast_to=httpx.Response)
    # the base and the other adapters are still served as before
    again = api.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[1]}],
                                        max_tokens=TOKENS, temperature=0)
    assert again.choices[0].message.content == reference("beta", PROMPTS[1])


def test_sampling_parameters_are_honoured(client, reference, smollm2_session) -> None:
    greedy = reference("alpha", PROMPTS[1])
    for seed in (1, 2, 3):  # top_k=1 samples from the single most likely token: greedy for any seed
        body = _chat(client, "alpha", PROMPTS[1], temperature=1.0, top_k=1, seed=seed).json()
        assert body["choices"][0]["message"]["content"] == greedy, seed
        min_p = _chat(client, "alpha", PROMPTS[1], temperature=1.0, min_p=1.0, seed=seed).json()
        assert min_p["choices"][0]["message"]["content"] == greedy, seed  # min_p=1 keeps only the top token
    two = _chat(client, "alpha", PROMPTS[1], n=2).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in two["choices"]] == [greedy, greedy]
    sampled = [_chat(client, "alpha", PROMPTS[1], n=2, temperature=1.0, seed=5).json() for _ in range(2)]
    assert sampled[0]["choices"] == sampled[1]["choices"]  # reproducible with a seed
    assert sampled[0]["usage"]["prompt_tokens"] == two["usage"]["prompt_tokens"]  # the prompt counts once
    many = client.post("/v1/completions", json={"model": "smollm2", "prompt": ["The sea is", "The sky is"],
                                                "n": 2, "max_tokens": 4, "temperature": 0}).json()
    texts = [c["text"] for c in many["choices"]]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]

    # repetition_penalty as transformers applies it (prompt and answer so far), on the base model
    prompt = "List: apple, apple, apple, apple,"
    ids = smollm2_session.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = smollm2_session.model.generate(ids, max_new_tokens=TOKENS, do_sample=False, repetition_penalty=1.5)
    expected = smollm2_session.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    served = client.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": TOKENS,
                                                  "temperature": 0, "repetition_penalty": 1.5}).json()
    plain = client.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": TOKENS,
                                                 "temperature": 0}).json()
    assert served["choices"][0]["text"] == expected != plain["choices"][0]["text"]
    penalized = client.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": TOKENS,
                                                     "temperature": 0, "frequency_penalty": 2.0,
                                                     "presence_penalty": 2.0}).json()
    assert penalized["choices"][0]["text"] != plain["choices"][0]["text"]


def test_logprobs_whole_and_streamed(client, server, reference) -> None:
    body = _chat(client, "beta", PROMPTS[0], logprobs=True, top_logprobs=3).json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    assert "".join(item["token"] for item in content) == choice["message"]["content"] == \
        reference("beta", PROMPTS[0])
    for item in content:  # greedy: the chosen token is the most likely one
        assert len(item["top_logprobs"]) == 3 and item["logprob"] <= 0
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"], abs=1e-5)
        assert item["bytes"] == list(item["token"].encode())
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(api.chat.completions.create(model="beta", messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=TOKENS, temperature=0, stream=True, logprobs=True,
                                              top_logprobs=3))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t["token"] for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t["logprob"] for t in content], abs=1e-3)
    legacy = client.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is",
                                                  "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
    lp = legacy["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == legacy["choices"][0]["text"]
    assert all(len(top) <= 2 for top in lp["top_logprobs"])


# ---------------------------------------------------------------------------------------------------------
# limits and bad inputs
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_get_their_status_and_server_keeps_serving(client, server, reference) -> None:
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = {
        "unknown model": ({**chat, "model": "no-such-adapter"}, 404),
        "path as model": ({**chat, "model": "../adapters/alpha"}, 404),
        "prompt too long": ({**chat, "messages": [{"role": "user", "content": "word " * 600}]}, 400),
        "max_tokens over limit": ({**chat, "max_tokens": 201}, 400),
        "prompt + max_tokens over context": ({**chat, "messages": [{"role": "user", "content": "word " * 400}],
                                              "max_tokens": 200}, 400),
        "max_tokens zero": ({**chat, "max_tokens": 0}, 400),
        "temperature out of range": ({**chat, "temperature": 5}, 400),
        "n over 16": ({**chat, "n": 17}, 400),
        "logprobs as a number in chat": ({**chat, "logprobs": 2}, 400),
        "top_logprobs without logprobs": ({**chat, "top_logprobs": 2}, 400),
        "logit_bias": ({**chat, "logit_bias": {"5": 10}}, 400),
        "best_of": ({**chat, "best_of": 3}, 400),
        "unknown parameter": ({**chat, "mirostat": 2}, 400),
        "no messages": ({**chat, "messages": []}, 400),
        "missing model": ({"messages": chat["messages"]}, 400),
    }
    for what, (body, status) in cases.items():
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == status, (what, response.text)
        assert response.json()["error"]["message"], what
    malformed = client.post("/v1/chat/completions", content=b'{"model": "alpha", "messages": [',
                            headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    assert client.post("/v1/classify", json={"model": "smollm2", "input": "x"}).status_code == 400
    assert client.get("/v1/nothing").status_code == 404

    engine = server.engine
    engine.config.max_queue = 0  # nothing may wait: the queue is full
    try:
        full = client.post("/v1/chat/completions", json=chat)
    finally:
        engine.config.max_queue = 256
    assert full.status_code == 429 and full.headers["retry-after"]
    engine.config.request_timeout = 1e-6  # expires before the engine admits it
    try:
        late = client.post("/v1/chat/completions", json=chat)
        late_stream = client.post("/v1/chat/completions", json={**chat, "stream": True})
    finally:
        engine.config.request_timeout = 120
    assert late.status_code == 408 and late_stream.status_code == 408, (late.text, late_stream.text)

    assert client.get("/health").json()["status"] == "ok"
    assert _chat(client, "smollm2", PROMPTS[0]).json()["choices"][0]["message"]["content"] == \
        reference("smollm2", PROMPTS[0])
    metrics = client.get("/metrics").text
    assert 'endpoint="/v1/chat/completions",status="429"' in metrics
    assert 'endpoint="/v1/chat/completions",status="404"' in metrics


def test_client_disconnect_frees_its_slot(client, server) -> None:
    cancelled = _metric(client, "lorakit_cancelled_total")
    body = {"model": "smollm2", "prompt": "Count from 1 to 1000: 1, 2, 3,", "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ")
    health = _wait_idle(client)
    assert health["active"] == 0 and health["waiting"] == 0
    assert _metric(client, "lorakit_cancelled_total") == cancelled + 1


def _wait_released(server, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while server.engine.adapters.in_use and time.monotonic() < deadline:
        time.sleep(0.05)


def test_poison_values_fail_alone_and_release_their_adapter(client, server, reference, monkeypatch) -> None:
    """temperature 1e-45 (inf -> NaN in softmax before) is greedy; a seed over 64 bits is a 400; a request whose
    sampling fails in the engine ends alone with an OpenAI error while the request decoding beside it completes,
    and its adapter is released (DELETE then works)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadPoolExecutor(2) as pool:
        tiny_t = pool.submit(_chat, client, "alpha", PROMPTS[1], temperature=1e-45, seed=2 ** 64 - 1)
        beside = pool.submit(_chat, client, "beta", PROMPTS[1])
        assert tiny_t.result().status_code == 200, tiny_t.result().text
        assert tiny_t.result().json()["choices"][0]["message"]["content"] == reference("alpha", PROMPTS[1])
        assert beside.result().json()["choices"][0]["message"]["content"] == reference("beta", PROMPTS[1])
    too_big = _chat(client, "alpha", PROMPTS[0], temperature=0.5, seed=2 ** 64)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"
    assert _chat(client, "alpha", PROMPTS[0], temperature=0.5, seed=-1).status_code == 200

    import lorakit.serve.engine as engine_module

    real = engine_module.sample_token

    def poisoned(logits, params, generator):
        if params.seed == 13:
            raise ValueError("poisoned distribution")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_token", poisoned)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_chat, client, "alpha", PROMPTS[1], temperature=0.7, seed=13, max_tokens=TOKENS)
        good = pool.submit(_chat, client, "gamma", PROMPTS[1])
        assert bad.result().status_code == 500
        assert bad.result().json()["error"]["code"] == "sampling_failed"
        assert good.result().status_code == 200
        assert good.result().json()["choices"][0]["message"]["content"] == reference("gamma", PROMPTS[1])
    monkeypatch.undo()
    engine = server.engine
    real_forward = engine._forward

    def nan_for_alpha(ids, mask, positions, cache, adapters):  # as an adapter whose output is not finite
        logits = real_forward(ids, mask, positions, cache, adapters)
        logits[[i for i, a in enumerate(adapters) if a == "alpha"]] = float("nan")
        return logits

    monkeypatch.setattr(engine, "_forward", nan_for_alpha)
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(_chat, client, "alpha", PROMPTS[0])
        good = pool.submit(_chat, client, "beta", PROMPTS[0])
        assert bad.result().status_code == 500 and "not finite" in bad.result().json()["error"]["message"]
        assert good.result().json()["choices"][0]["message"]["content"] == reference("beta", PROMPTS[0])
    monkeypatch.undo()
    _wait_released(server)
    assert not server.engine.adapters.in_use
    assert client.delete("/v1/adapters/alpha", headers=auth).status_code == 200  # not "used by 1 request"
    assert client.post("/v1/adapters", json={"name": "alpha"}, headers=auth).status_code == 201
    assert client.get("/health").json()["status"] == "ok"


def test_failed_decoding_step_ends_its_rows_and_the_server_goes_on(client, server, reference, monkeypatch) -> None:
    engine = server.engine
    real_forward, failed = engine._forward, []

    def fails_once_while_decoding(ids, mask, positions, cache, adapters):
        if cache is engine.batch.cache and not failed:  # the running batch's cache: a decoding step
            failed.append(len(adapters))
            raise RuntimeError("device lost")
        return real_forward(ids, mask, positions, cache, adapters)

    monkeypatch.setattr(engine, "_forward", fails_once_while_decoding)
    broken = _chat(client, "smollm2", PROMPTS[0])
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "generation_failed"
    health = _wait_idle(client)
    assert failed == [1] and health["active"] == 0 and health["waiting"] == 0
    assert _chat(client, "smollm2", PROMPTS[0]).json()["choices"][0]["message"]["content"] == \
        reference("smollm2", PROMPTS[0])


def test_body_limit_refused_fast_while_health_answers(client, server) -> None:
    engine = server.engine
    engine.config.max_body_bytes = 20_000
    try:
        big = {"model": "smollm2", "prompt": "word " * 10_000, "max_tokens": 2}
        refused = client.post("/v1/completions", json=big)  # Content-Length over the limit: never read
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"

        def slow_chunks():
            for _ in range(40):
                time.sleep(0.02)
                yield b" " * 1000

        with ThreadPoolExecutor(1) as pool:
            upload = pool.submit(lambda: httpx.post(server.url + "/v1/completions", content=slow_chunks(),
                                                    headers={"content-type": "application/json"}, timeout=60))
            assert client.get("/health").status_code == 200  # answered while the upload is being read
            assert upload.result().status_code == 413
    finally:
        engine.config.max_body_bytes = ServeConfig().max_body_bytes
    limit = engine.max_prompt_tokens
    engine.max_prompt_tokens = 20
    try:
        unread = _chat(client, "smollm2", "x" * 20_000)
        assert unread.status_code == 400 and "characters" in unread.json()["error"]["message"]
        counted = client.post("/v1/completions", json={"model": "smollm2", "prompt": "one two " * 20})
        assert counted.status_code == 400 and counted.json()["error"]["param"] == "prompt"
        assert "30 tokens" not in counted.json()["error"]["message"] and "tokens" in counted.json()["error"]["message"]
    finally:
        engine.max_prompt_tokens = limit
    assert _chat(client, "smollm2", PROMPTS[0]).status_code == 200


def test_strict_request_types(client) -> None:
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    text = {"model": "smollm2", "prompt": "hi", "max_tokens": 2}
    cases = {
        "max_tokens as a string": ("/v1/completions", {**text, "max_tokens": "5"}, "max_tokens"),
        "max_tokens as a bool": ("/v1/completions", {**text, "max_tokens": True}, "max_tokens"),
        "stream as 'yes'": ("/v1/completions", {**text, "stream": "yes"}, "stream"),
        "n as a string": ("/v1/chat/completions", {**chat, "n": "1"}, "n"),
        "temperature as a string": ("/v1/chat/completions", {**chat, "temperature": "0.5"}, "temperature"),
        "temperature as a bool": ("/v1/chat/completions", {**chat, "temperature": True}, "temperature"),
        "seed over 64 bits": ("/v1/chat/completions", {**chat, "seed": 2 ** 64}, "seed"),
        "top_p zero": ("/v1/chat/completions", {**chat, "top_p": 0}, "top_p"),
        "message without content": ("/v1/chat/completions", {**chat, "messages": [{"role": "user"}]},
                                    "messages[0].content"),
        "null content": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": None}]},
                         "messages[0].content"),
        "image part": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages[0].content[1]"),
        "untyped part": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"text": "hi"}]}]}, "messages[0].content[0]"),
        "non-string text part": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [
            {"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        "lone surrogate prompt": ("/v1/completions", {**text, "prompt": "\udfff"}, "prompt"),
        "lone surrogate message": ("/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
        "lone surrogate stop": ("/v1/completions", {**text, "stop": ["\udfff"]}, "stop"),
    }
    for what, (path, body, param) in cases.items():
        response = client.post(path, content=json.dumps(body).encode(),  # ASCII: lone surrogates as \\udfff
                               headers={"content-type": "application/json"})
        assert response.status_code == 400, (what, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (what, error)
    nan = client.post("/v1/chat/completions", content=b'{"model": "smollm2", "messages": [{"role": "user", '
                                                      b'"content": "hi"}], "temperature": NaN}',
                      headers={"content-type": "application/json"})
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "temperature"
    long = client.post("/v1/completions", json={**text, "prompt": "word " * 600})
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"
    assert client.post("/v1/completions", json={**text, "temperature": 1, "stream": None}).status_code == 200


def test_symlinked_and_oversized_adapter_files_refused(client, server, adapter_dir) -> None:
    outside = adapter_dir.parent / "outside"
    linked = adapter_dir / "linked"
    linked.mkdir(exist_ok=True)
    for entry in (adapter_dir / "alpha").iterdir():
        target = outside / "delta" / entry.name if entry.name.endswith(".safetensors") else entry
        (linked / entry.name).unlink(missing_ok=True)
        (linked / entry.name).symlink_to(target.resolve())
    try:
        assert _chat(client, "linked", PROMPTS[0]).status_code == 404  # its weights live outside --adapter-dir
        assert "linked" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        for entry in linked.iterdir():
            entry.unlink()
        linked.rmdir()
    pool = server.engine.adapters
    limit, pool.max_bytes = pool.max_bytes, 1000
    try:
        big = client.post("/v1/adapters", json={"name": "big", "path": str(outside / "delta")},
                          headers={"Authorization": f"Bearer {TOKEN}"})
        assert big.status_code == 422 and big.json()["error"]["code"] == "adapter_too_large", big.text
    finally:
        pool.max_bytes = limit


def test_long_prompts_prefill_in_chunks_and_time_out_there(client, server, reference, monkeypatch) -> None:
    engine = server.engine
    chunks = _metric(client, "lorakit_prefill_chunks_total")
    engine.config.max_prefill_tokens = 8
    try:
        answer = _chat(client, "alpha", PROMPTS[1])
        assert answer.json()["choices"][0]["message"]["content"] == reference("alpha", PROMPTS[1])
        assert _metric(client, "lorakit_prefill_chunks_total") >= chunks + 2
        real = engine._forward

        def slow_forward(*args, **kwargs):  # the clock runs out after the first chunk
            out = real(*args, **kwargs)
            if engine.long is not None:
                engine.long.g.deadline = 0.0
            return out

        monkeypatch.setattr(engine, "_forward", slow_forward)
        late = _chat(client, "beta", PROMPTS[1])
    finally:
        engine.config.max_prefill_tokens = ServeConfig().max_prefill_tokens
    assert late.status_code == 408 and "prefilled" in late.json()["error"]["message"]
    _wait_released(server)
    assert not engine.adapters.in_use and engine.long is None


# ---------------------------------------------------------------------------------------------------------
# adapter administration
# ---------------------------------------------------------------------------------------------------------
def test_adapter_admin_needs_token_and_refuses_paths(client, adapter_dir, reference) -> None:
    outside = adapter_dir.parent / "outside"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/v1/adapters", json={"name": "delta", "path": str(outside / "delta")}).status_code == 401
    assert client.post("/v1/adapters", json={"name": "delta", "path": str(outside / "delta")},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.delete("/v1/adapters/alpha").status_code == 401
    for name in ("../secret", "../adapters/alpha", "a/b", "..", ".hidden", "x" * 200):
        response = client.post("/v1/adapters", json={"name": name}, headers=auth)
        assert response.status_code == 400, (name, response.text)
    assert client.post("/v1/adapters", json={"name": "missing"}, headers=auth).status_code == 404
    foreign = client.post("/v1/adapters", json={"name": "foreign", "path": str(outside / "foreign")}, headers=auth)
    assert foreign.status_code == 422 and "another base" in foreign.json()["error"]["message"]

    added = client.post("/v1/adapters", json={"name": "delta", "path": str(outside / "delta")}, headers=auth)
    assert added.status_code == 201, added.text
    assert client.post("/v1/adapters", json={"name": "delta", "path": str(outside / "delta")},
                       headers=auth).status_code == 409
    assert "delta" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    answer = _chat(client, "delta", PROMPTS[0])
    assert answer.status_code == 200
    assert client.delete("/v1/adapters/delta", headers=auth).status_code == 200
    assert _chat(client, "delta", PROMPTS[0]).status_code == 404
    assert client.delete("/v1/adapters/delta", headers=auth).status_code == 404
    # an adapter-folder entry, loaded or not, is removed from the listing and from serving until added again
    for loaded_first in (True, False):
        if loaded_first:
            assert _chat(client, "gamma", PROMPTS[0]).status_code == 200
        assert client.delete("/v1/adapters/gamma", headers=auth).status_code == 200
        assert "gamma" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert _chat(client, "gamma", PROMPTS[0]).status_code == 404
        assert client.get("/v1/models/gamma").status_code == 404
        assert client.post("/v1/adapters", json={"name": "gamma"}, headers=auth).status_code == 201
        assert _chat(client, "gamma", PROMPTS[0]).json()["choices"][0]["message"]["content"] == \
            reference("gamma", PROMPTS[0])


def test_bf16_engine_on_cpu_verifies_adapters_before_converting(adapter_dir, smollm2_session, tmp_path) -> None:
    """--dtype bf16: adapters of --adapter-dir are checked against the fp32 base (fingerprints), then the whole
    engine runs in bf16; an adapter saved for another base, or not checked before the conversion, is refused
    with the reason."""
    import shutil

    from lorakit.evaluate import generate

    shutil.copytree(adapter_dir / "alpha", tmp_path / "alpha")
    shutil.copytree(adapter_dir.parent / "outside" / "foreign", tmp_path / "foreign")
    config = ServeConfig(max_context=256, max_tokens=16, device="cpu", dtype="bf16", admin_token=TOKEN)
    engine = Engine(copy.deepcopy(smollm2_session.model), smollm2_session.tokenizer, "causal-lm", "smollm2", config,
                    adapter_dir=tmp_path)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16} and engine.device.type == "cpu"
    with ServerThread(create_app(engine)) as running, httpx.Client(base_url=running.url, timeout=120) as http:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda m: _chat(http, m, PROMPTS[0], max_tokens=6), ["alpha", "smollm2"]))
        assert [a.status_code for a in answers] == [200, 200], answers[0].text
        lora = {p.dtype for n, p in engine.model.named_parameters() if "lora_" in n}
        assert lora == {torch.bfloat16}
        lorakit.set_adapter(engine.model, "alpha")  # the engine is idle: its own model answers one prompt alone
        alone = generate(engine.model, smollm2_session.tokenizer, [PROMPTS[0]], 6)[0]
        assert answers[0].json()["choices"][0]["message"]["content"] == alone
        outside = str(adapter_dir.parent / "outside" / "delta")
        refused = http.post("/v1/adapters", json={"name": "delta", "path": outside},
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "adapter_unverified"
        foreign = _chat(http, "foreign", PROMPTS[0])
        assert foreign.status_code == 422 and "another base" in foreign.json()["error"]["message"]


def test_engine_stops_where_generate_stops(smollm2_session) -> None:
    """A chat model whose EOS is not its end-of-turn token and whose generation config names no EOS: the server
    stops at `<|im_end|>` as `lorakit generate` does (it used to stop at `<|endoftext|>` only)."""
    tokenizer = copy.deepcopy(smollm2_session.tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    config = smollm2_session.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        engine = Engine(smollm2_session.model, tokenizer, "causal-lm", "smollm2", ServeConfig(device="cpu"))
        assert engine.eos_ids == set(stop_token_ids(tokenizer, smollm2_session.model))
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids
        assert tokenizer.eos_token_id in engine.eos_ids
    finally:
        config.eos_token_id = saved


def test_admin_disabled_without_token(smollm2_session) -> None:
    engine = Engine(smollm2_session.model, smollm2_session.tokenizer, "causal-lm", "smollm2",
                    ServeConfig(device="cpu"))  # the session's model stays where it is
    with ServerThread(create_app(engine)) as running:
        response = httpx.post(running.url + "/v1/adapters", json={"name": "x"},
                              headers={"Authorization": "Bearer anything"})
        assert response.status_code == 403
        assert httpx.get(running.url + "/health").json()["adapters_loaded"] == 0


# ---------------------------------------------------------------------------------------------------------
# classification bases, CLI, routing cache
# ---------------------------------------------------------------------------------------------------------
def test_classify_matches_direct_forward(tmp_path) -> None:
    from lorakit.models import load_model

    loaded = load_model("minilm", task="sequence-classification", num_labels=2)
    model = copy.deepcopy(loaded.model)
    inject(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_lora(model, seed=3, std=0.05)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.mul_(3)
    save_adapter(model, tmp_path / "sentiment", tokenizer=loaded.tokenizer)
    texts = ["A gripping, beautifully acted film.", "Dull."]
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits, -1)
        with lorakit.disable_adapters(model):
            expected_base = torch.softmax(model(**enc).logits, -1)

    engine = Engine(loaded.model, loaded.tokenizer, "sequence-classification", "minilm",
                    adapter_dir=tmp_path)
    with ServerThread(create_app(engine)) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        with ThreadPoolExecutor(3) as pool:  # one batch, rows regrouped by adapter (`grouped_by_adapter`)
            adapted, base, again = pool.map(lambda m: http.post("/v1/classify", json={"model": m, "input": texts}),
                                            ["sentiment", "minilm", "sentiment"])
        for answer in (adapted, again):
            assert answer.status_code == 200, answer.text
            got = torch.tensor([row["probs"] for row in answer.json()["data"]])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        got_base = torch.tensor([row["probs"] for row in base.json()["data"]])
        torch.testing.assert_close(got_base, expected_base, atol=1e-5, rtol=1e-4)
        assert adapted.json()["data"][0]["label"] in ("LABEL_0", "LABEL_1")
        assert http.post("/v1/chat/completions", json={"model": "minilm", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 400


def test_requests_are_grouped_by_adapter_in_order_of_arrival() -> None:
    from types import SimpleNamespace

    from lorakit.serve.engine import grouped_by_adapter

    requests = [SimpleNamespace(adapter=a, i=i) for i, a in enumerate(["x", None, "y", "x", None, "x"])]
    assert [(r.adapter, r.i) for r in grouped_by_adapter(requests)] == [
        ("x", 0), ("x", 3), ("x", 5), (None, 1), (None, 4), ("y", 2)]


def test_serve_command_builds_its_config_and_engine_from_arguments(monkeypatch, capsys) -> None:
    """Every ServeConfig field is a `lorakit serve` option with the dataclass's default; given values reach the
    engine the command starts (uvicorn.run is replaced by a stub that receives the app)."""
    import uvicorn

    from lorakit.cli import build_parser, main
    from lorakit.cli.serve import config_from_args

    monkeypatch.delenv("LORAKIT_ADMIN_TOKEN", raising=False)
    assert config_from_args(build_parser().parse_args(["serve"])) == ServeConfig()
    argv = ["serve", "--base", "smollm2", "--max-batch", "3", "--max-queue", "5", "--max-tokens", "64",
            "--max-context", "300", "--max-prefill-tokens", "100", "--request-timeout", "7.5", "--max-adapters", "2",
            "--prefix-cache-tokens", "0", "--prefix-block", "4", "--admin-token", "tok", "--port", "0",
            "--max-prompt-tokens", "200", "--max-body-bytes", "5000", "--max-adapter-bytes", "1000000",
            "--device", "cpu", "--dtype", "bf16"]
    expected = ServeConfig(max_batch=3, max_queue=5, max_tokens=64, max_context=300, max_prefill_tokens=100,
                           request_timeout=7.5, max_adapters=2, prefix_cache_tokens=0, prefix_block=4,
                           admin_token="tok", max_prompt_tokens=200, max_body_bytes=5000, max_adapter_bytes=1000000,
                           device="cpu", dtype="bf16")
    assert config_from_args(build_parser().parse_args(argv)) == expected
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(argv) == 0
    engine = served["app"].state.serve.engine
    assert engine.config == expected and engine.context == 300 and engine.adapters.max_loaded == 2
    assert engine.prefix.max_blocks == 0 and served["port"] == 0
    assert engine.max_prompt_tokens == 200 and engine.adapters.max_bytes == 1000000
    assert {(p.device.type, p.dtype) for p in engine.model.parameters()} == {("cpu", torch.bfloat16)}
    assert main(["serve", "--device", "cuda" if not torch.cuda.is_available() else "tpu"]) == 2  # before loading
    assert "--device" in capsys.readouterr().err
    monkeypatch.setenv("LORAKIT_ADMIN_TOKEN", "from-env")
    assert config_from_args(build_parser().parse_args(["serve"])).admin_token == "from-env"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "(default: 32)" in shown and "(default: 300.0)" in shown and "from-env" not in shown


def test_routed_inference_cache_follows_weight_changes(tiny, tiny_ids) -> None:
    """LoRA layers reuse stacked adapters without autograd; an in-place change or a new adapter is seen."""
    inject(tiny, LoraConfig(r=4, target_modules=["q", "v"]))
    lorakit.add_adapter(tiny, "other", LoraConfig(r=2, target_modules=["q"]))
    randomize_lora(tiny)
    names = ["default", None, "other", "default"]

    def routed() -> torch.Tensor:
        with torch.no_grad(), lorakit.route(tiny, names):
            return tiny(tiny_ids)

    def alone(i: int) -> torch.Tensor:
        with torch.no_grad():
            if names[i] is None:
                with lorakit.disable_adapters(tiny):
                    return tiny(tiny_ids[i:i + 1])
            lorakit.set_adapter(tiny, names[i])
            return tiny(tiny_ids[i:i + 1])

    first = routed()
    for _ in range(2):
        for i in range(len(names)):
            torch.testing.assert_close(routed()[i:i + 1], alone(i), atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            tiny.layers[0]["q"].lora_B["default"].weight.add_(0.5)  # in place: the cached stack is stale
    assert not torch.allclose(routed(), first)
    lorakit.add_adapter(tiny, "third", LoraConfig(r=3, target_modules=["v"]))
    randomize_lora(tiny, seed=5)
    names[1] = "third"
    for i in range(len(names)):
        torch.testing.assert_close(routed()[i:i + 1], alone(i), atol=1e-6, rtol=1e-5)
    other_B = tiny.layers[0]["q"].lora_B["other"]
    for change in ("data", "parameter"):
        before = routed()
        if change == "data":  # new storage without a version bump
            other_B.weight.data = other_B.weight.data * 2 + 0.1
        else:  # a new Parameter object
            other_B.weight = torch.nn.Parameter(other_B.weight.detach() - 0.3)
        assert not torch.allclose(routed()[2], before[2])
        for i in range(len(names)):
            torch.testing.assert_close(routed()[i:i + 1], alone(i), atol=1e-6, rtol=1e-5)


def test_engine_rejects_unsupported_tasks(smollm2_session) -> None:
    from lorakit.serve import ServeError

    with pytest.raises(ServeError):
        Engine(smollm2_session.model, smollm2_session.tokenizer, "image-classification", "x")


def test_error_bodies_have_openai_types() -> None:
    from lorakit.serve import ServeError

    assert ServeError(429, "busy", code="queue_full").body() == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    kinds = {status: ServeError(status, "x", param="p").body()["error"]["type"] for status in (400, 401, 403, 404,
                                                                                               408, 413, 500, 503)}
    assert kinds == {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
                     500: "server_error", 503: "server_error"}
    assert json.loads(json.dumps(ServeError(400, "bad", param="p").body()))["error"]["param"] == "p"
