"""What a docs page (/docs, /redoc) makes the browser load, for the unit and the live checks that it
all comes from the service."""
from __future__ import annotations

import html.parser
import re


class _Links(html.parser.HTMLParser):
    """Every URL an HTML page makes the browser load: src and href attributes, and Redoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


def page_urls(page: str) -> list[str]:
    """The URLs of a docs page: its tags' src/href, and the OpenAPI URL Swagger UI's script fetches."""
    links = _Links()
    links.feed(page)
    return links.urls + re.findall(r"""\burl:\s*['"]([^'"]+)['"]""", page)
