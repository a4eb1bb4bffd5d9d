"""``lorakit generate``: text from a causal LM with zero, one or more adapters, streamed to the terminal.

Sampling takes the server's settings (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
``seed``, ``max_new_tokens``; checked by `lorakit.evaluate.check_sampling` before the model loads); temperature 0
(the default) is greedy. The server's OpenAI-only ``presence_penalty``/``frequency_penalty``, ``n`` and
``logprobs`` have no command-line form.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``lorakit generate``."""
    p = subparsers.add_parser("generate", help="generate text from a causal LM with adapters (greedy or sampled)",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="+", help="user message(s), answered one after another")
    p.add_argument("--base", default="smollm2", help="causal LM: packaged name, folder, .gguf file or hub id")
    p.add_argument("--adapter", action="append", default=[],
                   help="adapter folder (repeat to combine several: their updates are summed)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this share of the most likely one's probability (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL penalty on tokens already in the prompt or answer (1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (same seed, same text)")
    p.set_defaults(_run=run)


def run(args: argparse.Namespace) -> int:
    """Answer each prompt with the base model and the adapters, streamed as it is generated."""
    from transformers import TextStreamer

    from ..adapters import set_adapter
    from ..errors import ConfigError
    from ..evaluate import check_sampling, generate
    from ..io import load_adapter
    from ..models import load_model

    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    check_sampling(**sampling)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    loaded = load_model(args.base, task="causal-lm")
    loaded.model.eval()
    names = [load_adapter(loaded.model, path, adapter_name=f"a{i}") for i, path in enumerate(args.adapter)]
    if names:
        set_adapter(loaded.model, names)
    for prompt in args.prompt:
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate(loaded.model, loaded.tokenizer, [prompt], args.max_new_tokens, streamer=streamer, **sampling)
    return 0
