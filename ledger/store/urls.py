"""Database URLs: which driver a URL calls for, and how it is shown to people.

A password in a URL is never printed: every message, ``status``, ``doctor`` and log
line shows ``mask(url)``. Stdlib only.
"""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"(?P<head>://[^/?#@]*?:)(?P<secret>[^/?#@]*)(?P<at>@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&#]*)", re.IGNORECASE)
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


def mask(url: str) -> str:
    """*url* with its password (in the authority or a ``password=`` parameter) as ***."""
    url = _PASSWORD.sub(lambda m: m["head"] + "***" + m["at"], url)
    return _PASSWORD_PARAM.sub(lambda m: m["head"] + "***", url)


def secrets(url: str) -> list[str]:
    """The passwords written in *url*, to scrub from driver messages."""
    found = [m["secret"] for m in _PASSWORD.finditer(url)]
    found += [m["secret"] for m in _PASSWORD_PARAM.finditer(url)]
    return [s for s in found if s]


def scrub(text: str, url: str) -> str:
    """*text* (a driver's message) with every password of *url* replaced by ***."""
    for secret in secrets(url):
        text = text.replace(secret, "***")
    return text


def scheme(url: str) -> str:
    """The scheme of *url* (``postgresql+psycopg``, ``sqlite``), lower case."""
    return url.split(":", 1)[0].lower() if ":" in url else ""


def is_postgres(url: str) -> bool:
    """Whether *url* names a PostgreSQL database (served by psycopg 3)."""
    name = scheme(url)
    return name in _POSTGRES_SCHEMES or name.startswith("postgresql+")


def libpq(url: str) -> str:
    """*url* as libpq reads it (``postgresql://...``): TLS and other connection
    options pass through as query parameters (``?sslmode=verify-full``)."""
    return "postgresql:" + url.split(":", 1)[1]


def alchemy(url: str) -> str:
    """*url* as SQLAlchemy reads it: PostgreSQL through psycopg 3."""
    return "postgresql+psycopg:" + url.split(":", 1)[1] if is_postgres(url) else url
