"""Memory planner: per-device training memory of LoRA, QLoRA or full fine-tuning from a model's config alone.

Only ``config.json`` is read (a 70B model's config is enough); no weights are loaded. `read_architecture` turns
a config into an `Architecture` (hidden size, layers, heads, MLP width, vocabulary, tied embeddings) whose
linear layers carry the Hugging Face module names, so LoRA targets are matched as `lorakit.inject` matches them
(name suffixes or ``all-linear``). `estimate_memory` adds up, per device:

- **base weights**: every parameter in the storage dtype; under ``qlora`` the adapted block linears stored as
  `lorakit.quant` stores them (int8: 1 byte + an fp32 scale per row; nf4: 4 bits + double-quantized absmax);
- **adapter**: LoRA's A and B (r x in + out x r per adapted matrix) in fp32, plus trained heads;
- **gradients** and **optimizer state** (AdamW: two moments) of the trained parameters;
- **activations**: what autograd keeps for the backward pass, counted per token and layer from the tensors
  each block saves (`layer_activation_elements`; counted with ``torch.autograd.graph.saved_tensors_hooks`` on
  the packaged Llama and BERT models), or only the block inputs plus one block under gradient checkpointing;
- **workspace**: transients at the peak: the loss head (logits, their gradient, one fp32 block), one
  block's backward buffers, the dequantized weight of a quantized layer, FSDP's gathered units.

Sharding: ``ddp`` keeps everything whole on each device; ``fsdp`` divides weights, adapter, gradients and
optimizer state by the number of devices (FSDP2, ``fully_shard`` per block) and adds two gathered blocks.
Activations are per device (``batch`` is the micro-batch of one device).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("lora", "qlora", "full")
SHARDING = ("ddp", "fsdp")
#: model_type -> family: decoder blocks with a gated (SwiGLU) MLP, decoder blocks with a plain MLP, encoders
FAMILIES = {
    "llama": "gated", "mistral": "gated", "qwen2": "gated", "qwen3": "gated", "gemma": "gated",
    "gemma2": "gated", "olmo": "gated", "opt": "plain", "bert": "encoder", "roberta": "encoder",
    "xlm-roberta": "encoder",
}


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear`` of the model: module-name suffix, shape, how many there are in the model."""

    name: str
    in_features: int
    out_features: int
    count: int = 1
    in_block: bool = True  # inside a repeated transformer block (quantized under qlora)


@dataclass(frozen=True)
class Architecture:
    """What memory depends on, read from a config (see `read_architecture`)."""

    name: str
    model_type: str
    family: str  # gated | plain | encoder
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    task: str  # causal-lm | sequence-classification | base
    position_embeddings: int = 0  # learned absolute positions (0: rotary)
    type_vocab: int = 0
    bias: bool = False
    num_labels: int = 2
    attention_dropout: bool = False  # eager attention keeps its probabilities (and mask) for backward
    hidden_dropout: bool = False
    linears: tuple[Linear, ...] = field(default=())

    def other_parameters(self) -> int:
        """Parameters outside the linear layers: embeddings, norms, biases."""
        norm = 2 * self.hidden if self.family != "gated" else self.hidden  # LayerNorm: weight + bias
        n = self.vocab * self.hidden + self.position_embeddings * self.hidden + self.type_vocab * self.hidden
        n += norm * (2 * self.layers + 1)  # two norms per block, one final (embedding norm for encoders)
        if self.bias:
            n += sum(lin.out_features * lin.count for lin in self.linears)
        return n

    def parameter_count(self) -> int:
        return self.other_parameters() + sum(lin.in_features * lin.out_features * lin.count for lin in self.linears)


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ConfigError(f"config.json has none of {list(keys)}; the planner needs it")
    return default


def architecture_from_config(config: dict[str, Any], task: str = "causal-lm", name: str = "model") -> Architecture:
    """`Architecture` of a Hugging Face ``config.json`` dictionary (model types in `FAMILIES`)."""
    model_type = str(config.get("model_type", ""))
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{name}: model_type {model_type!r} is not known to the planner "
                          f"(fix: one of {', '.join(sorted(FAMILIES))}, or a config.json written in one of them)")
    h = int(_get(config, "hidden_size", "d_model"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    f = int(_get(config, "intermediate_size", "ffn_dim"))
    n_layers = int(_get(config, "num_hidden_layers"))
    vocab = int(_get(config, "vocab_size"))
    per_layer: list[tuple[str, int, int]]
    if family == "encoder":
        per_layer = [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                     ("attention.output.dense", h, h), ("intermediate.dense", h, f), ("output.dense", f, h)]
    elif family == "gated":
        per_layer = [("self_attn.q_proj", h, heads * head_dim), ("self_attn.k_proj", h, kv * head_dim),
                     ("self_attn.v_proj", h, kv * head_dim), ("self_attn.o_proj", heads * head_dim, h),
                     ("mlp.gate_proj", h, f), ("mlp.up_proj", h, f), ("mlp.down_proj", f, h)]
    else:  # OPT: separate q/k/v with bias, fc1/fc2
        per_layer = [("self_attn.q_proj", h, h), ("self_attn.k_proj", h, h), ("self_attn.v_proj", h, h),
                     ("self_attn.out_proj", h, h), ("fc1", h, f), ("fc2", f, h)]
    linears = [Linear(n, i, o, n_layers) for n, i, o in per_layer]
    tied = bool(config.get("tie_word_embeddings", family != "gated"))
    if task == "causal-lm" and not tied:
        linears.append(Linear("lm_head", h, vocab, in_block=False))
    if family == "encoder":
        linears.append(Linear("pooler.dense", h, h, in_block=False))
    if task == "sequence-classification":
        linears.append(Linear("classifier" if family == "encoder" else "score", h,
                              int(config.get("num_labels") or 2), in_block=False))
    bias = family != "gated" or bool(config.get("attention_bias") or config.get("mlp_bias"))
    positions = int(config.get("max_position_embeddings") or 0) if family != "gated" else 0
    if model_type == "opt":
        positions += 2  # OPT's learned positions are offset by 2
    return Architecture(
        name=name, model_type=model_type, family=family, hidden=h, intermediate=f, layers=n_layers, heads=heads,
        kv_heads=kv, head_dim=head_dim, vocab=vocab, tied_embeddings=tied, task=task, position_embeddings=positions,
        type_vocab=int(config.get("type_vocab_size") or 0), bias=bias,
        num_labels=int(config.get("num_labels") or 2),
        attention_dropout=float(config.get("attention_probs_dropout_prob", config.get("attention_dropout")) or 0) > 0,
        hidden_dropout=float(config.get("hidden_dropout_prob", config.get("dropout")) or 0) > 0,
        linears=tuple(linears))


def read_architecture(model_or_config: str, task: str | None = None) -> Architecture:
    """`Architecture` of a ``config.json`` file, a folder holding one, or a packaged model name (its folder's
    config; nothing else is read). ``task`` defaults to causal-lm for decoders, base for encoders."""
    path = Path(model_or_config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        from .models import PACKAGED_MODELS, model_path

        if model_or_config not in PACKAGED_MODELS:
            raise ConfigError(f"{model_or_config!r} is not a config.json, a folder with one, or a packaged model "
                              f"(fix: give the path of the model's config.json)")
        path = model_path(model_or_config) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist (fix: give a folder holding config.json, or the file itself)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object")
    family = FAMILIES.get(str(config.get("model_type", "")))
    task = task or ("base" if family == "encoder" else "causal-lm")
    return architecture_from_config(config, task=task, name=str(config.get("_lorakit_name") or model_or_config))


@dataclass(frozen=True)
class PlanRequest:
    """One training setting to plan. ``batch`` is the micro-batch of one device."""

    method: str = "lora"  # lora | qlora | full
    quantize: str | None = None  # qlora: int8 | nf4 (default nf4)
    devices: int = 1
    sharding: str = "ddp"
    batch: int = 1
    seq: int = 512
    gradient_checkpointing: bool = False
    dtype: str = "bf16"  # storage (and compute) dtype of the base; LoRA weights and AdamW state are fp32
    r: int = 8
    targets: str = "all-linear"  # all-linear or comma-separated module-name suffixes
    lora_dropout: float = 0.0  # > 0: a 1-byte keep-mask of each adapted layer's input is saved for backward
    device_type: str = "cuda"  # cuda: AdamW's foreach step needs a copy of the trained tensors; cpu: per tensor
    device_memory: int | None = None  # bytes of one device

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sharding not in SHARDING:
            raise ConfigError(f"--sharding must be ddp or fsdp, got {self.sharding!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.quantize not in (None, "int8", "nf4"):
            raise ConfigError(f"--quantize must be int8 or nf4, got {self.quantize!r}")
        if self.quantize and self.method != "qlora":
            raise ConfigError("a quantized base is planned with --method qlora")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for key in ("devices", "batch", "seq", "r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key} must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class Estimate:
    """Bytes per device by component; ``total`` is the estimated peak."""

    base_weights: int
    adapter: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int
    trainable_parameters: int
    total_parameters: int
    #: CPU memory of one process while the base loads: the whole base in its stored dtype (quantized as it is
    #: read), before it is sharded or moved to the device; N processes on a node hold N of it at once
    host_loading: int = 0

    @property
    def total(self) -> int:
        return (self.base_weights + self.adapter + self.gradients + self.optimizer_state + self.activations
                + self.workspace)

    def components(self) -> dict[str, int]:
        return {"base weights": self.base_weights, "adapter": self.adapter, "gradients": self.gradients,
                "optimizer state": self.optimizer_state, "activations": self.activations,
                "workspace": self.workspace}


def _matches(name: str, targets: str) -> bool:
    """`lorakit.inject`'s suffix rule: ``all-linear`` is every linear but the output layers."""
    if targets == "all-linear":
        return name not in ("lm_head", "classifier", "score")
    return any(name == t or name.endswith("." + t) for t in targets.split(","))


def adapted_linears(arch: Architecture, targets: str) -> list[Linear]:
    adapted = [lin for lin in arch.linears if _matches(lin.name, targets)]
    if not adapted:
        names = ", ".join(lin.name for lin in arch.linears)
        raise ConfigError(f"targets {targets!r} match no linear layer of {arch.name} (its linears: {names})")
    return adapted


def quantized_bytes(lin: Linear, scheme: str) -> int:
    """Stored bytes of one quantized weight (`lorakit.quant`'s layouts)."""
    n = lin.in_features * lin.out_features
    if scheme == "int8":
        return n + 4 * lin.out_features
    blocks = math.ceil(n / 64)  # 4-bit codes + one int8 absmax per 64 + an fp32 scale per 256 absmax
    return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4


def layer_activation_elements(arch: Architecture, trained: set[str], adapted: int, r: int, seq: int,
                              norms_train: bool = False, device_type: str = "cpu") -> tuple[int, int]:
    """Elements autograd saves per token in one block: ``(in the compute dtype, in fp32)``.

    Counted from the tensors each block saves (``saved_tensors_hooks`` on the packaged models): the inputs of
    both norms; attention's q, k, v and output (fused attention also keeps a per-head log-sum-exp); the MLP's
    intermediates (SwiGLU: gate, up and act(gate); ReLU/GELU: one); the input of a linear only when its weight
    trains or carries LoRA (a frozen weight needs no input for its gradient); LoRA's ``A x`` (r per adapted
    matrix); RMSNorm's normalized input before its weight when the norm weights train (full fine-tuning).
    BERT's attention with dropout on a CPU keeps q, k, v and the probabilities (with the dropout mask and the
    dropped copy: 3 x heads x seq per token) in the model's dtype (`lorakit.precision.low_precision_attention`
    runs a bf16 base's attention eager: torch's math kernel would keep them in fp32); on CUDA a fused kernel
    keeps q, k, v, its output and a log-sum-exp. The post-norm block keeps
    both dropout masks.
    """
    h, f, a = arch.hidden, arch.intermediate, arch.heads
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim

    def trains(*names: str) -> bool:  # exact `Linear.name`s of this family
        return any(name in trained for name in names)

    fp32 = 0
    if arch.family == "encoder":
        n = 2 * h + f  # both LayerNorm inputs; GELU input
        if device_type == "cpu" and arch.attention_dropout:  # eager attention, in the model's dtype
            n += 3 * h + a * seq * 3
            n += h * trains("attention.output.dense")  # the context, input of the output projection
        else:
            n += 3 * h + h + a
        n += 2 * h if arch.hidden_dropout else 0
        n += h * trains("attention.self.query", "attention.self.key", "attention.self.value")
        n += h * trains("intermediate.dense") + f * trains("output.dense")
    else:
        n = 2 * h + q + 2 * kv + q + a  # norm inputs; q, k, v; attention output; log-sum-exp
        n += h * trains("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        n += h * trains("mlp.gate_proj", "mlp.up_proj", "fc1")
        if arch.family == "gated":
            n += 3 * f + f * trains("mlp.down_proj") + 2 * h * norms_train
        else:
            n += f + (2 * h if arch.hidden_dropout else 0)  # ReLU output (= fc2's input); dropout masks
    return n + r * adapted, fp32


@dataclass(frozen=True)
class _Parts:
    """Per-device bytes of one request before the peak is chosen."""

    base: int  # weights, sharded under fsdp
    base_whole: int  # weights, unsharded
    adapter: int  # trained LoRA / head weights (full: 0, the base trains)
    grads: int
    optimizer: int
    activations: int  # saved for backward at the start of the backward pass
    head: int  # loss head at its peak: logits, their gradient and one fp32 block (causal LM, chunked loss)
    logits: int  # logits held by the training step through backward and the optimizer step
    block_work: int  # one block's backward buffers (+ a dequantized weight, + FSDP's gathered blocks)
    step_work: int  # AdamW's temporaries
    trainable: int
    total_params: int


def _parts(arch: Architecture, req: PlanRequest) -> _Parts:
    cb = DTYPE_BYTES[req.dtype]  # storage = compute dtype of the base
    n_dev = req.devices if req.sharding == "fsdp" else 1
    tokens = req.batch * req.seq
    full = req.method == "full"
    adapted = [] if full else adapted_linears(arch, req.targets)
    heads = [lin for lin in arch.linears if lin.name in ("classifier", "score")]  # trained with LoRA (modules_to_save)
    trained = {lin.name for lin in (arch.linears if full else adapted)}
    scheme = (req.quantize or "nf4") if req.method == "qlora" else None
    base = arch.other_parameters() * cb
    for lin in arch.linears:
        quantize = scheme is not None and lin.name not in ("lm_head", "classifier", "score")
        base += lin.count * (quantized_bytes(lin, scheme) if quantize else lin.in_features * lin.out_features * cb)
    lora = sum(lin.count * req.r * (lin.in_features + lin.out_features) for lin in adapted)
    head_params = sum(lin.in_features * lin.out_features + lin.out_features for lin in heads)
    trainable = arch.parameter_count() if full else lora + head_params
    state_bytes = cb if full else 4  # AdamW keeps moments in the parameter's dtype; adapters are fp32
    adapter = 0 if full else trainable * 4
    adapted_per_block = sum(1 for lin in adapted if lin.in_block)
    low, high = layer_activation_elements(arch, trained, adapted_per_block, req.r, req.seq, norms_train=full,
                                          device_type=req.device_type)
    block_bytes = low * cb + high * 4
    if req.lora_dropout > 0 and not full:  # lorakit keeps a boolean mask per adapted input, not a dropped copy
        block_bytes += sum(lin.in_features for lin in adapted if lin.in_block)
    h, v = arch.hidden, arch.vocab
    embed = 2 * h if arch.family == "encoder" else 0  # embedding LayerNorm input, dropout mask
    if req.gradient_checkpointing:  # block inputs only; one block is recomputed at a time
        acts = tokens * ((arch.layers * h + embed + 2 * h) * cb + block_bytes)
    else:
        acts = tokens * ((embed + 2 * h) * cb + arch.layers * block_bytes)
    causal = arch.task == "causal-lm"
    logits = tokens * v * cb if causal else 0
    # `lorakit.evaluate.chunked_cross_entropy`: the logits and their gradient in the compute dtype, plus one
    # fp32 block of CE_BLOCK_ELEMENTS (its softmax is computed in place) instead of a whole fp32 log-softmax
    from .evaluate import CE_BLOCK_ELEMENTS

    head = tokens * v * 2 * cb + min(tokens, max(1, CE_BLOCK_ELEMENTS // v)) * v * 4 if causal else 0
    attn_grad = arch.heads * req.seq if arch.family == "encoder" else 0
    block_work = 2 * tokens * (arch.intermediate + attn_grad) * cb
    if scheme is not None:  # the frozen weight is dequantized for each product, one layer at a time
        block_work += max(lin.in_features * lin.out_features for lin in arch.linears) * cb
    largest = max([lin.in_features * lin.out_features for lin in arch.linears] + [v * h if full else 0])
    block_params = sum(lin.in_features * lin.out_features for lin in arch.linears if lin.in_block) // arch.layers
    block_params += 4 * h if arch.family != "gated" else 2 * h  # norms
    if req.sharding == "fsdp" and req.devices > 1:  # the current and the prefetched block, gathered
        block_work += 2 * block_params * cb + (block_params * cb if full else 0)
    grads = trainable * (cb if full else 4)
    if req.device_type == "cuda":
        step_work = grads // n_dev  # foreach AdamW: one temporary per trained tensor, all at once
    else:
        # one tensor at a time: two temporaries of the largest trained tensor
        lora_largest = max([req.r * max(lin.in_features, lin.out_features) for lin in adapted] +
                           [lin.in_features * lin.out_features for lin in heads] + [0])
        step_work = 2 * (largest if full else lora_largest) * state_bytes
    if req.sharding == "ddp" and req.devices > 1:
        block_work += grads  # DDP's gradient buckets
    return _Parts(base=base // n_dev, base_whole=base, adapter=adapter // n_dev, grads=grads // n_dev,
                  optimizer=2 * trainable * state_bytes // n_dev, activations=acts, head=head, logits=logits,
                  block_work=block_work, step_work=step_work, trainable=trainable,
                  total_params=arch.parameter_count())


def estimate_memory(arch: Architecture, req: PlanRequest) -> Estimate:
    """Per-device peak of one training step, with what is alive at that moment.

    The peak is the larger of two moments: the start of the backward pass (every saved activation, the loss
    head's buffers, one block's backward buffers; only the trained head's gradients exist yet) and the
    optimizer step (all gradients, the logits the step still holds, AdamW's temporaries).
    """
    req.check()
    p = _parts(arch, req)
    static_w, static_a, static_o = p.base, p.adapter, p.optimizer
    backward = p.activations + p.head + p.block_work
    step = p.grads + p.logits + p.step_work
    if backward >= step:
        return Estimate(static_w, static_a, 0, static_o, p.activations, backward - p.activations,
                        p.trainable, p.total_params, p.base_whole)
    return Estimate(static_w, static_a, p.grads, static_o, 0, p.logits + p.step_work, p.trainable, p.total_params,
                    p.base_whole)


def parse_bytes(text: str) -> int:
    """``80GB``, ``80GiB``, ``24g``, ``512MB`` -> bytes (GB = 10^9, GiB = 2^30; a bare number is GB)."""
    units = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount <= 0 or unit not in units:
        raise ConfigError(f"device memory {text!r} is not a size (fix: e.g. 80GB, 24GiB, 512MB)")
    return int(amount * units[unit])


#: changes tried in order, each on top of the previous ones, when a setting does not fit
_FALLBACKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("bf16 base", {"dtype": "bf16"}),
    ("a 4-bit (nf4) base", {"method": "qlora", "quantize": "nf4"}),
)


def smallest_fit(arch: Architecture, req: PlanRequest) -> tuple[PlanRequest, Estimate] | None:
    """The first setting that fits ``req.device_memory``: the changes of `_FALLBACKS` applied one after another
    (a full fine-tune keeps its method), each at the request's batch then at batch 1, then the same with FSDP
    over 2, 4, ... 1024 devices. None if nothing fits (or no device memory was given)."""
    if req.device_memory is None:
        return None
    candidate = req
    steps = [{}] + [change for label, change in _FALLBACKS if not (req.method == "full" and "method" in change)]
    tried: list[PlanRequest] = []
    for change in steps:
        if change.get("dtype") == "bf16" and candidate.dtype != "fp32":
            continue
        candidate = replace(candidate, **change)
        tried.append(candidate)
    for devices in [req.devices] + [2**k for k in range(1, 11) if 2**k > req.devices]:
        for batch in ([req.batch, 1] if req.batch > 1 else [1]):
            for base in tried:
                option = replace(base, devices=devices, batch=batch,
                                 sharding="fsdp" if devices > req.devices else base.sharding)
                estimate = estimate_memory(arch, option)
                if estimate.total <= req.device_memory:
                    return option, estimate
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def describe(req: PlanRequest) -> str:
    """One line of a request's settings, as ``lorakit plan`` options."""
    method = f"{req.method}" + (f" ({req.quantize or 'nf4'})" if req.method == "qlora" else "")
    parts = [method, f"--devices {req.devices}", f"--sharding {req.sharding}", f"--batch {req.batch}",
             f"--seq {req.seq}", f"--dtype {req.dtype}"]
    if req.method != "full":
        parts.append(f"--r {req.r} --targets {req.targets}")
    if req.gradient_checkpointing:
        parts.append("--gradient-checkpointing")
    return " ".join(parts)


def format_plan(arch: Architecture, req: PlanRequest, estimate: Estimate) -> str:
    """The planner's table: components per device, total, verdict and the smallest setting that fits."""
    lines = [f"{arch.name}: {arch.model_type}, {estimate.total_parameters / 1e9:.3f}B parameters, "
             f"{estimate.trainable_parameters:,} trained",
             f"setting: {describe(req)}", "",
             f"| {'per device':<16} | {'memory':>12} |", f"|{'-' * 18}|{'-' * 13}:|"]
    for label, value in estimate.components().items():
        lines.append(f"| {label:<16} | {_size(value):>12} |")
    lines.append(f"| {'total (peak)':<16} | {_size(estimate.total):>12} |")
    per_node = f"; {req.devices} processes on one node hold {req.devices}x that at once" if req.devices > 1 else ""
    lines += ["", f"host (CPU) memory while the base loads: {_size(estimate.host_loading)} per process (the whole "
                  f"base in its stored dtype, before it is sharded or moved to the device{per_node})"]
    if req.device_memory is not None:
        fits = estimate.total <= req.device_memory
        lines += ["", f"device memory {_size(req.device_memory)}: {'fits' if fits else 'does not fit'}"]
        if not fits:
            found = smallest_fit(arch, req)
            lines.append(f"smallest setting that fits: {describe(found[0])} ({_size(found[1].total)})" if found
                         else "nothing fits, even sharded over 1024 devices with a 4-bit base and batch 1")
    return "\n".join(lines)
