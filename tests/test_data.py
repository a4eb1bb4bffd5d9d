"""lorakit.data: packaged datasets and their fixed splits, user files, bad rows, and the batch encoders."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorakit.data import (
    DATASETS,
    IGNORE_INDEX,
    DataError,
    Dataset,
    collate_images,
    encode_causal_lm,
    encode_classification,
    fashion_mnist_dir,
    load_dataset,
)
from lorakit.errors import ConfigError, LorakitError

# (train, validation, test) sizes, kind, number of classes (None: not classification)
EXPECTED = {
    "rotten-tomatoes": ((10202, 1275, 1275), "text-classification", 2),
    "faq-en": ((403, 50, 50), "prompt-completion", None),
    "faq-en-sv": ((403, 50, 50), "prompt-completion", None),
    "humaneval": ((132, 16, 16), "prompt-completion", None),
    "mnist-5k": ((4000, 500, 500), "image-classification", 10),
    "fashion-mnist": ((54000, 6000, 10000), "image-classification", 10),
}
# Split regression: the seed-0 test split of a packaged dataset must never change (results compare across it).
HUMANEVAL_TEST_FINGERPRINT = "f9277e8f400169731735c30a205fb3d82854255769cabda9f2f2bbc378dcd0c1"
MNIST_5K_TEST_FINGERPRINT = "c206a21232a1d10064259f367c5d1c8001746a928f60b321c12df16271a5073e"


def row_key(row: dict) -> str:
    """What identifies a row for the disjointness check (image rows: their pixels)."""
    if "image" in row:
        return row["image"].numpy().tobytes().hex()
    return row.get("id") or row.get("task_id") or row.get("text") or row["prompt"]


@pytest.fixture(scope="module", params=list(EXPECTED))
def packaged(request: pytest.FixtureRequest) -> tuple[str, object]:
    name = request.param
    if name == "fashion-mnist":
        try:
            fashion_mnist_dir()
        except DataError:
            pytest.skip("Fashion-MNIST is not unpacked: bash scripts/fetch_fashion_mnist.sh")
    return name, load_dataset(name)


def test_registry_lists_every_packaged_dataset() -> None:
    assert set(DATASETS) == set(EXPECTED)


def test_packaged_sizes_kinds_and_classes(packaged) -> None:
    name, splits = packaged
    sizes, kind, num_classes = EXPECTED[name]
    assert tuple(len(part) for part in splits) == sizes
    for part in splits:
        assert part.kind == kind and part.name == name and part.skipped == 0
        if num_classes:
            assert len(part.labels) == num_classes
            assert {row["label"] for row in part} == set(range(num_classes))  # every class in every split
        else:
            assert part.labels is None
            assert all(row["prompt"].strip() and row["completion"].strip() for row in part)


def test_packaged_splits_are_disjoint(packaged) -> None:
    name, splits = packaged
    if name == "fashion-mnist":  # 60k+10k pixel keys: check train vs validation on the first rows only
        train = {row_key(row) for row in splits.train.take(5000)}
        assert not train & {row_key(row) for row in splits.validation}
        return
    keys = [{row_key(row) for row in part} for part in splits]
    assert sum(len(k) for k in keys) == sum(len(part) for part in splits)  # no repeats inside a split either
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


@pytest.mark.parametrize("name", ["rotten-tomatoes", "faq-en", "humaneval", "mnist-5k"])
def test_same_seed_same_split_other_seed_other_split(name: str) -> None:
    first, again, other = load_dataset(name), load_dataset(name), load_dataset(name, seed=1)
    assert [p.fingerprint() for p in first] == [p.fingerprint() for p in again]
    assert first.test.fingerprint() != other.test.fingerprint()
    assert sorted(map(row_key, [*first.train, *first.test, *first.validation])) == \
        sorted(map(row_key, [*other.train, *other.test, *other.validation]))


def test_split_fingerprint_is_fixed() -> None:
    # The split is a sha256 ordering, no RNG: these values hold on every machine and library version.
    splits = load_dataset("humaneval")
    assert [row["task_id"] for row in splits.test.take(4)] == \
        ["HumanEval/162", "HumanEval/50", "HumanEval/47", "HumanEval/148"]
    assert splits.test.fingerprint() == HUMANEVAL_TEST_FINGERPRINT
    assert load_dataset("mnist-5k").test.fingerprint() == MNIST_5K_TEST_FINGERPRINT


def test_faq_translation_pairs_share_ids_and_splits() -> None:
    english, translation = load_dataset("faq-en"), load_dataset("faq-en-sv")
    for a, b in zip(english, translation):
        assert [row["id"] for row in a] == [row["id"] for row in b]
    row = translation.train[0]
    assert row["prompt"].startswith("Translate to Swedish: ") and row["completion"] != row["prompt"]
    assert any(ch in "åäöÅÄÖ" for r in translation.train for ch in r["completion"])


def test_rotten_tomatoes_has_no_plot_lines_and_both_labels() -> None:
    train = load_dataset("rotten-tomatoes").train
    assert train.labels == ["rotten", "fresh"]
    assert all(isinstance(row["label"], int) and len(row["text"]) < 1000 for row in train)
    assert 0.5 < sum(row["label"] for row in train) / len(train) < 0.65  # 7,403 fresh / 12,808 reviews


def test_dataset_is_list_like() -> None:
    data = Dataset("toy", "text-classification", [{"text": str(i), "label": i % 2} for i in range(10)], ["a", "b"], "")
    assert len(data) == 10 and data[3]["text"] == "3" and [r["text"] for r in data.take(2)] == ["0", "1"]
    assert [r["text"] for r in data.select([5, 1])] == ["5", "1"] and data.take(99).fingerprint() == data.fingerprint()
    assert data.select([1, 5]).fingerprint() != data.select([5, 1]).fingerprint()


# --------------------------------------------------------------------------------------------- user files


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_jsonl_text_classification_with_class_names(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": "pos" if i % 3 else "neg"} for i in range(50)]
    splits = load_dataset(write_jsonl(tmp_path / "reviews.jsonl", rows))
    assert [len(p) for p in splits] == [40, 5, 5] and splits.train.labels == ["neg", "pos"]
    assert splits.train.kind == "text-classification" and splits.train.source.endswith("reviews.jsonl")
    by_text = {row["text"]: row["label"] for part in splits for row in part}
    assert by_text["review 0"] == 0 and by_text["review 1"] == 1


def test_user_csv_prompt_completion_and_chat(tmp_path: Path) -> None:
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerows([[f"question {i}, with a comma", f"answer\nover two lines {i}"] for i in range(20)])
    splits = load_dataset(str(tmp_path / "qa.csv"))
    assert splits.train.kind == "prompt-completion" and sum(map(len, splits)) == 20
    assert splits.train[0]["completion"].startswith("answer\nover")

    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(10)]
    splits = load_dataset(write_jsonl(tmp_path / "chat.jsonl", chat))
    assert splits.train.kind == "chat" and [len(p) for p in splits] == [8, 1, 1]


def test_user_json_list_with_alpaca_fields(tmp_path: Path) -> None:
    rows = [{"instruction": f"Do {i}", "input": "with this" if i % 2 else "", "output": f"Done {i}"} for i in range(10)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    splits = load_dataset(tmp_path / "alpaca.json")
    everything = {row["prompt"]: row["completion"] for part in splits for row in part}
    assert everything["Do 0"] == "Done 0" and everything["Do 1\n\nwith this"] == "Done 1"
    rows[4] = {"instruction": "Do 4", "input": "", "output": ""}
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"alpaca\.json:row 5: empty 'output'"):
        load_dataset(tmp_path / "alpaca.json")


def test_user_folder_of_split_files(tmp_path: Path) -> None:
    for split, n in (("train", 30), ("validation", 4), ("test", 6)):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"text": f"{split} {i}", "label": i % 2} for i in range(n)])
    splits = load_dataset(tmp_path)
    assert [len(p) for p in splits] == [30, 4, 6] and splits.validation[0]["text"] == "validation 0"
    (tmp_path / "validation.jsonl").unlink()  # a missing validation part is carved from train
    splits = load_dataset(tmp_path)
    assert [len(p) for p in splits] == [27, 3, 6]
    assert all(row["text"].startswith("train") for row in splits.validation)


def make_image_folder(root: Path, per_class: int = 10) -> Path:
    for label, color in (("cat", (200, 50, 50)), ("dog", (50, 50, 200))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + i, 10), color).save(root / label / f"{i}.png")
    Image.new("L", (8, 8), 128).save(root / "cat" / "gray.jpg")
    return root


def test_user_image_folder(tmp_path: Path) -> None:
    splits = load_dataset(make_image_folder(tmp_path / "pets"))
    assert splits.train.kind == "image-classification" and splits.train.labels == ["cat", "dog"]
    assert [len(p) for p in splits] == [17, 2, 2]
    rows = [row for part in splits for row in part]
    assert {row["image"].dim() for row in rows} == {2, 3} and all(r["image"].dtype == torch.uint8 for r in rows)
    batch = collate_images(rows, image_size=16)
    assert batch["pixel_values"].shape == (21, 3, 16, 16) and batch["labels"].bincount().tolist() == [11, 10]


# --------------------------------------------------------------------------------------------- bad rows

GOOD = {"text": "fine", "label": 1}
BAD_ROWS = {  # problem -> (bad line, words the message must contain)
    "missing field": ({"text": "no label here"}, "missing field 'label'"),
    "fractional label": ({"text": "x", "label": 0.5}, "label 0.5 is not a class index"),
    "list label": ({"text": "x", "label": [1]}, "'label' is list"),
    "bool label": ({"text": "x", "label": True}, "'label' is bool"),
    "empty text": ({"text": "   ", "label": 0}, "empty 'text'"),
    "text not a string": ({"text": ["a"], "label": 0}, "not text"),
    "malformed JSON": ('{"text": "x", "label": ', "malformed JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "mixed label kinds": ({"text": "x", "label": "pos"}, "earlier labels are int"),
}


@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_bad_row_names_file_and_line(tmp_path: Path, problem: str) -> None:
    bad, words = BAD_ROWS[problem]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:3: " in str(err.value) and words in str(err.value) and "skip_bad_rows" in str(err.value)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, LorakitError)


@pytest.mark.parametrize("bad, words", [
    ({"prompt": "q", "completion": ""}, "empty 'completion'"),
    ({"prompt": "q"}, "missing field 'completion'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "no role"),
])
def test_bad_generation_rows(tmp_path: Path, bad: dict, words: str) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} \
        if "messages" in bad else {"prompt": "q", "completion": "a"}
    path = write_jsonl(tmp_path / "gen.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"gen.jsonl:2: .*{words}"):
        load_dataset(path)


def test_bad_csv_row_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"multi\nline",1\ngood,0\ntoo,many,fields\n')
    with pytest.raises(DataError, match=r"data\.csv:5: 3 columns where the header has 2"):
        load_dataset(path)


def test_skip_bad_rows_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [GOOD, {"text": "also fine", "label": 0}] * 10 + [bad for bad, _ in BAD_ROWS.values()]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        splits = load_dataset(path, skip_bad_rows=True)
    assert sum(map(len, splits)) == 20 and all(part.skipped == len(BAD_ROWS) for part in splits)
    assert f"skipped {len(BAD_ROWS)} bad row(s)" in caplog.text


def test_unreadable_image_and_unknown_name(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "pets", per_class=3)
    (folder / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        load_dataset(folder)
    assert load_dataset(folder, skip_bad_rows=True).train.skipped == 1
    with pytest.raises(DataError, match="no such dataset or file.*rotten-tomatoes"):
        load_dataset("rotten-potatoes")


# --------------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from lorakit.models import model_path

    return AutoTokenizer.from_pretrained(model_path("smollm2"))  # converts the GGUF on the very first run


def test_encode_causal_lm_trains_only_on_the_answer(smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    rows = [{"prompt": "What is 2+2?", "completion": "4, of course."},
            {"prompt": "Say hi", "completion": "Hello there! How can I help you today?"}]
    batch = encode_causal_lm(tokenizer, rows, max_length=128)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, row in enumerate(rows):
        labels, mask = batch["labels"][i], batch["attention_mask"][i].bool()
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == row["completion"] + "<|im_end|>"
        trained = labels != IGNORE_INDEX
        assert torch.equal(labels[trained], batch["input_ids"][i][trained])
        assert not trained[~mask].any() and not mask[mask.sum():].any()  # right padding, never trained
        # the untrained part ahead of the answer is exactly what generation sees
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        first = int(trained.nonzero()[0])
        assert tokenizer.decode(batch["input_ids"][i][:first]) == prompt


def test_encode_causal_lm_truncation_keeps_the_prompt(smollm2_tokenizer) -> None:
    rows = [{"prompt": "Count.", "completion": " ".join(str(i) for i in range(100))}]
    full = encode_causal_lm(smollm2_tokenizer, rows, max_length=1024)
    cut = encode_causal_lm(smollm2_tokenizer, rows, max_length=48)
    assert cut["input_ids"].shape == (1, 48)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :48])  # the end of the answer is dropped
    assert torch.equal(cut["labels"][0], full["labels"][0, :48])


def test_encode_causal_lm_multi_turn_chat(smollm2_tokenizer) -> None:
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye."}]}
    labels = encode_causal_lm(smollm2_tokenizer, [row], max_length=128)["labels"][0]
    assert smollm2_tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Hello.<|im_end|>Goodbye.<|im_end|>"


def test_encode_classification_pads_and_truncates() -> None:
    from transformers import AutoTokenizer

    from lorakit.models import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"))
    rows = [{"text": "short", "label": 0}, {"text": "a much longer review " * 20, "label": 1}]
    batch = encode_classification(tokenizer, rows, max_length=16)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["attention_mask"][0].sum() == 3 and batch["labels"].tolist() == [0, 1]
    assert encode_classification(tokenizer, rows[:1], max_length=16)["input_ids"].shape == (1, 3)


def test_collate_images_channels_resize_and_normalize() -> None:
    white = {"image": torch.full((28, 28), 255, dtype=torch.uint8), "label": 7}
    batch = collate_images([white, white], image_size=32)
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [7, 7]
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(batch["pixel_values"][0, :, 5, 5], expected)
    raw = collate_images([white], image_size=None, channels=1, normalize=None)["pixel_values"]
    assert raw.shape == (1, 1, 28, 28) and raw.max() == 1.0
    rgb = {"image": torch.zeros(3, 20, 20, dtype=torch.uint8), "label": 0}
    with pytest.raises(ConfigError, match="image_size"):
        collate_images([white, rgb], image_size=None, normalize=None)


# --------------------------------------------------------------------------------------------- hostile files
# Each case of issue 18's data list: before, a raw traceback, a silent wrong result, or an error naming no file.


def two_class_rows(n: int) -> list[dict]:
    return [{"text": f"row {i}", "label": i % 2} for i in range(n)]


def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_undecodable_bytes_name_file_line_and_the_encoding_option(tmp_path: Path) -> None:
    rows = [[f"plain row {i}", str(i % 2)] for i in range(12)] + [["café crème", "1"]]
    path = write_csv(tmp_path / "latin.csv", ["text", "label"], rows, encoding="latin-1")
    with pytest.raises(DataError, match=r"latin\.csv:14: byte 0xe9 at column 4 is not valid utf-8 \(fix: .*"
                                        r"encoding='latin-1'"):
        load_dataset(path)  # before: a bare UnicodeDecodeError
    splits = load_dataset(path, encoding="latin-1")
    assert "café crème" in {row["text"] for part in splits for row in part}
    with pytest.raises(DataError, match="unknown text encoding 'klingon'"):
        load_dataset(path, encoding="klingon")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_utf8_byte_order_mark_is_dropped(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"excel{suffix}"
    if suffix == ".csv":
        write_csv(path, ["text", "label"], [[f"row {i}", str(i % 2)] for i in range(12)], encoding="utf-8-sig")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in two_class_rows(12)), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    splits = load_dataset(path)  # before: "missing field 'text'" (the BOM glued onto the column name)
    assert sum(map(len, splits)) == 12 and splits.train.labels == ["0", "1"]


def test_csv_fields_over_128_kib_are_read_and_the_limit_is_an_error(tmp_path: Path, monkeypatch) -> None:
    long_text = "word " * 40_000  # 200 KB: over the csv module's 131,072-character default
    path = write_csv(tmp_path / "long.csv", ["text", "label"],
                     [[long_text if i == 5 else f"row {i}", str(i % 2)] for i in range(12)])
    splits = load_dataset(path)  # before: _csv.Error: field larger than field limit
    assert max(len(row["text"]) for part in splits for row in part) == len(long_text)
    assert csv.field_size_limit() == 131072  # the process-wide limit is restored
    monkeypatch.setattr("lorakit.data.readers.MAX_FIELD_CHARS", 1000)
    with pytest.raises(DataError, match=r"long\.csv:7: a field longer than 1,000 characters"):
        load_dataset(path)


def test_an_unterminated_csv_quote_is_found_at_its_row(tmp_path: Path) -> None:
    path = tmp_path / "quote.csv"
    lines = [f"row {i},{i % 2}" for i in range(12)]
    lines[4] = '"opens a quote and never closes it,1'
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"quote\.csv:6: a quote opened in this row is never closed"):
        load_dataset(path)  # before: the next 7 rows were merged silently into one text
    lines[4] = 'fine,"1'  # an open quote in the label swallows the next rows into a "class name"
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"quote\.csv:6: a quote opened in this row is never closed"):
        load_dataset(path)


def test_deeply_nested_json_is_a_row_error(tmp_path: Path) -> None:
    nested = '{"text": "x", "label": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = write_jsonl(tmp_path / "deep.jsonl", two_class_rows(4) + [nested] + two_class_rows(8))
    with pytest.raises(DataError, match=r"deep\.jsonl:5: JSON nested too deeply"):
        load_dataset(path)  # before: RecursionError
    assert sum(map(len, load_dataset(path, skip_bad_rows=True))) == 12
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep\.json:1: JSON nested too deeply"):
        load_dataset(tmp_path / "deep.json")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_huge_label_indices_are_refused_at_once(tmp_path: Path, suffix: str) -> None:
    rows = two_class_rows(12) + [{"text": "boom", "label": 10 ** 12}]
    path = tmp_path / f"huge{suffix}"
    if suffix == ".csv":
        write_csv(path, ["text", "label"], [[r["text"], str(r["label"])] for r in rows])
    else:
        write_jsonl(path, rows)
    with pytest.raises(DataError, match=rf"huge\{suffix}:(13|14): label 1000000000000 is beyond the 100,000 classes"):
        load_dataset(path)  # before: MemoryError after 60 s building a list of 10**12 class names


def test_float_labels_mean_the_same_in_csv_and_jsonl(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": float(i % 2)} for i in range(12)]
    from_json = load_dataset(write_jsonl(tmp_path / "f.jsonl", rows))  # before: refused ("'label' is float")
    from_csv = load_dataset(write_csv(tmp_path / "f.csv", ["text", "label"],
                                      [[r["text"], f"{r['label']:.1f}"] for r in rows]))  # before: names "0.0", "1.0"
    assert from_json.train.labels == from_csv.train.labels == ["0", "1"]
    assert [[r["label"] for r in part] for part in from_json] == [[r["label"] for r in part] for part in from_csv]
    rows[3]["label"] = 0.5
    with pytest.raises(DataError, match=r"f\.jsonl:4: label 0\.5 is not a class index"):
        load_dataset(write_jsonl(tmp_path / "f.jsonl", rows))
    with pytest.raises(DataError, match=r"f\.csv:5: label 0\.5 is not a class index"):
        load_dataset(write_csv(tmp_path / "f.csv", ["text", "label"], [[r["text"], str(r["label"])] for r in rows]))


@pytest.mark.parametrize("n", [1, 3])
def test_tiny_datasets_are_refused_naming_the_file(tmp_path: Path, n: int) -> None:
    path = write_jsonl(tmp_path / "tiny.jsonl", two_class_rows(n))
    with pytest.raises(DataError, match=rf"tiny\.jsonl: the (validation|train) split is empty \({n} usable row\(s\) "
                                        r"in all, split 80/10/10\) \(fix: at least 6 rows"):
        load_dataset(path)  # before: an error naming no file, or "success" on 0 held-out examples


def test_small_held_out_splits_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        load_dataset(write_jsonl(tmp_path / "small.jsonl", two_class_rows(30)))
    assert "small.jsonl: the validation split has only 3 row(s)" in caplog.text


def test_a_carved_part_that_comes_out_empty_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", two_class_rows(3))
    write_jsonl(tmp_path / "test.jsonl", two_class_rows(4))
    with pytest.raises(DataError, match=r"train\.jsonl: the validation split is empty"):
        load_dataset(tmp_path)


def test_single_class_data_is_refused_naming_the_file(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": "pos"} for i in range(20)]
    with pytest.raises(DataError, match=r"one\.jsonl: every training row has label 'pos'"):
        load_dataset(write_jsonl(tmp_path / "one.jsonl", rows))  # before: trained to 100% without a word
    folder = make_image_folder(tmp_path / "pets")
    for image in (folder / "dog").iterdir():
        image.unlink()
    (folder / "dog").rmdir()
    with pytest.raises(DataError, match=r"pets: every training row has label 'cat'"):
        load_dataset(folder)


def test_a_label_with_a_line_break_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "nl.csv", ["text", "label"], [[f"row {i}", "a\nb" if i == 2 else "a"] for i in range(9)])
    with pytest.raises(DataError, match=r"nl\.csv:4: the label holds a line break"):
        load_dataset(path)


def test_a_single_file_split_is_said_and_fractions_are_options(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "all.jsonl", two_class_rows(100))
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        splits = load_dataset(path)
    assert [len(p) for p in splits] == [80, 10, 10]
    assert "all.jsonl: one piece, split 80/10/10 (seed 0) into 80 train / 10 validation / 10 test rows" in caplog.text
    assert caplog.text.count("one piece") == 1
    splits = load_dataset(path, validation_fraction=0.2, test_fraction=0.05)
    assert [len(p) for p in splits] == [75, 20, 5]
    for bad in ({"validation_fraction": 0}, {"test_fraction": 1.5}, {"validation_fraction": 0.6, "test_fraction": 0.5},
                {"test_fraction": "0.1"}):
        with pytest.raises(DataError, match="fraction"):
            load_dataset(tmp_path / "not read.jsonl", **bad)  # checked before the (missing) file is looked at


def test_own_validation_and_test_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "mine.jsonl", two_class_rows(40))
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"held {i}", "label": i % 2} for i in range(6)])
    splits = load_dataset(train, validation_file=held)
    assert len(splits.validation) == 6 and splits.validation.source == str(held)
    assert [len(splits.train), len(splits.test)] == [36, 4]  # test carved from train at test_fraction
    splits = load_dataset(train, validation_file=held, test_file=held)
    assert [len(p) for p in splits] == [40, 6, 6]
    write_jsonl(tmp_path / "train.jsonl", two_class_rows(20))
    write_jsonl(tmp_path / "validation.jsonl", two_class_rows(4))
    with pytest.raises(DataError, match="already has a validation part"):
        load_dataset(tmp_path, validation_file=held)


def test_packaged_datasets_refuse_user_data_options() -> None:
    with pytest.raises(DataError, match="packaged dataset with fixed splits"):
        load_dataset("humaneval", validation_fraction=0.2)
    with pytest.raises(DataError, match="packaged dataset with fixed splits"):
        load_dataset("humaneval", encoding="latin-1")


def test_sparse_class_indices_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"text": f"row {i}", "label": 0 if i % 2 else 99} for i in range(20)]
    with caplog.at_level(logging.WARNING, logger="lorakit.data"):
        splits = load_dataset(write_jsonl(tmp_path / "sparse.jsonl", rows))
    assert len(splits.train.labels) == 100
    assert "sparse.jsonl: 98 of the 100 class indices have no rows" in caplog.text
