"""Per-task batching, forward, loss and held-out metrics, shared by training, `lorakit eval` and reports.

Tasks: ``sequence-classification`` (accuracy, macro-F1), ``causal-lm`` (answer-token loss, perplexity, and
for generated answers chrF and exact match), ``image-classification`` (accuracy, macro-F1).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as lkdata

TASKS = ("sequence-classification", "causal-lm", "image-classification")


def encode(task: str, rows: Sequence[dict], tokenizer: Any, max_length: int, image_size: int | None) -> dict[str, Tensor]:
    """Rows -> model inputs plus ``labels`` (classification: ``(batch,)``; causal LM: ``(batch, seq)``, -100 on
    prompt and padding tokens)."""
    if task == "sequence-classification":
        return lkdata.encode_classification(tokenizer, rows, max_length)
    if task == "causal-lm":
        return lkdata.encode_causal_lm(tokenizer, rows, max_length)
    if task == "image-classification":
        return lkdata.collate_images(rows, image_size, channels=3, normalize="imagenet")
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def forward(model: nn.Module, task: str, batch: dict[str, Tensor]) -> Tensor:
    """Logits: ``(batch, classes)`` or, for causal LM, ``(batch, seq, vocab)``."""
    if task == "image-classification":
        return model(batch["pixel_values"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits


def loss_sum(task: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy and the number of terms (rows, or answer tokens for causal LM), so that several
    micro-batches and processes can be averaged exactly over the global batch."""
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]  # token t predicts token t+1
        count = int((labels != -100).sum())
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=-100, reduction="sum")
        return total, count
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def batches(rows: Sequence[dict], size: int) -> Iterator[Sequence[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: str, rows: Sequence[dict], tokenizer: Any = None, *, batch_size: int = 32,
             max_length: int = 256, image_size: int | None = None, generate_examples: int = 0,
             max_new_tokens: int = 64, device: torch.device | None = None) -> dict[str, float]:
    """Held-out metrics of ``model`` on ``rows`` (model put in eval mode, then restored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    predictions: list[int] = []
    gold: list[int] = []
    try:
        for chunk in batches(rows, batch_size):
            batch = to_device(encode(task, chunk, tokenizer, max_length, image_size), device)
            logits = forward(model, task, batch)
            part, n = loss_sum(task, logits, batch["labels"])
            total += float(part)
            count += n
            if task != "causal-lm":
                pred = logits.argmax(-1)
                predictions += pred.tolist()
                gold += batch["labels"].tolist()
                correct += int((pred == batch["labels"]).sum())
        metrics = {"loss": total / max(1, count)}
        if task == "causal-lm":
            metrics["perplexity"] = math.exp(min(50.0, metrics["loss"]))
            if generate_examples:
                metrics.update(generation_metrics(model, tokenizer, rows[:generate_examples], max_new_tokens))
        else:
            metrics["accuracy"] = correct / max(1, len(gold))
            metrics["macro_f1"] = macro_f1(predictions, gold)
        metrics["examples"] = len(rows)
        return metrics
    finally:
        model.train(was_training)


def macro_f1(predictions: Sequence[int], gold: Sequence[int]) -> float:
    classes = sorted(set(gold) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
             streamer: Any = None) -> list[str]:
    """Greedy answers to chat prompts (the model's chat template), decoded without special tokens."""
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         streamer=streamer)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def generation_metrics(model: nn.Module, tokenizer: Any, rows: Sequence[dict], max_new_tokens: int,
                       batch_size: int = 8) -> dict[str, float]:
    """chrF (sacrebleu) and exact match of greedy answers against the reference completions."""
    import sacrebleu

    answers: list[str] = []
    for chunk in batches(rows, batch_size):
        answers += generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens)
    references = [r["completion"] for r in rows]
    return {
        "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references)) / max(1, len(rows)),
        "generated": len(rows),
    }
