"""The PNG's `parameters` text in A1111's infotext format, read back by the rules A1111 reads it with.

`tests/a1111_reader.py` is the reader: written from the format's rules, not from A1111's code.
"""

from __future__ import annotations

from typing import Any

import pytest

from jobs.params import GenerationParams
from tests.a1111_reader import NEGATIVE, read_infotext
from worker.outputs import a1111_parameters, infotext_value, model_name, program_version


def make_params(**overrides: Any) -> GenerationParams:
    values = {"prompt": "a cat", "seed": 123, "model": "Tongyi-MAI/Z-Image-Turbo", "steps": 9, **overrides}
    return GenerationParams(**values)


def test_the_text_looks_like_a1111s() -> None:
    """The exact layout: prompt, negative prompt line, then the fields in A1111's order."""
    text = a1111_parameters(make_params(negative_prompt="blurry", width=768, height=1344))
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 9, Sampler: Euler, CFG scale: 0.0, Seed: 123, Size: 768x1344, Model: Z-Image-Turbo, "
        f"Version: {program_version()}"
    )


@pytest.mark.parametrize("negative", [None, ""])
def test_no_negative_prompt_no_line(negative: str | None) -> None:
    text = a1111_parameters(make_params(negative_prompt=negative))
    assert NEGATIVE not in text
    assert read_infotext(text)["prompt"] == "a cat"


PROMPTS = [
    ("a red fox, in the snow: golden hour", "blurry, low quality"),
    ('a sign that reads "OPEN: 24h", neon', 'text: "watermark", signature'),
    ("first line, with a comma\nsecond: with a colon\n\nafter a blank line", "bad hands\nbad feet, extra"),
    ("Steps: 5, Sampler: x, Seed: 1\nstill the prompt", "Size: 1x1, CFG scale: 3, Seed: 9"),
    ("(masterpiece:1.2), [detailed], {a|b}, <lora:x:0.5>", None),
    ("東京の夜景, 雨: ネオン", "ぼやけた"),
    ("tab\tinside, and a trailing backslash \\", 'ends in a quote"'),
]


@pytest.mark.parametrize(("prompt", "negative"), PROMPTS)
def test_reads_back_with_a1111s_rules(prompt: str, negative: str | None) -> None:
    """Prompts with commas, colons, quotes and line breaks, and fields that look like fields, come back."""
    params = make_params(
        prompt=prompt,
        negative_prompt=negative,
        seed=2**63 - 1,
        steps=4,
        guidance_scale=3.5,
        width=512,
        height=768,
    )
    read = read_infotext(a1111_parameters(params))
    assert read["prompt"] == prompt
    assert read["negative_prompt"] == (negative or "")
    assert (read["steps"], read["seed"], read["cfg"], read["size"]) == (4, 2**63 - 1, 3.5, (512, 768))
    assert read["fields"]["Sampler"] == "Euler"
    assert read["fields"]["Model"] == "Z-Image-Turbo"


def test_carriage_returns_become_line_breaks() -> None:
    """A1111 splits on "\\n" only: "\\r\\n" and "\\r" are written as "\\n"."""
    text = a1111_parameters(make_params(prompt="one\r\ntwo\rthree", negative_prompt="x\r\ny"))
    assert "\r" not in text
    read = read_infotext(text)
    assert (read["prompt"], read["negative_prompt"]) == ("one\ntwo\nthree", "x\ny")


@pytest.mark.parametrize(
    ("model", "written", "read"),
    [
        ("synthetic:tiny", '"synthetic:tiny"', "synthetic:tiny"),
        ("/models/my, model", '"my, model"', "my, model"),
        ('"odd"', '"\\"odd\\""', '"odd"'),
        ("C:\\models\\zimage\\", "zimage", "zimage"),
    ],
)
def test_field_values_are_quoted_only_when_needed(model: str, written: str, read: str) -> None:
    """A value with a comma or colon (or one that starts with a quote) is a JSON string."""
    text = a1111_parameters(make_params(model=model))
    assert f"Model: {written}," in text
    assert read_infotext(text)["fields"]["Model"] == read


def test_quoting_follows_a1111() -> None:
    assert infotext_value("Euler") == "Euler"
    assert infotext_value(7.5) == "7.5"
    assert infotext_value("a, b") == '"a, b"'
    assert infotext_value("a:b") == '"a:b"'
    assert infotext_value("a\nb") == '"a\\nb"'
    assert infotext_value("é, ü") == '"é, ü"'  # not \\u-escaped, as A1111 writes it
    assert model_name("Tongyi-MAI/Z-Image-Turbo") == "Z-Image-Turbo"
