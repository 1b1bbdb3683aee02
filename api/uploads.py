"""Prompt files a client may upload instead of JSON: .txt (one prompt a line), .csv and .jsonl."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from api.errors import invalid

NUMERIC = {"seed": int, "width": int, "height": int, "steps": int, "guidance_scale": float}
# Form fields of a multipart batch: text by nature, typed here so the batch is validated as strictly as JSON.
FORM_NUMERIC = {**NUMERIC, "priority": int}
FORM_LISTS = {"seeds": int, "sizes": str}


def parse_prompt_file(filename: str, content: bytes) -> list[str | dict[str, Any]]:
    """Prompts (or prompt objects with overrides) from an uploaded file, chosen by its extension."""
    text = _decode(content)
    suffix = filename.lower().rsplit(".", 1)[-1] if "." in filename else ""
    parsers = {"txt": _parse_txt, "csv": _parse_csv, "jsonl": _parse_jsonl}
    if suffix not in parsers:
        raise invalid(["body", "file"], f"unsupported file type {filename!r}: use .txt, .csv or .jsonl")
    prompts = parsers[suffix](text)
    if not prompts:
        raise invalid(["body", "file"], f"{filename!r} holds no prompts")
    return prompts


def _decode(content: bytes) -> str:
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise invalid(
            ["body", "file"], f"file is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None


def _parse_txt(text: str) -> list[str | dict[str, Any]]:
    # Blank lines and '#' comments are skipped, so a prompts file can be annotated.
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _parse_csv(text: str) -> list[str | dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise invalid(["body", "file"], "CSV needs a header row with a 'prompt' column")
    return [_typed_row(row, reader.line_num) for row in reader]


def _typed_row(row: dict[str, Any], line: int) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        try:
            item[key] = NUMERIC[key](value) if key in NUMERIC else value
        except ValueError:
            raise invalid(
                ["body", "file", f"line {line}", key], f"{key} must be a number, got {value!r}"
            ) from None
    return item


def _parse_jsonl(text: str) -> list[str | dict[str, Any]]:
    items: list[str | dict[str, Any]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise invalid(["body", "file", f"line {line_number}"], f"invalid JSON: {error.msg}") from None
        if not isinstance(item, str | dict):
            raise invalid(["body", "file", f"line {line_number}"], "each line must be a string or an object")
        items.append(item)
    return items


def typed_form_field(name: str, value: str) -> Any:
    """A multipart form field as the JSON body would carry it: numbers as numbers, lists split on commas."""
    if name in FORM_LISTS:
        return [_typed(name, part.strip(), FORM_LISTS[name]) for part in value.split(",")]
    if name in FORM_NUMERIC:
        return _typed(name, value.strip(), FORM_NUMERIC[name])
    return value


def _typed(name: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise invalid(["body", name], f"{name} must be a number, got {value[:100]!r}") from None
