"""Batch encoders: rows -> model inputs. Text classification, causal LM (chat template or the plain
prompt + separator format of base models), and images.

Causal-LM rows are trained on their answer alone: ``labels`` are ``IGNORE_INDEX`` on prompt and padding.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .datasets import DataError

log = logging.getLogger("lorakit.data")


def encode_classification(tokenizer: Any, rows: Sequence[dict], max_length: int) -> dict[str, Tensor]:
    """Tokenize ``{"text", "label"}`` rows, padded to the longest row, truncated to ``max_length``.

    Returns ``input_ids`` (N, L), ``attention_mask`` (N, L), ``labels`` (N,), with L <= max_length.
    """
    batch = tokenizer([row["text"] for row in rows], padding="longest", truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)}


IGNORE_INDEX = -100  # label value cross-entropy skips (torch's default ``ignore_index``)


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]


def _chat_segments(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, for each, whether the loss sees it (assistant replies).

    Each message's tokens are the template's text for the conversation up to it minus the text before it, so
    the prompt tokens are exactly what generation sees after ``add_generation_prompt=True``. The reply's own
    tokens and its end-of-turn token are trained; whitespace the template puts after the end-of-turn is not.
    """
    ids: list[int] = []
    trained: list[bool] = []
    rendered = ""

    def extend(text: str, train: bool) -> None:
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(new)
        trained.extend([train] * len(new))

    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            prefix = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            if not prefix.startswith(rendered):
                raise DataError("the tokenizer's chat template does not render conversations by appending")
            extend(prefix[len(rendered):], False)
            rendered = prefix
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not full.startswith(rendered):
            raise DataError("the tokenizer's chat template does not render conversations by appending")
        start = len(ids)
        extend(full[len(rendered):], message["role"] == "assistant")
        if message["role"] == "assistant":  # untrain trailing whitespace after the end-of-turn token
            end = len(ids)
            while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
                end -= 1
                trained[end] = False
        rendered = full
    return ids, trained


PLAIN_SEPARATOR = "\n"  # between prompt and completion in the plain format (no chat template)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders conversations (chat format) or not (plain prompt + completion format)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _bos(tokenizer: Any) -> list[int]:
    """The BOS id when the tokenizer starts every text with it (Llama-style base models), else nothing.

    Read from what the tokenizer does (its post-processor), not from a flag some tokenizer classes lack.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    return [bos] if with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos] \
        else []


def plain_prompt_ids(tokenizer: Any, prompt: str, separator: str = PLAIN_SEPARATOR) -> list[int]:
    """Token ids a base model (no chat template) sees before its answer: [BOS] + ``prompt + separator``."""
    return _bos(tokenizer) + tokenizer(prompt + separator, add_special_tokens=False)["input_ids"]


def _plain_segments(tokenizer: Any, row: dict, separator: str) -> tuple[list[int], list[bool]]:
    """Plain format: the prompt and separator (not trained), then the completion and EOS (trained).

    Prompt and completion are tokenized apart, so the prompt tokens are exactly what generation sees.
    """
    if "messages" in row:
        raise DataError("chat rows ('messages') need a tokenizer with a chat template; this model has none (fix: "
                        "write prompt/completion rows, which a base model learns as prompt + separator + completion)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, so a completion could not end (fix: a tokenizer with one)")
    prompt = plain_prompt_ids(tokenizer, row["prompt"], separator)
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def encode_causal_lm(tokenizer: Any, rows: Sequence[dict], max_length: int,
                     separator: str = PLAIN_SEPARATOR) -> dict[str, Tensor]:
    """``{"prompt", "completion"}`` (or ``{"messages"}``) rows for causal-LM fine-tuning.

    With a chat template the prompt is the user turn and the completion the assistant turn. Without one (a
    base model) the plain format is used: ``[BOS] prompt + separator`` then ``completion + EOS``. ``labels``
    equal ``input_ids`` on the answer tokens and its end-of-turn / EOS token and are ``-100`` on the prompt
    and padding, so the loss is the answer's alone (HF models shift labels by one inside ``forward``). Right
    padding. A row longer than ``max_length`` keeps its prompt and loses the end of its answer; only a prompt
    that fills the whole budget loses its beginning instead (with a warning), keeping a quarter of
    ``max_length`` for the answer.

    Returns ``input_ids``, ``attention_mask``, ``labels``, each (N, L) with L <= max_length.
    """
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token (fix: tokenizer.pad_token = tokenizer.eos_token)")
    chat = has_chat_template(tokenizer)
    encoded = []
    for row in rows:
        ids, trained = _chat_segments(tokenizer, _messages(row)) if chat else _plain_segments(tokenizer, row, separator)
        if len(ids) > max_length:
            answer_start = trained.index(True) if True in trained else len(ids)
            cut = 0  # prompt tokens dropped from the front: only when not one answer token would fit
            if answer_start >= max_length:
                cut = answer_start - (max_length - min(len(ids) - answer_start, max(1, max_length // 4)))
                log.warning("a prompt of %d tokens leaves no room for its answer in max_length=%d: its first %d "
                            "tokens are dropped", answer_start, max_length, cut)
            ids, trained = ids[cut:cut + max_length], trained[cut:cut + max_length]
        encoded.append((ids, trained))
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, trained) in enumerate(encoded):
        row_ids = torch.tensor(ids, dtype=torch.long)
        input_ids[i, :len(ids)] = row_ids
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(ids)] = torch.where(torch.tensor(trained), row_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


#: text batches are padded to a multiple of this many tokens where matmul shapes are worth keeping few (see
#: `pad_multiple`)
PAD_MULTIPLE = 8


def pad_multiple(compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """How many tokens a text batch's length is rounded up to, for a model computing in ``compute_dtype`` on
    ``device``: `PAD_MULTIPLE` on a GPU (tensor-core tiles; HF's ``pad_to_multiple_of=8``) and for bf16/fp16
    compute on a CPU, where torch runs matmuls through oneDNN, which compiles a primitive per matmul shape and
    caches up to 1,024 of them: with rows padded to the longest only, every batch length is a new set of shapes
    (the default recipe on a bf16 base held 1,595 MiB resident, 772 MiB padded; benchmarks/dtype_memory.py).
    1 for fp32 on a CPU: MKL keeps nothing per shape there and padding is only more work (the default recipe
    trained 10% longer padded)."""
    if torch.device(device).type != "cpu" or compute_dtype in (torch.bfloat16, torch.float16):
        return PAD_MULTIPLE
    return 1


def pad_to_multiple(batch: dict[str, Tensor], pad_token_id: int, max_length: int,
                    multiple: int = PAD_MULTIPLE) -> dict[str, Tensor]:
    """``batch`` (right-padded ``input_ids``, ``attention_mask`` and, for causal LM, ``labels`` ``(N, L)``)
    padded on the right to the next multiple of ``multiple`` tokens, at most ``max_length``: the extra positions
    are padding (mask 0, label ``IGNORE_INDEX``), so no row's outputs or loss change."""
    length = batch["input_ids"].shape[1]
    target = max(length, min(max_length, -(-length // multiple) * multiple))
    if target == length:
        return batch
    extra = target - length
    padded = dict(batch)
    padded["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id)
    padded["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0)
    if batch["labels"].dim() == 2:
        padded["labels"] = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    return padded


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_channels(image: Tensor, channels: int) -> Tensor:
    """uint8 (H, W) or (C, H, W) -> float (channels, H, W) in [0, 1]."""
    image = image.float().div(255)
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:  # grayscale fed to an RGB model: the same plane three times
        return image.expand(channels, -1, -1)
    if image.shape[0] == 3 and channels == 1:  # ITU-R BT.601 luma
        return (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    raise ConfigError(f"cannot turn a {image.shape[0]}-channel image into {channels} channels")


def _resize(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear; antialiased when shrinking so small details do not alias."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=min(images.shape[-2:]) > size)


def collate_images(rows: Sequence[dict], image_size: int | None, channels: int = 3,
                   normalize: str | None = "imagenet") -> dict[str, Tensor]:
    """Batch ``{"image", "label"}`` rows for a vision model.

    Images (uint8, (H, W) or (C, H, W)) become float ``pixel_values`` (N, channels, S, S) with
    S = ``image_size`` (bilinear resize; antialiased when shrinking), or their own size when ``image_size`` is
    None (then all must match). ``normalize="imagenet"`` applies ImageNet's mean/std per channel (for
    pretrained ImageNet models; needs 3 channels). ``labels`` is (N,) int64.
    """
    if normalize not in ("imagenet", None):
        raise ConfigError(f"normalize must be 'imagenet' or None, not {normalize!r}")
    images = [_to_channels(row["image"], channels) for row in rows]
    same_size = len({tuple(img.shape) for img in images}) == 1
    if image_size is None and not same_size:
        raise ConfigError("images of different sizes need an image_size to resize to")
    if image_size is None:
        pixel_values = torch.stack(images)
    elif same_size:  # the usual case: one resize for the whole batch
        pixel_values = _resize(torch.stack(images), image_size)
    else:
        pixel_values = torch.cat([_resize(img[None], image_size) for img in images])
    if normalize == "imagenet":
        if channels != 3:
            raise ConfigError("ImageNet normalization needs channels=3")
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        pixel_values = (pixel_values - mean) / std
    return {"pixel_values": pixel_values,
            "labels": torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)}
