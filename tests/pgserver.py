"""A throwaway PostgreSQL server for the test suite, or an existing one.

``LEDGER_TEST_PG_URL`` (a URL of a role that may create databases) points the suite
at a server that runs already. Otherwise the suite makes its own cluster once per
session with ``initdb`` and ``pg_ctl`` (from PATH, or Debian's
/usr/lib/postgresql/*/bin) in a temporary folder, listening on a Unix socket only,
and removes it at the end. The server refuses to run as root: a suite running as
root runs it as the ``postgres`` user, else as ``nobody``.

Each test gets a database of its own (``Server.new_database``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

#: Settings for a server that only lives for a test run: durability is not needed,
#: many connections are (the concurrency tests open dozens at once).
SERVER_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300 -c listen_addresses='' -c shared_buffers=32MB")


class Unavailable(Exception):
    """No PostgreSQL server can be had (the reason is the message)."""


class Server:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, admin_url: str, stop: list[str] | None = None,
                 folder: Path | None = None, start: list[str] | None = None) -> None:
        self.admin_url = admin_url
        self._stop = stop
        self._start = start
        self._folder = folder
        self._numbers = itertools.count(1)

    def pause(self) -> None:
        """Stop a server the suite started (as a crash would: immediate mode), keeping
        its data; ``resume`` starts it again."""
        assert self._stop is not None, "not a server of the suite's own"
        subprocess.run(self._stop, capture_output=True, check=True, timeout=60)

    def resume(self) -> None:
        """Start again a server ``pause`` stopped."""
        assert self._start is not None, "not a server of the suite's own"
        subprocess.run(self._start, capture_output=True, check=True, timeout=180,
                       cwd=self._folder)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; return its URL (postgresql://...)."""
        import psycopg  # noqa: PLC0415

        name = f"ledger_{prefix}_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return database_url(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        """Drop the database of *url* (its connections are ended first)."""
        import psycopg  # noqa: PLC0415

        name = url.split("?", 1)[0].rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Stop the server the suite started (an existing server is left running)."""
        if self._stop is not None:
            subprocess.run(self._stop, capture_output=True, check=False, timeout=60)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def database_url(admin_url: str, name: str) -> str:
    """*admin_url* with its database replaced by *name*."""
    base, sep, query = admin_url.partition("?")
    scheme_host = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    return f"{scheme_host}/{name}{sep}{query}"


def _binaries() -> tuple[str, str]:
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb = shutil.which("initdb", path=folder)
        pg_ctl = shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    raise Unavailable("initdb and pg_ctl are not installed (Debian: apt-get install "
                      "postgresql); or set LEDGER_TEST_PG_URL to a server's URL")


def _run_as() -> list[str]:
    """The command prefix that runs the server as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise Unavailable("running as root without runuser: cannot start PostgreSQL as an "
                          "unprivileged user; set LEDGER_TEST_PG_URL")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return [runuser, "-u", name, "--"]
    raise Unavailable("running as root and neither a 'postgres' nor a 'nobody' user exists "
                      "to run PostgreSQL as; set LEDGER_TEST_PG_URL")


def start() -> Server:
    """The server to test against: ``LEDGER_TEST_PG_URL``'s, else a new cluster."""
    given = os.environ.get("LEDGER_TEST_PG_URL")
    if given:
        return Server(given)
    return start_own()


def start_own() -> Server:
    """A new cluster of the caller's own, whatever ``LEDGER_TEST_PG_URL`` says (a test
    that stops its server needs one nobody else uses)."""
    initdb, pg_ctl = _binaries()
    prefix = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
    data = folder / "data"
    if prefix:
        owner = pwd.getpwnam(prefix[2])
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    folder.chmod(0o700)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    done = subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust",
                           "-E", "UTF8", "--no-sync", "--no-instructions"],
                          capture_output=True, text=True, check=False, env=env, timeout=300,
                          cwd=folder)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise Unavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
    port = 50000 + os.getpid() % 10000  # names the socket file; no TCP port is opened
    stop = [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]
    begin = [*prefix, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"),
             "-w", "-t", "120", "-o", f"-p {port} -k {folder} {SERVER_SETTINGS}", "start"]
    done = subprocess.run(begin, capture_output=True, text=True, check=False, env=env,
                          timeout=180, cwd=folder)
    if done.returncode != 0:
        log = (folder / "server.log").read_text(errors="replace") \
            if (folder / "server.log").exists() else ""
        subprocess.run(stop, capture_output=True, check=False, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        raise Unavailable(f"pg_ctl start failed: {(done.stderr + log).strip()[-500:]}")
    url = f"postgresql://postgres@/postgres?host={quote(str(folder))}&port={port}"
    return Server(url, stop, folder, begin)
