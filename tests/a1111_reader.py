"""An independent reader of A1111's infotext (the PNG `parameters` text), for tests.

Written here from the format's rules, not copied from A1111: the text's last line holds `Key: value`
pairs separated by ", " (A1111 takes it as the fields line when it has at least three); a value is a
JSON string when it starts with a quote, else it runs to the next comma. Every line above it is
stripped; they are the prompt until a line starting with "Negative prompt:", the negative prompt after.
"""

from __future__ import annotations

import json
from typing import Any

NEGATIVE = "Negative prompt:"


def read_fields(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value", ...` as a dict of strings."""
    fields: dict[str, str] = {}
    rest = line.strip()
    while rest:
        key, colon, rest = rest.partition(":")
        assert colon, f"no value after {key!r}"
        rest = rest.lstrip(" ")
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:]
        else:
            value, _, rest = rest.partition(",")
            rest = "," + rest if rest else ""
        assert rest == "" or rest.startswith(","), f"junk after {key!r}: {rest[:20]!r}"
        fields[key.strip()] = str(value).strip()
        rest = rest[1:].lstrip(" ")
    return fields


def read_infotext(text: str) -> dict[str, Any]:
    """Prompt, negative prompt and fields, as A1111's reader splits them."""
    *lines, last = text.strip().split("\n")
    fields = read_fields(last)
    assert len(fields) >= 3, "A1111 would not take the last line as the fields line"
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in (each.strip() for each in lines):
        if line.startswith(NEGATIVE):
            target, line = negative, line[len(NEGATIVE) :].strip()
        target.append(line)
    width, _, height = fields["Size"].partition("x")
    return {
        "prompt": "\n".join(prompt),
        "negative_prompt": "\n".join(negative),
        "steps": int(fields["Steps"]),
        "seed": int(fields["Seed"]),
        "cfg": float(fields["CFG scale"]),
        "size": (int(width), int(height)),
        "fields": fields,
    }
