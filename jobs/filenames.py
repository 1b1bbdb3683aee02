"""Readable image file names, `{index:05d}-{seed}-{prompt slug}`, shared by the worker and the archive.

They live in `jobs` because both ends need them and neither may import the other.
"""

from __future__ import annotations

import re
import unicodedata

# Long enough to recognise a prompt, short enough that a full name stays under ~90 characters.
SLUG_CHARS = 48
EMPTY_SLUG = "image"
# Device names Windows refuses as a file's base name, whatever the extension.
WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{n}" for n in range(10)), *(f"lpt{n}" for n in range(10))}
)
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def prompt_slug(prompt: str, max_chars: int = SLUG_CHARS) -> str:
    """The prompt as lowercase ASCII words joined by '-', cut at a word boundary; never empty."""
    folded = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = _NOT_ALPHANUMERIC.sub("-", folded.lower()).strip("-")
    if len(slug) > max_chars:
        slug = _cut_at_word(slug, max_chars)
    if not slug:
        return EMPTY_SLUG
    return f"{slug}-{EMPTY_SLUG}" if slug in WINDOWS_RESERVED else slug


def _cut_at_word(slug: str, max_chars: int) -> str:
    """At most max_chars, ending at a whole word unless that would lose more than half."""
    head = slug[: max_chars + 1]
    whole_words = head.rsplit("-", 1)[0] if "-" in head else ""
    cut = whole_words if len(whole_words) >= max_chars // 2 else head[:max_chars]
    return cut.strip("-")


def image_stem(*, index: int | None, seed: int, prompt: str) -> str:
    """`{index:05d}-{seed}-{slug}` for a batch's job; `{seed}-{slug}` for a job outside any batch."""
    readable = f"{seed}-{prompt_slug(prompt)}"
    return readable if index is None else f"{index:05d}-{readable}"
