"""lorakit.evaluate: the loss-term count, metrics (never over 0 examples), generation (stop tokens, sampling,
the plain format of base models without a chat template)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.data import IGNORE_INDEX, DataError, load_dataset
from lorakit.errors import ConfigError
from lorakit.evaluate import (
    check_sampling,
    chunked_cross_entropy,
    encode,
    end_of_turn_ids,
    evaluate,
    generate,
    loss_sum,
    loss_terms,
    stop_token_ids,
)

from conftest import train_steps


def test_loss_terms_counts_shifted_answer_tokens_or_rows() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX],
                           [7, 8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    # position 0 is never predicted (nothing precedes it): row 2's first label does not count
    assert loss_terms("causal-lm", labels) == 2 + 2
    assert loss_terms("sequence-classification", torch.tensor([0, 1, 1])) == 3
    logits = torch.randn(2, 5, 11)
    total, count = loss_sum("causal-lm", logits, labels)
    assert count == 4
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(total, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(dtype: torch.dtype) -> None:
    """Blocks of 3 rows over 37 rows (a partial last block), a third of the rows ignored: the loss and the
    gradient match ``F.cross_entropy(logits.float(), ...)`` within fp32 rounding (bf16: the same fp32 gradient
    rounded to bf16), and ignored rows get exactly 0."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 50, (37,), generator=generator)
    targets[::3] = IGNORE_INDEX
    plain_in = logits.clone().requires_grad_(True)
    chunked_in = logits.clone().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(plain_in.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    chunked = chunked_cross_entropy(chunked_in, targets, block_elements=3 * 50)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    (plain * 0.7).backward()
    (chunked * 0.7).backward()
    assert chunked_in.grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-6}
    torch.testing.assert_close(chunked_in.grad, plain_in.grad, **tolerance)
    assert torch.equal(chunked_in.grad[::3], torch.zeros_like(chunked_in.grad[::3]))
    nothing = chunked_cross_entropy(logits, torch.full((37,), IGNORE_INDEX))
    assert float(nothing) == 0.0


def test_causal_lm_loss_sum_gradients_equal_the_shifted_plain_loss() -> None:
    """`loss_sum` shifts the labels instead of slicing the logits: same loss and logits gradient as the
    slice-and-flatten cross-entropy it replaced (batch 3, seq 6, vocab 40)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 40, generator=generator)
    labels = torch.randint(0, 40, (3, 6), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    ours = logits.clone().requires_grad_(True)
    reference = logits.clone().requires_grad_(True)
    total, count = loss_sum("causal-lm", ours, labels)
    expected = torch.nn.functional.cross_entropy(reference[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5)
    total.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)
    assert count == 3 + 5 + 3


def test_evaluate_refuses_zero_examples(tiny) -> None:
    with pytest.raises(DataError, match="no held-out examples"):
        evaluate(tiny, "image-classification", [])


def test_evaluate_refuses_a_split_whose_answers_were_all_cut(smollm2) -> None:
    model, tokenizer = smollm2
    rows = [{"prompt": "word " * 60, "completion": "an answer"}]
    with pytest.raises(DataError, match="none of the 1 held-out examples has an answer token"):
        evaluate(model, "causal-lm", rows, tokenizer, max_length=1)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": 1e-45}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"seed": 2 ** 64}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": float("nan")}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
])
def test_check_sampling_refuses_bad_values(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_sampling(**kwargs)


def test_generate_stops_at_the_templates_end_of_turn_token(smollm2) -> None:
    model, tokenizer = smollm2
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # a tokenizer / model whose EOS is not the end-of-turn token (as many chat models ship)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(stop_token_ids(tokenizer, model)) == {tokenizer.eos_token_id, im_end}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=40)[0]
    assert "Paris" in answer
    # the same greedy decoding without the end-of-turn stop runs past <|im_end|> into a new turn
    unstopped = model.generate(**prompt, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.eos_token_id)[0, prompt["input_ids"].shape[1]:]
    assert im_end in unstopped.tolist()
    assert len(tokenizer.encode(answer, add_special_tokens=False)) < int((unstopped == im_end).nonzero()[0]) + 2


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(smollm2) -> None:
    model, tokenizer = smollm2
    state = torch.random.get_rng_state()
    runs = [generate(model, tokenizer, ["Name a colour."], 12, temperature=1.5, top_k=50, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert torch.equal(torch.random.get_rng_state(), state)
    greedy = generate(model, tokenizer, ["Name a colour."], 12)
    assert greedy == generate(model, tokenizer, ["Name a colour."], 12, seed=9)  # a seed does not change greedy


def test_a_model_without_chat_template_trains_and_generates_in_the_plain_format(smollm2) -> None:
    model, tokenizer = smollm2
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None  # a base LM: before, this ended in transformers' "Cannot use chat template"
    rows = list(load_dataset("faq-en").train.take(4))
    batch = encode("causal-lm", rows[:1], tokenizer, 512, None, separator="\n### Answer:\n")
    labels = batch["labels"][0]
    trained = labels != IGNORE_INDEX
    assert tokenizer.decode(labels[trained]) == rows[0]["completion"] + tokenizer.eos_token
    prompt = ~trained & batch["attention_mask"][0].bool()  # the batch is padded to a multiple of 8 tokens
    assert tokenizer.decode(batch["input_ids"][0][prompt]) == rows[0]["prompt"] + "\n### Answer:\n"
    losses = train_steps(model, tokenizer, rows, steps=3, separator="\n### Answer:\n")
    assert losses[-1] < losses[0]
    answers = generate(model, tokenizer, [rows[0]["prompt"]], max_new_tokens=8, separator="\n### Answer:\n")
    assert len(answers) == 1 and answers[0].strip()
    metrics = evaluate(model, "causal-lm", rows, tokenizer, max_length=96, separator="\n### Answer:\n")
    assert metrics["examples"] == 4 and metrics["loss"] > 0


def test_chat_rows_without_chat_template_are_refused(smollm2) -> None:
    _, tokenizer = smollm2
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        encode("causal-lm", rows, tokenizer, 64, None)


def test_text_batches_are_padded_to_a_multiple_of_8_without_changing_outputs(minilm, smollm2) -> None:
    """Batch lengths come in steps of 8 (at most max_length) where it pays: a GPU, or bf16/fp16 compute on a CPU
    (oneDNN keeps a compiled primitive per matmul shape: the bf16 default recipe held 1,595 MiB resident, 772 MiB
    padded); not for fp32 on a CPU (only more work). The extra positions are padding: a row's outputs and the
    loss are those of the unpadded batch."""
    from lorakit.batching import encode_rows
    from lorakit.data import encode_causal_lm, encode_classification, pad_multiple
    from lorakit.distributed import World
    from lorakit.recipes import TrainArgs

    assert pad_multiple(torch.float32, "cpu") == 1 and pad_multiple(torch.bfloat16, "cpu") == 8
    assert pad_multiple(torch.float16, "cpu") == 8 and pad_multiple(torch.float32, "cuda") == 8
    from lorakit.evaluate import compute_dtype  # what evaluate() pads for: the base's dtype, not the adapters'

    assert compute_dtype(minilm[0]) == torch.float32
    assert compute_dtype(copy.deepcopy(minilm[0]).to(torch.bfloat16)) == torch.bfloat16

    model, tokenizer = minilm
    rows = [{"text": "a fine film", "label": 1}, {"text": "dull, long and " * 3 + "slow", "label": 0}]
    plain = encode_classification(tokenizer, rows, max_length=64)
    padded = encode("sequence-classification", rows, tokenizer, 64, None, multiple=8)
    length = plain["input_ids"].shape[1]
    assert length % 8 != 0 and padded["input_ids"].shape[1] == -(-length // 8) * 8
    assert torch.equal(padded["input_ids"][:, :length], plain["input_ids"])
    assert padded["attention_mask"][:, length:].sum() == 0 and torch.equal(padded["labels"], plain["labels"])
    assert encode("sequence-classification", rows, tokenizer, length + 1, None,
                  multiple=8)["input_ids"].shape[1] == length + 1
    assert torch.equal(encode("sequence-classification", rows, tokenizer, 64, None)["input_ids"], plain["input_ids"])
    for dtype, precision, expected in (("fp32", "fp32", length), ("bf16", "fp32", padded["input_ids"].shape[1]),
                                       ("fp32", "bf16", padded["input_ids"].shape[1])):
        args = TrainArgs(max_length=64, dtype=dtype, precision=precision)
        [micro] = encode_rows("sequence-classification", rows, [torch.tensor([0, 1])], tokenizer, args, None, World())
        assert micro.inputs["input_ids"].shape[1] == expected, (dtype, precision)
    with torch.no_grad():
        short = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
        long = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(long[:, :length][real], short[real], rtol=0, atol=1e-5)

    lm, lm_tokenizer = smollm2
    chat = [{"prompt": "Name a colour.", "completion": "Blue."}, {"prompt": "Count to three.", "completion": "1 2 3"}]
    plain = encode_causal_lm(lm_tokenizer, chat, max_length=96)
    padded = encode("causal-lm", chat, lm_tokenizer, 96, None, multiple=8)
    length = plain["input_ids"].shape[1]
    assert length % 8 != 0 and padded["input_ids"].shape[1] == -(-length // 8) * 8
    assert (padded["labels"][:, length:] == IGNORE_INDEX).all()
    with torch.no_grad():
        losses = [loss_sum("causal-lm", lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                           b["labels"]) for b in (plain, padded)]
    assert losses[0][1] == losses[1][1]
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-5)


def test_encode_reads_the_task_table() -> None:
    with pytest.raises(ConfigError, match="unknown task 'translation'.*causal-lm"):
        encode("translation", [{"text": "x", "label": 0}], None, 8, None)


def test_the_plain_format_starts_with_bos_when_the_tokenizer_adds_one(smollm2) -> None:
    from tokenizers import processors

    from lorakit.data import plain_prompt_ids

    _, tokenizer = smollm2
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = None
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    # a Llama-style base tokenizer: every text starts with BOS
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos
    ids = plain_prompt_ids(tokenizer, "Question?", "\n")
    assert ids[0] == bos and bos not in ids[1:]
    batch = encode("causal-lm", [{"prompt": "Question?", "completion": "Answer."}], tokenizer, 64, None)
    assert batch["input_ids"][0, :len(ids)].tolist() == ids  # training sees what generation sees
