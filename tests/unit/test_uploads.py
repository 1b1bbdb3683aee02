"""Parsing uploaded prompt files (.txt, .csv, .jsonl) into prompts, with 422-shaped errors."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from api.uploads import parse_prompt_file


def rejection(filename: str, content: bytes) -> dict[str, Any]:
    with pytest.raises(RequestValidationError) as caught:
        parse_prompt_file(filename, content)
    errors = list(caught.value.errors())
    assert len(errors) == 1
    return dict(errors[0])


# .txt


def test_txt_gives_one_prompt_per_line() -> None:
    content = b"a cat on a sofa\na lighthouse at night\n"
    assert parse_prompt_file("prompts.txt", content) == ["a cat on a sofa", "a lighthouse at night"]


def test_txt_skips_comments_and_blank_lines_and_strips() -> None:
    content = b"# header comment\n\n  a cat  \n   # indented comment\n\t\nneon street\r\n"
    assert parse_prompt_file("prompts.txt", content) == ["a cat", "neon street"]


def test_txt_extension_is_case_insensitive_and_bom_is_dropped() -> None:
    assert parse_prompt_file("PROMPTS.TXT", "\ufeffa cat\n".encode()) == ["a cat"]


def test_txt_keeps_non_ascii_text() -> None:
    assert parse_prompt_file("p.txt", "un café à Paris\n".encode()) == ["un café à Paris"]


# .csv


def test_csv_rows_become_objects_with_typed_numbers() -> None:
    content = b"prompt,seed,width,height,steps,guidance_scale\na cat,7,512,768,4,2.5\n"
    assert parse_prompt_file("p.csv", content) == [
        {"prompt": "a cat", "seed": 7, "width": 512, "height": 768, "steps": 4, "guidance_scale": 2.5}
    ]


def test_csv_numbers_are_typed_not_strings() -> None:
    [row] = parse_prompt_file("p.csv", b"prompt,seed,guidance_scale\nx,3,1\n")
    assert isinstance(row, dict)
    assert type(row["seed"]) is int
    assert type(row["guidance_scale"]) is float


def test_csv_empty_cells_are_left_out() -> None:
    content = b"prompt,seed,negative_prompt\na cat,1,blurry\na dog,,\n"
    assert parse_prompt_file("p.csv", content) == [
        {"prompt": "a cat", "seed": 1, "negative_prompt": "blurry"},
        {"prompt": "a dog"},
    ]


def test_csv_quoted_prompt_keeps_its_comma() -> None:
    content = b'prompt,seed\n"a cat, on a sofa",2\n'
    assert parse_prompt_file("p.csv", content) == [{"prompt": "a cat, on a sofa", "seed": 2}]


def test_csv_bad_number_names_the_line_and_column() -> None:
    error = rejection("p.csv", b"prompt,seed\na cat,1\na dog,abc\n")
    assert error["loc"] == ["body", "file", "line 3", "seed"]
    assert error["msg"] == "seed must be a number, got 'abc'"


def test_csv_fractional_int_is_rejected() -> None:
    error = rejection("p.csv", b"prompt,width\na cat,512.5\n")
    assert error["loc"] == ["body", "file", "line 2", "width"]
    assert "width must be a number" in error["msg"]


def test_csv_bad_number_after_blank_line_names_the_file_line() -> None:
    error = rejection("p.csv", b"prompt,seed\n\na dog,abc\n")
    assert error["loc"] == ["body", "file", "line 3", "seed"]


@pytest.mark.parametrize("header", [b"text,seed\n", b"Prompt\n", b""])
def test_csv_without_prompt_column_is_rejected(header: bytes) -> None:
    error = rejection("p.csv", header + b"a cat,1\n")
    assert error["loc"] == ["body", "file"]
    assert "'prompt' column" in error["msg"]


def test_csv_with_only_a_header_holds_no_prompts() -> None:
    error = rejection("p.csv", b"prompt,seed\n")
    assert error["loc"] == ["body", "file"]
    assert "holds no prompts" in error["msg"]


# .jsonl


def test_jsonl_accepts_strings_and_objects() -> None:
    content = b'"a cat"\n\n{"prompt": "a dog", "seed": 3, "width": 512}\n'
    assert parse_prompt_file("p.jsonl", content) == ["a cat", {"prompt": "a dog", "seed": 3, "width": 512}]


def test_jsonl_bad_json_names_the_line() -> None:
    error = rejection("p.jsonl", b'"a cat"\n{"prompt": "a dog",\n')
    assert error["loc"] == ["body", "file", "line 2"]
    assert error["msg"].startswith("invalid JSON:")


@pytest.mark.parametrize("line", [b"[1, 2]", b"42", b"null", b"true"])
def test_jsonl_lines_must_be_strings_or_objects(line: bytes) -> None:
    error = rejection("p.jsonl", b'"a cat"\n\n' + line + b"\n")
    assert error["loc"] == ["body", "file", "line 3"]
    assert error["msg"] == "each line must be a string or an object"


# any type


@pytest.mark.parametrize("filename", ["prompts.pdf", "prompts.json", "prompts", "prompts.txt.gz"])
def test_unsupported_extension_is_rejected(filename: str) -> None:
    error = rejection(filename, b"a cat\n")
    assert error["loc"] == ["body", "file"]
    assert "unsupported file type" in error["msg"]
    assert repr(filename) in error["msg"]


@pytest.mark.parametrize("filename", ["p.txt", "p.csv", "p.jsonl"])
def test_non_utf8_is_rejected(filename: str) -> None:
    error = rejection(filename, "un café".encode("latin-1"))
    assert error["loc"] == ["body", "file"]
    assert "not UTF-8" in error["msg"]
    assert "at byte 6" in error["msg"]


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("p.txt", b""),
        ("p.txt", b"\n  \n# only a comment\n"),
        ("p.jsonl", b""),
        ("p.jsonl", b"\n\n"),
        ("p.csv", b""),
    ],
)
def test_empty_files_are_rejected(filename: str, content: bytes) -> None:
    error = rejection(filename, content)
    assert error["loc"] == ["body", "file"]
    assert error["msg"] in {f"{filename!r} holds no prompts", "CSV needs a header row with a 'prompt' column"}
