"""Knowledge probes: the capability a model had before training, scored before and after it (the "LoRA forgets
less" claim). A probe uses text the recipe does not train on."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..data import IGNORE_INDEX
from ..errors import ConfigError
from ..evaluate import loss_sum

#: probe name -> (description, higher is better)
PROBES = {
    "faq-retrieval": ("FAQ answer retrieval by the encoder's mean-pooled sentence embeddings: mean reciprocal "
                      "rank of each English question's own answer among all 503 answers (cosine similarity)",
                      True),
    "general-perplexity": ("perplexity of the causal LM on 128 held-out Rotten Tomatoes review snippets (plain "
                           "text, no chat template), a domain no causal-LM recipe trains on", False),
    "faq-perplexity": ("perplexity of the causal LM on the 503 English FAQ answers (plain text)", False),
}


def probe_for(task: str, data: str) -> str | None:
    """The knowledge probe of a recipe: text the recipe does not train on; None where none applies."""
    if task == "sequence-classification":
        return None if data in ("faq-en", "faq-en-sv") else "faq-retrieval"
    if task == "causal-lm":
        return "faq-perplexity" if data == "rotten-tomatoes" else "general-perplexity"
    return None


@torch.no_grad()
def run_probe(probe: str, model: torch.nn.Module, tokenizer: Any, batch_size: int = 32,
              limit: int | None = None) -> float:
    """The probe's score for ``model`` (see `PROBES`), computed on the model's device; ``limit`` caps the texts
    (quick checks)."""
    from ..data import load_dataset

    model.eval()
    if probe == "faq-retrieval":
        rows = [row for split in load_dataset("faq-en") for row in split][:limit]
        questions = embed(model, tokenizer, [r["prompt"] for r in rows], batch_size)
        answers = embed(model, tokenizer, [r["completion"] for r in rows], batch_size)
        return mean_reciprocal_rank(questions @ answers.T)
    if probe == "general-perplexity":
        texts = [r["text"] for r in load_dataset("rotten-tomatoes").test.take(128)]
    elif probe == "faq-perplexity":
        texts = [r["completion"] for split in load_dataset("faq-en") for r in split]
    else:
        raise ConfigError(f"unknown probe {probe!r}; known: {sorted(PROBES)}")
    return text_perplexity(model, tokenizer, texts[:limit], batch_size)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def mean_reciprocal_rank(similarity: torch.Tensor) -> float:
    """``similarity`` ``(n, n)``: query i's right answer is column i. Mean of 1 / (its rank among the row)."""
    correct = similarity.diagonal().unsqueeze(1)
    ranks = (similarity > correct).sum(1) + 1
    return float((1.0 / ranks.double()).mean())


def embed(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states of the model's encoder (``model.base_model``):
    ``(len(texts), hidden)``."""
    encoder = getattr(model, "base_model", model)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=128,
                          return_tensors="pt").to(_device(model))
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


def text_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                    max_length: int = 128) -> float:
    """Token-level perplexity of plain texts (every token after the first predicted from those before)."""
    total, count = 0.0, 0
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(_device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            loss, terms = loss_sum("causal-lm", logits, labels)  # every real token after the first
            total += float(loss)
            count += terms
    finally:
        tokenizer.padding_side = side
    return math.exp(total / max(1, count))


# =========================================================================================================
