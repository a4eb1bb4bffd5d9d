"""Per-task batching, forward, loss and held-out metrics, shared by training, `lorakit eval` and reports.

Tasks: ``sequence-classification`` (accuracy, macro-F1), ``causal-lm`` (answer-token loss, perplexity, and
for generated answers chrF and exact match), ``image-classification`` (accuracy, macro-F1).

`loss_terms` is the one count of what a loss sums over (rows, or answer tokens), used by every loop that
averages a loss over a global batch. `generate` answers prompts through the chat template, or in the plain
prompt + separator format when the tokenizer has none, and stops at EOS or the template's end-of-turn token.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as lkdata
from .data import IGNORE_INDEX, PLAIN_SEPARATOR, DataError, has_chat_template, plain_prompt_ids
from .errors import ConfigError
from .tasks import get_task


def encode(task: str, rows: Sequence[dict], tokenizer: Any, max_length: int, image_size: int | None,
           separator: str = PLAIN_SEPARATOR, multiple: int = 1) -> dict[str, Tensor]:
    """Rows -> model inputs plus ``labels`` (classification: ``(batch,)``; causal LM: ``(batch, seq)``, -100 on
    prompt and padding tokens). ``separator`` joins prompt and completion for a model without chat template;
    ``multiple``: text batches padded to a multiple of that many tokens (`lkdata.pad_multiple`)."""
    get_task(task)  # an unknown name is a ConfigError naming the tasks
    if task == "sequence-classification":
        batch = lkdata.encode_classification(tokenizer, rows, max_length)
    elif task == "causal-lm":
        batch = lkdata.encode_causal_lm(tokenizer, rows, max_length, separator)
    else:
        return lkdata.collate_images(rows, image_size, channels=3, normalize="imagenet")
    return batch if multiple == 1 else lkdata.pad_to_multiple(batch, tokenizer.pad_token_id, max_length, multiple)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype most of ``model``'s parameter elements are stored in: the base's (a bf16 base with
    fp32 adapters computes in bf16)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def forward(model: nn.Module, task: str, batch: dict[str, Tensor]) -> Tensor:
    """Logits: ``(batch, classes)`` or, for causal LM, ``(batch, seq, vocab)``."""
    if task == "image-classification":
        return model(batch["pixel_values"])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits


def loss_terms(task: str, labels: Tensor) -> int:
    """How many terms a loss over ``labels`` sums: answer tokens for causal LM (``labels`` (N, L), counted
    from position 1 since token t predicts token t+1, ``-100`` excluded), rows otherwise (``labels`` (N,)).

    The one count every loop divides by, so micro-batches and processes average exactly over the global batch.
    """
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.numel())


def loss_sum(task: str, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy and `loss_terms` (rows, or answer tokens for causal LM), so that several
    micro-batches and processes can be averaged exactly over the global batch.

    Causal LM goes through `chunked_cross_entropy`: the fp32 log-probabilities of ``(batch, seq, vocab)``
    logits never exist whole (SmolLM2's 8 x 192-token batch: 288 MiB each in fp32)."""
    if task == "causal-lm":
        # token t predicts token t+1: shift the labels rather than slice the logits, whose (batch, seq - 1)
        # slice could not be flattened without a copy; the last position gets no target
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        total = chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return total, loss_terms(task, labels)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), loss_terms(task, labels)


#: fp32 elements of logits handled at once by `chunked_cross_entropy` (16 MiB a block)
CE_BLOCK_ELEMENTS = 1 << 22


def chunked_cross_entropy(logits: Tensor, targets: Tensor, block_elements: int = CE_BLOCK_ELEMENTS) -> Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")`` without its fp32
    copies of the whole ``logits``.

    Args:
        logits: ``(N, V)`` in any float dtype (bf16 logits of a bf16 model stay bf16).
        targets: ``(N,)`` class ids, ``IGNORE_INDEX`` for rows outside the loss.
        block_elements: how many fp32 logits one block upcasts at a time.

    Returns the fp32 scalar sum over the rows with a target. Only those rows are computed, a block of about
    ``block_elements / V`` rows at a time, in fp32; forward keeps ``logsumexp`` ``(n,)`` and backward
    recomputes each block's softmax, so the gradient ``softmax - onehot`` (the same formula as the plain
    loss's) is written in ``logits``' dtype. Peak beyond ``logits``: one block, and the gradient in backward.
    """
    return _ChunkedCrossEntropy.apply(logits, targets, max(1, block_elements // max(1, logits.shape[-1])))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward/backward of `chunked_cross_entropy` over blocks of ``rows`` rows (with a target)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, rows: int) -> Tensor:
        index = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) rows in the loss
        picked_targets = targets.index_select(0, index)
        lse = torch.empty(index.numel(), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, index.numel(), rows):
            block = logits.index_select(0, index[start:start + rows]).float()  # (rows, V)
            lse[start:start + rows] = torch.logsumexp(block, dim=1)
            gold = block.gather(1, picked_targets[start:start + rows, None]).squeeze(1)
            total += (lse[start:start + rows] - gold).sum()
            del block  # before the next block is made: one fp32 block at a time
        ctx.rows = rows
        ctx.save_for_backward(logits, index, picked_targets, lse)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None, None]:
        logits, index, picked_targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # rows outside the loss get exactly 0, as in the plain loss
        for start in range(0, index.numel(), ctx.rows):
            rows = index[start:start + ctx.rows]
            block = logits.index_select(0, rows).float()
            block.sub_(lse[start:start + ctx.rows, None]).exp_()  # softmax, (rows, V), in place
            block.scatter_add_(1, picked_targets[start:start + ctx.rows, None],
                               torch.full((rows.numel(), 1), -1.0, device=block.device))
            grad.index_copy_(0, rows, block.mul_(grad_total).to(grad.dtype))
            del block
        return grad, None, None


def batches(rows: Sequence[dict], size: int) -> Iterator[Sequence[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, task: str, rows: Sequence[dict], tokenizer: Any = None, *, batch_size: int = 32,
             max_length: int = 256, image_size: int | None = None, generate_examples: int = 0,
             max_new_tokens: int = 64, device: torch.device | None = None,
             separator: str = PLAIN_SEPARATOR, progress: str | None = None) -> dict[str, float]:
    """Held-out metrics of ``model`` on ``rows`` (model put in eval mode, then restored). ``progress``: the title
    of a progress bar over the batches (stderr), e.g. for a long baseline evaluation.

    Raises `DataError` when there is nothing to measure (no rows, or no answer token left after truncation):
    a metric over 0 examples would read as a result.
    """
    if len(rows) == 0:
        raise DataError("no held-out examples to evaluate on: the split is empty (fix: more rows, or give a "
                        "validation/test file)")
    device = device or next(model.parameters()).device
    multiple = lkdata.pad_multiple(compute_dtype(model), device)
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    predictions: list[int] = []
    gold: list[int] = []
    try:
        chunks: Any = batches(rows, batch_size)
        if progress is not None:
            import sys

            from tqdm.auto import tqdm

            chunks = tqdm(chunks, total=-(-len(rows) // batch_size), desc=progress, unit="batch", file=sys.stderr,
                          leave=False, dynamic_ncols=True)
        for chunk in chunks:
            batch = to_device(encode(task, chunk, tokenizer, max_length, image_size, separator, multiple), device)
            logits = forward(model, task, batch)
            part, n = loss_sum(task, logits, batch["labels"])
            total += float(part)
            count += n
            if task != "causal-lm":
                pred = logits.argmax(-1)
                predictions += pred.tolist()
                gold += batch["labels"].tolist()
                correct += int((pred == batch["labels"]).sum())
        if count == 0:
            raise DataError(f"none of the {len(rows)} held-out examples has an answer token within "
                            f"max_length={max_length} (fix: a larger train.max_length, or shorter prompts)")
        metrics = {"loss": total / count}
        if task == "causal-lm":
            metrics["perplexity"] = math.exp(min(50.0, metrics["loss"]))
            if generate_examples:
                metrics.update(generation_metrics(model, tokenizer, rows[:generate_examples], max_new_tokens,
                                                  separator=separator))
        else:
            metrics["accuracy"] = correct / len(gold)
            metrics["macro_f1"] = macro_f1(predictions, gold)
        metrics["examples"] = len(rows)
        return metrics
    finally:
        model.train(was_training)
        from .sharding import is_sharded, reshard

        if is_sharded(model):  # a forward without backward leaves FSDP's root unit gathered: back to the shards
            reshard(model)


def macro_f1(predictions: Sequence[int], gold: Sequence[int]) -> float:
    classes = sorted(set(gold) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(predictions, gold))
        fp = sum(p == c and g != c for p, g in zip(predictions, gold))
        fn = sum(p != c and g == c for p, g in zip(predictions, gold))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token(s) the chat template closes an assistant turn with (``<|im_end|>`` for SmolLM2,
    ``<|eot_id|>`` for Llama 3); empty without a chat template.

    Found by rendering a reply with a marker and reading the special tokens right after the marker.
    """
    if not has_chat_template(tokenizer):
        return []
    marker = "LORAKIT_END_OF_TURN_PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a turn simply has no end-of-turn to find
        return []
    if marker not in text:
        return []
    after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    found: list[int] = []
    for token in after:
        if token not in special:
            break  # whitespace after the end-of-turn marker: the turn has ended
        found.append(token)
    return found


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """Every id generation stops at: the tokenizer's EOS, the model's ``generation_config.eos_token_id`` (an id
    or a list) and the chat template's end-of-turn token(s)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    ids += end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(int(i) for i in ids))


def check_sampling(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   min_p: float = 0.0, repetition_penalty: float = 1.0) -> None:
    """Refuse sampling settings that would fail or silently misbehave in `generate` (`ConfigError`).

    ``temperature`` 0 is greedy, else a finite value in [1e-3, 100]; ``top_p`` in (0, 1]; ``top_k`` >= 0
    (0: off); ``seed`` None or an integer in [0, 2**63); ``min_p`` in [0, 1] (0: off); ``repetition_penalty``
    in (0, 10] (1: off).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature == 0 or 1e-3 <= temperature <= 100):
        raise ConfigError(f"temperature must be 0 (greedy) or a number in [0.001, 100], not {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be a number in (0, 1], not {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0: off), not {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ConfigError(f"seed must be an integer in [0, 2**63), not {seed!r}")
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise ConfigError(f"min_p must be a number in [0, 1] (0: off), not {min_p!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) or not (
            0 < repetition_penalty <= 10):
        raise ConfigError(f"repetition_penalty must be a number in (0, 10] (1: off), not {repetition_penalty!r}")


def _prompt_ids(tokenizer: Any, prompts: Sequence[str], separator: str) -> list[list[int]]:
    """Token ids each prompt is answered after: the chat template's user turn + assistant header, or the plain
    format's ``[BOS] prompt + separator`` (as `lorakit.data.encode_causal_lm` trains them)."""
    if not has_chat_template(tokenizer):
        return [plain_prompt_ids(tokenizer, p, separator) for p in prompts]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64,
             streamer: Any = None, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, separator: str = PLAIN_SEPARATOR, min_p: float = 0.0,
             repetition_penalty: float = 1.0) -> list[str]:
    """Answers to user prompts, decoded without special tokens.

    Prompts go through the model's chat template, or the plain ``prompt + separator`` format when the
    tokenizer has none. Decoding stops at any of `stop_token_ids` (EOS and the template's end-of-turn). Greedy
    when ``temperature`` is 0; otherwise sampled with ``top_p`` / ``top_k`` / ``min_p`` (0: off), seeded by
    ``seed`` (the global RNG is restored afterwards). ``repetition_penalty`` (CTRL, as transformers and the
    server apply it; 1: off) applies greedy or sampled. Settings are checked by `check_sampling`.
    """
    check_sampling(temperature, top_p, top_k, seed, min_p, repetition_penalty)
    device = next(model.parameters()).device
    encoded = _prompt_ids(tokenizer, prompts, separator)
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # left padding: generation continues at the right edge of every row
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": top_k,
                    "min_p": float(min_p) or None}
    else:  # greedy: clear the sampling defaults a model's generation_config may carry (they would warn)
        sampling.update(temperature=None, top_p=None, top_k=None, min_p=None)
    sampling["repetition_penalty"] = float(repetition_penalty) if repetition_penalty != 1 else None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stop_token_ids(tokenizer, model), streamer=streamer,
                             **sampling)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def generation_metrics(model: nn.Module, tokenizer: Any, rows: Sequence[dict], max_new_tokens: int,
                       batch_size: int = 8, separator: str = PLAIN_SEPARATOR) -> dict[str, float]:
    """chrF (sacrebleu) and exact match of greedy answers against the reference completions."""
    import sacrebleu

    answers: list[str] = []
    for chunk in batches(rows, batch_size):
        answers += generate(model, tokenizer, [r["prompt"] for r in chunk], max_new_tokens, separator=separator)
    references = [r["completion"] for r in rows]
    return {
        "chrf": sacrebleu.corpus_chrf(answers, [references]).score,
        "exact_match": sum(a.strip() == r.strip() for a, r in zip(answers, references)) / max(1, len(rows)),
        "generated": len(rows),
    }
