"""Sending one notification, bounded by one deadline for the whole delivery.

A per-operation socket timeout does not bound a request: a webhook answering one
byte per second never trips it. So every step of a delivery here (name lookup,
connect, TLS handshake, sending, each read) waits at most until the delivery's
*deadline*, in slices of ``SLICE_S``, and between slices asks whether the run was
asked to stop (a signal to ``apply``): a pending signal then ends the delivery at
once. A hook is killed with its process group at the deadline, and its pipes are
never waited on after that (a child it left behind may hold them for ever).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import urllib.request
from typing import Any

from ledger.observe.deadline import Deadline

#: Stderr kept from a hook (its last line is the error recorded).
HOOK_STDERR_BYTES = 4096

# -- webhooks ------------------------------------------------------------------------


def opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections keep *deadline* (proxies from the usual
    environment variables still apply; redirects are failures, not followed)."""
    return urllib.request.build_opener(_HTTP(deadline), _HTTPS(deadline), _NoRedirects)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirected POST would lose its body: report the redirect as a failure."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: Any) -> Any:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        return _Connection(host, deadline=self.deadline, **kwargs)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        context = ssl.create_default_context()
        context.sslsocket_class = _BoundedSSLSocket
        super().__init__(context=context)
        self.deadline = deadline
        self.bounded_context = context

    def https_open(self, req: Any) -> Any:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        kwargs["context"] = self.bounded_context
        kwargs.pop("check_hostname", None)  # the context checks it
        return _SecureConnection(host, deadline=self.deadline, **kwargs)


class _Connection(http.client.HTTPConnection):
    """An HTTP connection that connects, sends and reads within a deadline."""

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        # http.client's documented hook for making its socket.
        self._create_connection = lambda address, *_: connect(address, deadline)


class _SecureConnection(http.client.HTTPSConnection):
    """An HTTPS connection that connects, shakes hands, sends and reads within a
    deadline."""

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self._create_connection = lambda address, *_: connect(address, deadline)

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        # The handshake is one call; CPython bounds all of it by the socket timeout.
        self.sock.settimeout(self.deadline.remaining())
        context: ssl.SSLContext = self._context  # type: ignore[attr-defined]
        tunnel: str | None = self._tunnel_host  # type: ignore[attr-defined]
        self.sock = context.wrap_socket(self.sock, server_hostname=tunnel or self.host)
        self.sock.deadline = self.deadline  # type: ignore[attr-defined]


class _Bounded:
    """Socket reads and writes that wait in slices until the deadline (a mixin)."""

    deadline: Deadline

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        while True:
            self.settimeout(self.deadline.slice())  # type: ignore[attr-defined]
            try:
                return int(super().recv_into(buffer, nbytes, flags))  # type: ignore[misc]
            except TimeoutError:
                continue  # nothing came in this slice; look at the deadline again

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            self.settimeout(self.deadline.slice())  # type: ignore[attr-defined]
            try:
                sent = self.send(view, flags)  # type: ignore[attr-defined]
            except TimeoutError:
                continue
            view = view[sent:]


class _BoundedSocket(_Bounded, socket.socket):
    pass


class _BoundedSSLSocket(_Bounded, ssl.SSLSocket):
    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        return super().recv_into(buffer, nbytes or 0, flags)


def connect(address: tuple[str, int], deadline: Deadline) -> socket.socket:
    """A TCP connection to *address*, made within *deadline*."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, where in _resolve(host, port, deadline):
        sock = _BoundedSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.setblocking(False)
            code = sock.connect_ex(where)
            while code in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
                _, ready, _ = select.select([], [sock], [], deadline.slice())
                if ready:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


def _resolve(host: str, port: int, deadline: Deadline) -> list[Any]:
    """``getaddrinfo`` within *deadline*: the system resolver cannot be interrupted, so
    a name is looked up in a thread that is left behind if it takes too long."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[Any] = []
    failed: list[OSError] = []

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    worker = threading.Thread(target=lookup, name="resolve", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(deadline.slice())
    if failed:
        raise failed[0]
    return found


# -- hooks ---------------------------------------------------------------------------


def run_hook(argv: list[str], body: bytes, env: dict[str, str],
             deadline: Deadline) -> tuple[int, str]:
    """Run a hook with *body* on stdin; ``(exit status, the end of its stderr)``.

    At the deadline (TimeoutError) or on a stop request (Cancelled) the hook's
    process group is killed and its pipes are closed unread. Once the hook has
    exited, its stderr is read only as far as it is already written: a child it left
    behind holding the pipe is never waited for.
    """
    # A session of its own, so that a hook that hangs is killed with its children.
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdin is not None and proc.stderr is not None
    stdin, stderr = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(stdin, False)
    os.set_blocking(stderr, False)
    pending, err = memoryview(body), bytearray()
    writing, reading = True, True
    try:
        while proc.poll() is None:
            ready, writable, _ = select.select([stderr] if reading else [],
                                               [stdin] if writing else [], [],
                                               deadline.slice())
            if writable:
                try:
                    pending = pending[os.write(stdin, pending):]
                except BrokenPipeError:
                    pending = pending[:0]
                except BlockingIOError:
                    pass
                if not pending:
                    proc.stdin.close()
                    writing = False
            if ready:
                reading = _read_some(stderr, err)
        if reading:
            _read_some(stderr, err)  # what is there already; never more
    except BaseException:
        _kill(proc)
        raise
    finally:
        for pipe in (proc.stdin, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
    return proc.returncode, err.decode("utf-8", "replace")


def _read_some(fd: int, into: bytearray) -> bool:
    """Read what *fd* holds now into *into* (its end kept); False at end of file."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        into += data
        del into[:-HOOK_STDERR_BYTES]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the hook and its process group; collect the hook, never its pipes."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
