"""The CLI's one size grammar, and what makes `run` resumable: its Idempotency-Key and resume command."""

from __future__ import annotations

import shlex
import sys

import pytest

from cli.render_options import DtypeChoice, batch_fields, parse_sizes
from cli.resume import resume_command, run_key


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("256", [(256, 256)]),
        ("1024x768", [(1024, 768)]),
        (" 512 , 768X512 ", [(512, 512), (768, 512)]),
        ("64,2048x2048", [(64, 64), (2048, 2048)]),
    ],
)
def test_a_number_is_a_square_and_wxh_a_rectangle(text: str, sizes: list[tuple[int, int]]) -> None:
    assert parse_sizes(text) == sizes


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("100", "multiple of 16"),
        ("256x100", "multiple of 16"),
        ("48", "from 64 to 2048"),
        ("4096", "from 64 to 2048"),
        ("x", "1024x768 is width x height"),
        ("256,", "1024x768 is width x height"),
        ("256x", "1024x768 is width x height"),
        ("\uff12\uff15\uff16", "1024x768 is width x height"),  # full-width 256: int() would read it
        ("-256", "1024x768 is width x height"),
    ],
)
def test_sizes_outside_the_grammar_or_the_limits_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_sizes(text)


def fields(**changes: object) -> dict[str, str]:
    """A run's form fields, as the defaults give them, with some options changed."""
    options: dict[str, object] = {
        "model": None,
        "width": 1024,
        "height": 1024,
        "steps": 9,
        "seed": None,
        "sizes": None,
        "seeds": None,
        "negative_prompt": None,
        "guidance": 0.0,
        "priority": 0,
        "dtype": DtypeChoice.BF16,
    }
    return batch_fields(**{**options, **changes})  # type: ignore[arg-type]


def test_equal_options_written_differently_give_equal_fields() -> None:
    assert fields(sizes="256, 512x512") == fields(sizes="256x256,512")
    assert fields(seeds="1, 2") == fields(seeds="1,2")
    assert fields(guidance=1) == fields(guidance=1.0)


def test_the_key_follows_the_file_its_type_the_options_and_the_nonce() -> None:
    key = run_key(b"a cat\n", ".txt", fields(), None)
    assert key == run_key(b"a cat\n", ".TXT", fields(), None)
    assert len(key) <= 200  # the API's limit on an Idempotency-Key
    others = {
        run_key(b"a dog\n", ".txt", fields(), None),
        run_key(b"a cat\n", ".csv", fields(), None),
        run_key(b"a cat\n", ".txt", fields(steps=4), None),
        run_key(b"a cat\n", ".txt", fields(), "5eed"),
    }
    assert key not in others
    assert len(others) == 4


def test_the_resume_command_is_this_one_with_new_replaced_by_its_nonce() -> None:
    argv = [sys.argv[0], "run", "my prompts.txt", "--new", "--steps", "4"]
    resumed = shlex.split(resume_command(argv, "c0ffee"))
    assert resumed[-6:] == ["run", "my prompts.txt", "--nonce", "c0ffee", "--steps", "4"]
    assert shlex.split(resume_command(argv[:3], None))[-2:] == ["run", "my prompts.txt"]
