"""Reading the user's text files (CSV, JSONL, JSON) into checked rows, with ``file:line: problem (fix)`` errors.

Every way a file can be wrong ends in a `DataError` that names the file and line and says the fix: bytes that
are not in the file's encoding, an unterminated CSV quote, a field over `MAX_FIELD_CHARS`, JSON nested deeper
than Python's reader allows, a missing field, a label that is not a class. A UTF-8 byte-order mark is dropped.
With ``skip_bad_rows`` a malformed row is skipped and counted instead (a file that cannot be decoded or
parsed as a whole still fails: there are no rows to keep).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .datasets import DataError

log = logging.getLogger("lorakit.data")

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant")
MAX_FIELD_CHARS = 16 * 2 ** 20  # longest CSV field read (Python's csv default is 128 KiB)
MAX_CLASSES = 100_000  # class indices (and distinct class names) above this are refused before any work
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a CSV cell that is a number, not a class name


@dataclass(frozen=True)
class ReadOptions:
    """How user files are read: their text encoding, and whether malformed rows are skipped (and counted)."""

    encoding: str = "utf-8"
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise DataError(f"unknown text encoding {self.encoding!r} (fix: utf-8, latin-1, cp1252, utf-16, ...)") \
                from None


class BadRow(Exception):
    """One row's problem and its fix; `read_file` turns it into a `DataError` with file and line."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} ({fix})")
        self.problem, self.fix = problem, fix

    def at(self, where: str, skippable: bool = True) -> DataError:
        """The `DataError` of this row at ``where`` (``file:line``): ``where: problem (fix[; or skip it])``."""
        skip = "; or pass skip_bad_rows=True (recipe: data.skip_bad_rows=true) to drop such rows" if skippable else ""
        return DataError(f"{where}: {self.problem} (fix: {self.fix}{skip})")


def read_text(path: Path, encoding: str) -> str:
    """The whole file decoded; undecodable bytes are a `DataError` at their line. A UTF-8 BOM is dropped."""
    data = path.read_bytes()
    if codecs.lookup(encoding).name == "utf-8" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]  # Excel writes one; it would glue onto the first column's name
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[err.start]:02x} at column {column} is not valid {encoding} "
                        f"(fix: save the file as UTF-8, or give its encoding, e.g. encoding='latin-1' / "
                        f"data.encoding=cp1252)") from None


def _json(text: str) -> object:
    """``json.loads`` whose nesting limit is a `BadRow`, not a `RecursionError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRow("JSON nested too deeply to read", "rows are flat objects; messages a list of objects") from None


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's process-wide field limit for one read (its default, 128 KiB, cuts long texts)."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict | BadRow]]:
    """(first line of the row, record or problem) of each CSV row; strict quoting, so an unterminated quote is
    an error at the row that opened it instead of swallowing the rows after it."""
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    line = 2  # the header is line 1
    with _csv_field_limit(MAX_FIELD_CHARS):
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}:{line}: {_csv_problem(str(err))}") from None
            if None in record or None in record.values():  # DictReader's marks of extra / missing cells
                cells = sum(v is not None for k, v in record.items() if k is not None) + len(record.get(None, []))
                yield line, BadRow(f"{cells} columns where the header has {len(reader.fieldnames or [])}",
                                   "quote fields that contain commas")
            elif "messages" in record:
                try:
                    yield line, {**record, "messages": _json(record["messages"])}
                except json.JSONDecodeError as err:
                    yield line, BadRow(f"messages is not JSON: {err.msg}", "write messages as a JSON list")
                except BadRow as bad:
                    yield line, bad
            else:
                yield line, record
            line = reader.line_num + 1


def _csv_problem(message: str) -> str:
    """The csv module's error as ``problem (fix)``."""
    if "unexpected end of data" in message:
        return ("a quote opened in this row is never closed: the rest of the file would become one field "
                "(fix: close the quote, and double any quote inside a quoted field: \"say \"\"hi\"\"\")")
    if "field larger than field limit" in message:
        return (f"a field longer than {MAX_FIELD_CHARS:,} characters (fix: shorten it; a row this long would "
                "be cut by max_length anyway)")
    if "expected after" in message:
        return (f"text right after a closing quote ({message}) (fix: quote the whole field and double the "
                "quotes inside it)")
    return f"malformed CSV: {message} (fix: check the quoting of this row)"


def _json_list_records(path: Path, text: str) -> Iterator[tuple[int | str, dict | BadRow]]:
    """Rows of a ``.json`` file holding one list of objects; a parsed document has no line numbers."""
    try:
        records = _json(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (fix: the syntax, or write one row a "
                        "line as .jsonl)") from None
    except BadRow as bad:
        raise bad.at(f"{path}:1", skippable=False) from None
    if not isinstance(records, list):
        raise DataError(f"{path}:1: a .json dataset must be a list of rows (fix: write [{{...}}, {{...}}] or "
                        "use .jsonl)")
    for index, record in enumerate(records):
        yield f"row {index + 1}", record if isinstance(record, dict) else BadRow("row is not an object",
                                                                               "write each row as {...}")


def _jsonl_records(text: str) -> Iterator[tuple[int, dict | BadRow]]:
    for line, row_text in enumerate(text.splitlines(), start=1):
        if not row_text.strip():
            continue
        try:
            record = _json(row_text)
        except json.JSONDecodeError as err:
            yield line, BadRow(f"malformed JSON: {err.msg} at column {err.colno}", "one JSON object per line")
            continue
        except BadRow as bad:
            yield line, bad
            continue
        yield line, record if isinstance(record, dict) else BadRow("row is not a JSON object", "use {...}")


def records(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int | str, dict | BadRow]]:
    """(where, record or the reason it could not be read) for each row of a JSONL / JSON / CSV file.

    ``where`` is the line number (a CSV row's first line), or ``"row N"`` in a ``.json`` list. Problems with
    the file as a whole (encoding, quoting, syntax of a ``.json``) raise `DataError` at once.
    """
    text = read_text(path, encoding)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path, text)
    if suffix == ".json":
        return _json_list_records(path, text)
    return _jsonl_records(text)


def detect_kind(record: dict) -> str | None:
    """The dataset kind a record's fields say: chat, prompt-completion or text-classification."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record or "instruction" in record:
        return "prompt-completion"
    if "text" in record or "label" in record:
        return "text-classification"
    return None


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise BadRow(f"missing field {key!r}", f"every row needs {key!r}")
    if not isinstance(value, str):
        raise BadRow(f"{key!r} is {type(value).__name__}, not text", f"write {key!r} as a string")
    if not value.strip():
        raise BadRow(f"empty {key!r}", f"remove the row or fill in {key!r}")
    return value


def _number_label(value: float | int, shown: str) -> int:
    """A numeric label as a class index: integral and within `MAX_CLASSES` (CSV and JSON alike)."""
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRow(f"label {shown} is not a class index", "use integer class indices 0..N-1 or class names "
                         "(regression targets are not supported)")
        value = int(value)
    if value < 0:
        raise BadRow(f"negative label {shown}", "class indices start at 0")
    if value >= MAX_CLASSES:
        raise BadRow(f"label {shown} is beyond the {MAX_CLASSES:,} classes lorakit handles",
                     "number the classes 0..N-1, or use class names")
    return value


def label(record: dict, from_csv: bool) -> int | str:
    """The raw label: an int index or a class name. Numbers are indices whether a CSV cell (``1``, ``1.0``)
    or a JSON number; ``1.0`` is class 1, ``0.5`` is refused in both."""
    if "label" not in record or record["label"] is None:
        raise BadRow("missing field 'label'", "every row needs 'label': a class index or a class name")
    value = record["label"]
    if from_csv:
        value = value.strip()
        if _NUMBER.fullmatch(value):
            return _number_label(float(value) if not value.lstrip("+-").isdigit() else int(value), value)
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRow(f"'label' is {type(value).__name__} {value!r}"[:120], "use an integer class index or a class name")
    elif not isinstance(value, str):
        return _number_label(value, repr(value))
    if not value.strip():
        raise BadRow("empty 'label'", "fill in a class index or a class name")
    if "\n" in value or "\r" in value:
        raise BadRow("the label holds a line break (an unterminated quote in the row?)",
                     "class names are one line; close the row's quotes")
    return value


def _chat(record: dict) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list", 'write [{"role": "user", "content": "..."}, ...]')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRow(f"message {i} has no role in {ROLES}", 'give each message "role" and "content"')
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise BadRow(f"message {i} has no text 'content'", "give each message non-empty string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message to learn from", "end the conversation with an assistant reply")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_row(record: dict, kind: str, from_csv: bool) -> dict:
    """The checked row of ``kind`` (raises `BadRow`); text-classification labels stay raw until all are read."""
    if kind == "chat":
        return {"messages": _chat(record)}
    if kind == "prompt-completion":
        if "instruction" in record and "prompt" not in record:  # alpaca: instruction (+ input) -> output
            prompt = _text(record, "instruction")
            if record.get("input"):
                prompt += f"\n\n{_text(record, 'input')}"
            return {"prompt": prompt, "completion": _text(record, "output")}
        return {"prompt": _text(record, "prompt"), "completion": _text(record, "completion")}
    return {"text": _text(record, "text"), "label": label(record, from_csv)}


def _checked(record: dict | BadRow, kind: str | None, label_type: type | None, from_csv: bool
             ) -> tuple[str, dict]:
    """(kind, row) of one record; the first readable record fixes the kind, the first label its type."""
    if isinstance(record, BadRow):
        raise record
    kind = kind or detect_kind(record)
    if kind is None:
        raise BadRow(f"cannot tell the kind from fields {sorted(record)[:10]}",
                     "use text+label, prompt+completion, or messages")
    row = check_row(record, kind, from_csv)
    if kind == "text-classification" and label_type is not None and type(row["label"]) is not label_type:
        raise BadRow(f"label {row['label']!r} is {type(row['label']).__name__} but earlier labels are "
                     f"{label_type.__name__}", "use class indices everywhere or class names everywhere")
    return kind, row


def read_file(path: Path, options: ReadOptions, kind: str | None = None) -> tuple[str, list[dict], int]:
    """(kind, checked rows, skipped count) of one user file; the first readable row fixes the kind."""
    rows: list[dict] = []
    skipped = 0
    label_type: type | None = None
    for line, record in records(path, options.encoding):
        try:
            kind, row = _checked(record, kind, label_type, path.suffix.lower() == ".csv")
        except BadRow as bad:
            if not options.skip_bad_rows:
                raise bad.at(f"{path}:{line}") from None
            log.debug("%s:%s: skipped: %s", path, line, bad)
            skipped += 1
            continue
        if kind == "text-classification":
            label_type = label_type or type(row["label"])
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no usable rows{f' ({skipped} bad)' if skipped else ''} (fix: one row per line "
                        "with text+label, prompt+completion, or messages)")
    if skipped:
        log.warning("%s: skipped %d bad row(s) of %d", path, skipped, skipped + len(rows))
    return kind, rows, skipped


def class_names(parts: list[list[dict]]) -> list[str]:
    """Turn raw labels into indices in place; class names are sorted, integer labels name themselves."""
    raw = [row["label"] for rows in parts for row in rows]
    if all(isinstance(value, int) for value in raw):
        return [str(i) for i in range(max(raw) + 1)]
    names = sorted({str(value) for value in raw})
    if len(names) > MAX_CLASSES:
        raise DataError(f"{len(names):,} distinct class names, more than the {MAX_CLASSES:,} lorakit handles "
                        "(fix: is 'label' really a class? regression targets are not supported)")
    index = {name: i for i, name in enumerate(names)}
    for rows in parts:
        for row in rows:
            row["label"] = index[str(row["label"])]
    return names
