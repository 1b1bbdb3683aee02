"""Readable image names: `{index:05d}-{seed}-{prompt slug}`, safe on Linux, macOS and Windows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.archive import UniqueNames
from jobs.filenames import SLUG_CHARS, WINDOWS_RESERVED, image_stem, prompt_slug
from jobs.lifecycle import Claim
from jobs.params import GenerationParams
from jobs.results import result_file, result_location, stored_result_path
from worker.outputs import image_path

SAFE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("A red fox, in the snow: 35mm", "a-red-fox-in-the-snow-35mm"),
        ("  --Hello__World!!  ", "hello-world"),
        ("Café crème brûlée", "cafe-creme-brulee"),
        ("line one\nline two\r\nthree", "line-one-line-two-three"),
        ('"quoted" (weights:1.2) [x]', "quoted-weights-1-2-x"),
        ("東京の夜景", "image"),
        ("!!!", "image"),
        ("...", "image"),
        ("CON", "con-image"),
        ("lpt1", "lpt1-image"),
        ("con game", "con-game"),
    ],
)
def test_slug(prompt: str, slug: str) -> None:
    assert prompt_slug(prompt) == slug


def test_slug_is_cut_at_a_word_and_never_ends_in_a_hyphen() -> None:
    """A long prompt is cut at the last whole word within the limit."""
    prompt = "an extremely detailed oil painting of a lighthouse on a cliff at dusk, crashing waves"
    slug = prompt_slug(prompt)
    assert slug == "an-extremely-detailed-oil-painting-of-a"
    assert len(slug) <= SLUG_CHARS and SAFE.match(slug)
    assert prompt.lower().replace(" ", "-").startswith(slug)


def test_one_long_word_is_cut_hard() -> None:
    """No word boundary in reach: the slug is cut at the limit instead of coming back empty."""
    assert prompt_slug("x" * 200) == "x" * SLUG_CHARS
    assert prompt_slug("ab " + "y" * 200) == ("ab-" + "y" * 200)[:SLUG_CHARS]


@pytest.mark.parametrize("prompt", ["a" * 47 + " b", "word " * 30, "-" * 100 + "z", "é" * 300, "a-" * 60])
def test_slugs_are_always_safe_and_short(prompt: str) -> None:
    slug = prompt_slug(prompt)
    assert SAFE.match(slug), slug
    assert 1 <= len(slug) <= SLUG_CHARS
    assert slug not in WINDOWS_RESERVED


def test_stem_with_and_without_an_index() -> None:
    assert image_stem(index=7, seed=42, prompt="A cat") == "00007-42-a-cat"
    assert image_stem(index=123456, seed=0, prompt="A cat") == "123456-0-a-cat"
    assert image_stem(index=None, seed=42, prompt="A cat") == "42-a-cat"


def test_repeated_names_get_a_number() -> None:
    """Within one archive, a stem given before gets -2, -3; a stem that looks numbered is no exception."""
    names = UniqueNames()
    given = [names.claim(stem) for stem in ["00001-5-cat", "00001-5-cat", "00001-5-cat-2", "00001-5-cat"]]
    assert given == ["00001-5-cat.png", "00001-5-cat-2.png", "00001-5-cat-2-2.png", "00001-5-cat-3.png"]


def claim(*, batch_id: str | None, index: int, token: str) -> Claim:
    params = GenerationParams(prompt="A red fox: dawn", seed=99, model="synthetic:tiny")
    return Claim(
        job_id="job-1", lease_token=token, attempt=1, params=params, batch_id=batch_id, batch_index=index
    )


def test_disk_name_keeps_the_attempts_lease(tmp_path: Path) -> None:
    """On disk: the readable stem, then the attempt's lease, in the batch's folder (or `single`)."""
    first = image_path(tmp_path, claim(batch_id="b1", index=3, token="0123abcd-rest"))
    second = image_path(tmp_path, claim(batch_id="b1", index=3, token="89efcdab-rest"))
    assert first == tmp_path / "b1" / "00003-99-a-red-fox-dawn-0123abcd.png"
    assert second.name == "00003-99-a-red-fox-dawn-89efcdab.png"
    single = image_path(tmp_path, claim(batch_id=None, index=0, token="0123abcd-rest"))
    assert single == tmp_path / "single" / "99-a-red-fox-dawn-0123abcd.png"


def test_a_result_is_stored_relative_to_outputs_in_posix_form(tmp_path: Path) -> None:
    """The database holds the image's place in OUTPUTS_DIR, so another machine's mount finds it."""
    path = image_path(tmp_path, claim(batch_id="b1", index=3, token="0123abcd-rest"))
    assert stored_result_path(tmp_path, path) == "b1/00003-99-a-red-fox-dawn-0123abcd.png"
    with pytest.raises(ValueError):
        stored_result_path(tmp_path / "outputs", path)  # never written outside: refused, not stored


def test_a_stored_result_is_found_under_the_readers_own_outputs(tmp_path: Path) -> None:
    """Relative rows join this machine's OUTPUTS_DIR; old absolute rows are taken as they are, if inside."""
    mounted = tmp_path / "mounted-here"
    image = mounted / "b1" / "00003-1-fox-0123abcd.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    assert result_file(mounted, "b1/00003-1-fox-0123abcd.png") == image
    assert result_file(mounted, str(image)) == image  # a row from before relative paths
    assert result_file(mounted, "b1/missing.png") is None
    assert result_file(mounted, None) is None and result_file(mounted, "") is None
    assert result_location(mounted, "b1/x.png") == str(mounted / "b1" / "x.png")


def test_a_stored_result_that_leads_out_of_outputs_is_refused(tmp_path: Path) -> None:
    """`..`, an outside absolute path and a symlink out are refused though the file they name exists."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the API")
    (outputs / "link.png").symlink_to(secret)
    for stored in ["../secret.png", "b1/../../secret.png", str(secret), "link.png"]:
        assert result_file(outputs, stored) is None, stored
    assert result_location(outputs, "../secret.png") is None
    assert result_location(outputs, str(secret)) is None
    assert result_location(outputs, "..") is None


def test_an_outputs_dir_at_the_root_still_locates_its_images(tmp_path: Path) -> None:
    """OUTPUTS_DIR=/ (a container's whole volume) holds every absolute path, but not itself."""
    root = Path("/")
    assert result_location(root, "b1/x.png") == "/b1/x.png"
    assert result_location(root, str(tmp_path / "x.png")) == str(tmp_path / "x.png")
    assert result_location(root, "../b1/x.png") == "/b1/x.png"  # `..` of the root is the root
    assert result_location(root, "") is None and result_location(root, ".") is None
    sibling = tmp_path / "outputs-old" / "x.png"  # a sibling sharing the folder name's prefix
    assert result_location(tmp_path / "outputs", str(sibling)) is None
