"""A server's settings (`ServeConfig`) and the error every handler answers with (`ServeError`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LorakitError

#: adapter names: letters, digits, ``-`` and ``_`` (no dots, no slashes: never a path)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

#: OpenAI's ``error.type`` for each HTTP status (anything else: invalid_request_error below 500, server_error)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}


class ServeError(LorakitError):
    """A request the server answers with an HTTP error status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API answers errors."""
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _option(default: Any, help: str) -> Any:
    """A `ServeConfig` field: its default, and the help of its ``lorakit serve`` option."""
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """Limits and sizes of a server. ``lorakit serve`` has one option per field (``--max-batch`` for
    ``max_batch``...) whose default and help come from here: this class is the one source of both."""

    max_batch: int = _option(32, "rows decoded together")
    max_queue: int = _option(256, "generations waiting for a row; more are refused with 429")
    max_tokens: int = _option(512, "largest max_tokens a request may ask for")
    max_context: int | None = _option(None, "prompt + max_tokens (None: the model's max_position_embeddings)")
    max_prefill_tokens: int = _option(2048, "prompt tokens prefilled in one step; a longer prompt is prefilled "
                                            "in chunks of this size while the others keep decoding")
    max_prompt_tokens: int | None = _option(None, "longest prompt in tokens (None: the context minus one); "
                                                  "prompts certainly over it are refused before tokenizing")
    max_body_bytes: int = _option(1 << 20, "largest request body in bytes; larger ones get 413 before parsing")
    max_adapter_bytes: int | None = _option(None, "largest adapter folder in bytes, checked before reading it "
                                                  "(None: the base model's parameter bytes)")
    request_timeout: float = _option(300.0, "seconds from arrival to the last token before a 408 (queue, "
                                            "prefill and decoding alike)")
    max_adapters: int = _option(32, "adapters held on the model at once (least recently used ones are unloaded)")
    prefix_cache_tokens: int = _option(4096, "prompt tokens whose keys/values are kept for prompts that start "
                                             "the same way (0: no prefix cache)")
    prefix_block: int = _option(8, "prompts share cached keys/values in blocks of this many tokens")
    admin_token: str | None = _option(None, "bearer token of the adapter admin endpoints (None: they answer 403)")
    device: str = _option("auto", "where the whole engine runs: cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: str = _option("auto", "parameter dtype of the served model: fp32, bf16, fp16, or auto (as loaded)")


#: --dtype names -> torch dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names; CUDA asked for where there is none is refused (one line, with the fix)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ServeError(400, f"unknown device {name!r} (fix: cpu, cuda, cuda:N or auto)", param="device") from None
    if device.type not in ("cpu", "cuda"):
        raise ServeError(400, f"lorakit serve runs on cpu or cuda, not {name!r} (fix: --device cpu|cuda|auto)",
                         param="device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ServeError(400, f"--device {name}: CUDA is not available on this machine (fix: --device cpu or "
                                  "auto)", param="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ServeError(400, f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                  "(fix: cuda:0 ... or cuda)", param="device")
    return device


def resolve_dtype(name: str) -> torch.dtype | None:
    """The dtype ``--dtype`` names (None for ``auto``: the model's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ServeError(400, f"unknown dtype {name!r} (fix: one of {', '.join(DTYPES)} or auto)", param="dtype")
    return DTYPES[name]
