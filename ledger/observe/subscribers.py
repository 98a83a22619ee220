"""Notification subscribers: the home's ``notify.toml``, read, checked and edited.

Subscribers are configuration, so they live in a file an operator (or configuration
management) can read, review and version: ``HOME/notify.toml``, one table per
subscriber::

    [subscribers.chatops]
    url = "https://hooks.example.com/upgrades"   # a webhook: HTTP POST of the event
    kinds = ["upgrade.state", "component.failed"]
    headers = { Authorization = "Bearer s3cret" }

    [subscribers.pager]
    hook = "/usr/local/lib/upgrade-hooks/page"   # an executable: the event on stdin
    kinds = ["upgrade."]
    timeout_s = 10

How far each subscriber has been served is delivery state, not configuration: it is
kept in the ledger (``ledger.notify``). ``add`` and ``remove`` edit the file as text
so that an operator's comments survive, and re-read the result to prove the edit did
exactly what was asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ledger.errors import BadInput, LockTimeout, StorageError
from ledger.store.files import FILE_MODE
from ledger.store.home import Home

CONFIG_NAME = "notify.toml"
LOCK_NAME = "notify.lock"
MAX_CONFIG_BYTES = 1024 * 1024

#: Byte ranges of notify.lock: one deliverer at a time; one editor of notify.toml at a
#: time. Separate ranges, so an edit never waits for a slow delivery.
DELIVERY_REGION = 0
CONFIG_REGION = 1

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RETRY_INITIAL_S = 5.0
DEFAULT_RETRY_MAX_S = 900.0
STARTS = ("new", "all")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*\.?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEYS = {"url", "hook", "kinds", "headers", "timeout_s", "retry_initial_s", "retry_max_s",
         "start"}


@dataclass(frozen=True)
class Subscriber:
    """One subscriber: a webhook *url* or an executable *hook*, never both."""

    name: str
    url: str | None = None
    hook: str | None = None
    kinds: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_initial_s: float = DEFAULT_RETRY_INITIAL_S
    retry_max_s: float = DEFAULT_RETRY_MAX_S
    start: str = "new"

    @property
    def kind(self) -> str:
        """``webhook`` or ``hook``."""
        return "webhook" if self.url is not None else "hook"

    @property
    def target(self) -> str:
        """Where events go, with any password in the URL hidden."""
        if self.url is None:
            return str(self.hook)
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username}:***@{parts.hostname}" + \
            (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()

    def wants(self, kind: str) -> bool:
        """Whether the kind filter lets an event of *kind* through (no filter: all)."""
        if not self.kinds:
            return True
        return any(kind == k or (k.endswith(".") and kind.startswith(k)) for k in self.kinds)

    def retry_delay_s(self, attempts: int) -> float:
        """Seconds to wait after the *attempts*-th consecutive failure: doubling from
        ``retry_initial_s``, capped at ``retry_max_s``."""
        exponent = max(0, min(attempts - 1, 30))
        return float(min(self.retry_max_s, self.retry_initial_s * 2 ** exponent))


def config_path(home: Home) -> Path:
    """``HOME/notify.toml``."""
    return home.root / CONFIG_NAME


def load(home: Home) -> list[Subscriber]:
    """The configured subscribers in file order; none when there is no notify.toml."""
    path = config_path(home)
    text = _read(path)
    return [] if text is None else parse(text, str(path))


def parse(text: str, where: str = CONFIG_NAME) -> list[Subscriber]:
    """Subscribers from the text of a notify.toml; BadInput naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{where}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"subscribers"})
    if unknown:
        raise BadInput(f"{where}: unknown top-level key {unknown[0]!r}; "
                       "subscribers go in [subscribers.NAME] tables")
    tables = data.get("subscribers", {})
    if not isinstance(tables, dict):
        raise BadInput(f"{where}: 'subscribers' must be a table of [subscribers.NAME] tables")
    return [check(name, body, where) for name, body in tables.items()]


def check(name: object, body: object, where: str | None = CONFIG_NAME) -> Subscriber:
    """One subscriber's settings, checked; BadInput naming the subscriber (and *where*
    it is configured, when given)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInput(f"{prefix}subscriber name {str(name)[:80]!r} must be 1-64 letters, "
                       "digits, '_' or '-'")
    what = f"{prefix}subscriber {name}"
    if not isinstance(body, dict):
        raise BadInput(f"{what}: must be a table ([subscribers.{name}])")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        raise BadInput(f"{what}: unknown key {unknown[0]!r}; expected some of "
                       f"{', '.join(sorted(_KEYS))}")
    url, hook = body.get("url"), body.get("hook")
    if (url is None) == (hook is None):
        raise BadInput(f"{what}: give exactly one of url (a webhook) or hook (an executable)")
    return Subscriber(
        name=name,
        url=None if url is None else check_url(url, what),
        hook=None if hook is None else check_hook_path(hook, what),
        kinds=_kinds(body.get("kinds", []), what),
        headers=_headers(body.get("headers", {}), what),
        timeout_s=_seconds(body, "timeout_s", DEFAULT_TIMEOUT_S, what, low=0.1, high=300.0),
        retry_initial_s=_seconds(body, "retry_initial_s", DEFAULT_RETRY_INITIAL_S, what,
                                 low=0.0, high=86400.0),
        retry_max_s=_seconds(body, "retry_max_s", DEFAULT_RETRY_MAX_S, what,
                             low=0.0, high=7 * 86400.0),
        start=_start(body.get("start", "new"), what),
    )


def check_url(url: object, what: str = "url") -> str:
    """A webhook URL: http:// or https:// with a host, printable, at most 2048 chars."""
    if not isinstance(url, str) or not url or len(url) > 2048 or _CONTROL.search(url) \
            or " " in url:
        raise BadInput(f"{what}: url must be an http:// or https:// URL of at most 2048 "
                       "printable characters")
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError as exc:
        raise BadInput(f"{what}: url {url[:200]!r} is malformed ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadInput(f"{what}: url {url[:200]!r} is not http(s); a webhook must be "
                       "http://HOST/... or https://HOST/...")
    return url


def check_hook_path(hook: object, what: str = "hook") -> str:
    """A hook: an absolute path, printable (whether it is executable is checked when it
    is added and again at each delivery)."""
    if not isinstance(hook, str) or not hook.startswith("/") or len(hook) > 4096 \
            or _CONTROL.search(hook):
        raise BadInput(f"{what}: hook must be the absolute path of an executable")
    return hook


def check_executable(hook: str) -> str | None:
    """Why *hook* cannot run (a sentence), or None when it is an executable file."""
    path = Path(hook)
    if not path.exists():
        return f"hook {hook} does not exist"
    if not path.is_file():
        return f"hook {hook} is not a file"
    if not os.access(path, os.X_OK):
        return f"hook {hook} is not executable (chmod +x it)"
    return None


def _kinds(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise BadInput(f"{what}: kinds must be a list of event kinds, e.g. "
                       "[\"upgrade.state\", \"component.\"]")
    for kind in value:
        if not _KIND.fullmatch(kind) or len(kind) > 64:
            raise BadInput(f"{what}: {kind[:80]!r} is not an event kind (e.g. "
                           "'component.failed', or a prefix ending in '.' such as 'upgrade.')")
    return tuple(value)


def _headers(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise BadInput(f"{what}: headers must be a table of NAME = \"value\"")
    reserved = {"content-type", "idempotency-key", "content-length", "host"}
    out = {}
    for key, val in value.items():
        if not _HEADER_NAME.fullmatch(key) or key.lower() in reserved:
            raise BadInput(f"{what}: {key[:80]!r} cannot be a header here")
        if not isinstance(val, str) or _CONTROL.search(val) or len(val) > 4096:
            raise BadInput(f"{what}: header {key} must be one line of printable text")
        out[key] = val
    return out


def _seconds(body: Mapping[str, Any], key: str, default: float, what: str, *,
             low: float, high: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not low <= value <= high:
        raise BadInput(f"{what}: {key} must be a number of seconds from {low:g} to {high:g}")
    return float(value)


def _start(value: object, what: str) -> str:
    if value not in STARTS:
        raise BadInput(f"{what}: start must be 'new' (events after the subscriber was "
                       "configured) or 'all' (the whole trail)")
    return str(value)


def _read(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path} ({exc.strerror or exc})") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise BadInput(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not UTF-8 text") from None


def config_mtime(home: Home) -> float | None:
    """When notify.toml was last written (None without one): a subscriber seen for the
    first time with ``start = "new"`` is served the events recorded after that."""
    try:
        return config_path(home).stat().st_mtime
    except OSError:
        return None


# -- editing -------------------------------------------------------------------------


def add(home: Home, sub: Subscriber) -> None:
    """Append *sub* to notify.toml (created 0600 when missing); BadInput if its name is
    taken or, for a hook, if the file is not an executable."""
    if sub.hook is not None:
        problem = check_executable(sub.hook)
        if problem:
            raise BadInput(f"subscriber {sub.name}: {problem}")
    with region_lock(home, CONFIG_REGION, wait_s=10.0):
        path = config_path(home)
        text = _read(path) or ""
        existing = parse(text, str(path))
        if any(s.name == sub.name for s in existing):
            raise BadInput(f"subscriber {sub.name} exists already in {path}; remove it first")
        new_text = text + ("\n" if text and not text.endswith("\n") else "") + \
            ("\n" if text.strip() else "") + render(sub)
        if parse(new_text, str(path)) != [*existing, sub]:  # pragma: no cover - a guard
            raise BadInput(f"cannot add {sub.name} to {path} safely; edit it by hand")
        home.write_atomic(path, new_text.encode("utf-8"))


def remove(home: Home, name: str) -> Subscriber:
    """Remove subscriber *name*'s table from notify.toml (comments elsewhere stay);
    return what it was. BadInput when there is no such subscriber."""
    with region_lock(home, CONFIG_REGION, wait_s=10.0):
        path = config_path(home)
        text = _read(path) or ""
        existing = parse(text, str(path))
        gone = next((s for s in existing if s.name == name), None)
        if gone is None:
            raise BadInput(f"no subscriber {name!r} in {path}")
        lines = text.splitlines(keepends=True)
        header = re.compile(r"\s*\[\s*subscribers\s*\.\s*(?:\"{0}\"|'{0}'|{0})\s*\]\s*(#.*)?"
                            .format(re.escape(name)))
        start = next((i for i, line in enumerate(lines) if header.fullmatch(line.rstrip("\n"))),
                     None)
        kept = None
        if start is not None:
            end = next((j for j in range(start + 1, len(lines))
                        if lines[j].lstrip().startswith("[")), len(lines))
            # Comments (and blank lines) just above the next table belong to it.
            while end > start + 1 and (not lines[end - 1].strip() or
                                       lines[end - 1].lstrip().startswith("#")):
                end -= 1
            kept = "".join(lines[:start] + lines[end:])
        if kept is None or parse(kept, str(path)) != [s for s in existing if s.name != name]:
            raise BadInput(f"cannot remove {name} from {path} automatically (it is not "
                           "written as a [subscribers.NAME] table); edit the file by hand")
        home.write_atomic(path, kept.encode("utf-8"))
        return gone


def render(sub: Subscriber) -> str:
    """A subscriber as a notify.toml table (only settings that differ from defaults)."""
    lines = [f"[subscribers.{sub.name}]"]
    lines.append(f"url = {_toml(sub.url)}" if sub.url is not None else
                 f"hook = {_toml(sub.hook)}")
    if sub.kinds:
        lines.append("kinds = [" + ", ".join(_toml(k) for k in sub.kinds) + "]")
    if sub.headers:
        lines.append("headers = { " + ", ".join(f"{k} = {_toml(v)}"
                                                for k, v in sub.headers.items()) + " }")
    for key, default in (("timeout_s", DEFAULT_TIMEOUT_S),
                         ("retry_initial_s", DEFAULT_RETRY_INITIAL_S),
                         ("retry_max_s", DEFAULT_RETRY_MAX_S)):
        value = getattr(sub, key)
        if value != default:
            lines.append(f"{key} = {value!r}")
    if sub.start != "new":
        lines.append(f"start = {_toml(sub.start)}")
    return "\n".join(lines) + "\n"


def _toml(value: str | None) -> str:
    # A TOML basic string: JSON's escapes are a subset of TOML's, and every value
    # written here was checked to hold no control characters.
    return json.dumps(value, ensure_ascii=False)


# -- the lock file -------------------------------------------------------------------


@contextlib.contextmanager
def region_lock(home: Home, region: int, *, wait_s: float, must: bool = True,
                ) -> Iterator[bool]:
    """Hold byte *region* of ``HOME/notify.lock``, waiting up to *wait_s*.

    A POSIX record lock: the kernel releases it when its holder dies, so a killed
    deliverer never blocks the next. When the lock stays busy, raise LockTimeout, or
    with ``must=False`` yield False (holding nothing) and let the caller skip its work.
    """
    path = home.root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StorageError(f"cannot open {path} ({exc.strerror or exc}); check permissions") \
            from exc
    try:
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, region)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    if not must:
                        yield False
                        return
                    raise LockTimeout(f"{path} stayed locked for {wait_s:g} s by another "
                                      "upgrade-ledger process") from None
                time.sleep(0.02)
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the record lock
