"""Query parameters shared by the paginated lists, and their cursor errors as 422s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Query

from api.errors import invalid
from jobs.pages import BadCursor, Page

DEFAULT_PAGE = 100
MAX_PAGE = 1000

PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"rows per page, at most {MAX_PAGE}")]
PageCursor = Annotated[
    str | None,
    Query(
        max_length=200,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="`next_cursor` of the previous page; omit it for the first page",
    ),
]


def page_or_422(read_page: Callable[[], Page]) -> Page:
    """The page, or a 422 naming the cursor when the client sent one this list did not issue."""
    try:
        return read_page()
    except BadCursor as error:
        raise invalid(["query", "cursor"], str(error)) from None
