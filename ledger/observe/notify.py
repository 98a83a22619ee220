"""Notification delivery: every event, at least once, never ahead of the ledger.

Each subscriber (``ledger.subscribers``: a webhook URL or an executable hook) has a
cursor in the ledger's ``notify_cursors`` table: the id of the last event it was served.
A pass reads committed events after the cursor, sends each one its kind filter wants,
and moves the cursor in a transaction only *after* the subscriber accepted it. So a
crash between the send and the commit sends that event again (at least once: webhooks
get ``Idempotency-Key: <lineage>-<event id>`` to drop the repeat), and nothing is ever
sent that the ledger has not committed, nor skipped.

A failed delivery stops that subscriber's pass (order is kept: event n+1 never
overtakes event n), counts an attempt, records the error and the time of the next try
(doubling backoff). A subscriber that has not answered when the pass's time budget
runs out is counted the same way: one that never answers costs one budget, then waits
its backoff, instead of holding up every pass. Each delivery is bounded by one
deadline for the whole request (``ledger.observe.send``), a stop request (a signal
to ``apply``) cuts it short at once, and ``deliver_pending`` never raises: a slow or
dead subscriber can delay notifications, never an upgrade step.

Writers serialise on the database, so event ids commit in increasing order on every
backend (PostgreSQL included): a cursor never jumps over an event committed later.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ledger.core import clock
from ledger.core.version import __version__
from ledger.errors import BadInput, LedgerError
from ledger.observe.deadline import Cancelled, Deadline
from ledger.observe.subscribers import (
    DELIVERY_REGION,
    Subscriber,
    add,
    check_executable,
    config_mtime,
    load,
    region_lock,
    remove,
)
from ledger.queries import event_dict
from ledger.store import meta

if TYPE_CHECKING:
    from ledger.api import Ledger
    from ledger.store.database import Database, Row, Tx
    from ledger.store.home import Home

#: Events read per query while catching a subscriber up.
BATCH = 200
#: Budget of the pass ``apply`` runs after each change.
STEP_BUDGET_S = 2.0
#: Budget of an on-demand ``notify``.
COMMAND_BUDGET_S = 60.0
#: How long a pass after a change waits for another deliverer to finish. Short: that
#: deliverer sends this change's events too, or the next pass does.
STEP_LOCK_WAIT_S = 0.1


@dataclass
class Outcome:
    """What one pass did for one subscriber.

    ``state``: ``ok`` (caught up), ``failing`` (a delivery failed just now, or got no
    answer before the pass's budget ran out), ``waiting`` (backing off until
    ``next_try_at``), ``deferred`` (the pass ran out of time or was asked to stop
    before this subscriber's turn; the rest waits for the next pass), ``moved``
    (another deliverer moved the cursor meanwhile).
    """

    subscriber: str
    state: str = "ok"
    delivered: int = 0
    cursor: int = 0
    event_id: int | None = None
    attempts: int = 0
    next_try_at: str | None = None
    error: str | None = None


@dataclass
class Report:
    """What a delivery pass did: one outcome per subscriber, or why it did nothing."""

    outcomes: list[Outcome] = field(default_factory=list)
    busy: bool = False  # another process was delivering for the whole budget
    error: str | None = None  # the pass could not run (e.g. a broken notify.toml)

    @property
    def delivered(self) -> int:
        """Notifications delivered in this pass."""
        return sum(o.delivered for o in self.outcomes)

    @property
    def failing(self) -> list[Outcome]:
        """Subscribers whose delivery failed in this pass."""
        return [o for o in self.outcomes if o.state == "failing"]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{delivered, busy, error, subscribers: [outcome, ...]}``."""
        return {"delivered": self.delivered, "busy": self.busy, "error": self.error,
                "subscribers": [asdict(o) for o in self.outcomes]}


def deliver_pending(ledger: Ledger, budget_s: float = STEP_BUDGET_S, *,
                    force: bool = False, lock_wait_s: float | None = None,
                    cancel: Callable[[], bool] | None = None) -> Report:
    """Deliver what is pending, within *budget_s*; never raises.

    This is what runs after each change an upgrade run makes: every problem (a broken
    notify.toml, a dead subscriber, a busy database) ends up in the report and in the
    cursors, never in the caller.
    """
    try:
        return deliver(ledger, budget_s, force=force, lock_wait_s=lock_wait_s,
                       cancel=cancel)
    except Exception as exc:  # by contract nothing reaches the step
        return Report(error=f"notifications not delivered: {exc}")


@contextlib.contextmanager
def delivering(ledger: Ledger, budget_s: float = STEP_BUDGET_S, *,
               cancel: Callable[[], bool] | None = None) -> Iterator[None]:
    """While inside, deliver pending notifications after every change *ledger* makes
    (how an upgrade run notifies as it goes), each pass within *budget_s*; one last
    pass on the way out catches what a busy moment left behind. Once *cancel()* is
    true (the run was asked to stop), deliveries end at once and no more start."""

    def after_change() -> None:
        # Another deliverer at work (a `notify` from cron) is not waited for: it or
        # the next pass sends this change's events.
        deliver_pending(ledger, budget_s, lock_wait_s=STEP_LOCK_WAIT_S, cancel=cancel)

    ledger.after_change.append(after_change)
    try:
        yield
    finally:
        ledger.after_change.remove(after_change)
        deliver_pending(ledger, budget_s, cancel=cancel)


def deliver(ledger: Ledger, budget_s: float = COMMAND_BUDGET_S, *, force: bool = False,
            only: str | None = None, lock_wait_s: float | None = None,
            cancel: Callable[[], bool] | None = None) -> Report:
    """Deliver pending events to every subscriber (or only the one named *only*).

    *force* ignores the backoff of failing subscribers. Another process delivering
    is waited for up to *lock_wait_s* (default: the whole budget), then the report
    says ``busy``. Once *cancel()* is true, the delivery under way is cut short (not
    counted against its subscriber) and no other starts. Raises BadInput for a broken
    notify.toml or an unknown *only*; delivery failures are reported, not raised.
    """
    if cancel is not None and cancel():
        return Report()
    deadline = time.monotonic() + budget_s
    subs = load(ledger.home)
    if only is not None:
        subs = [s for s in subs if s.name == only]
        if not subs:
            raise BadInput(f"no subscriber {only!r} in {ledger.home.root}/notify.toml")
    report = Report()
    if not subs:
        return report
    wait_s = budget_s if lock_wait_s is None else min(lock_wait_s, budget_s)
    with region_lock(ledger.home, DELIVERY_REGION, wait_s=wait_s, must=False) as mine:
        if not mine:
            report.busy = True
            return report
        lineage = _lineage(ledger)
        for sub in subs:
            report.outcomes.append(_serve(ledger, sub, lineage, deadline, force, cancel))
    return report


def add_subscriber(ledger: Ledger, sub: Subscriber) -> int:
    """Add *sub* (made by ``subscribers.check``, which refuses bad input before
    anything is touched) to the home's notify.toml and give it a cursor; return the
    last event id it is not sent."""
    add(ledger.home, sub)
    return register(ledger, sub)


def remove_subscriber(ledger: Ledger, name: str) -> Subscriber:
    """Remove subscriber *name* from notify.toml and forget its delivery cursor."""
    sub = remove(ledger.home, name)
    forget(ledger, name)
    return sub


def register(ledger: Ledger, sub: Subscriber) -> int:
    """Create *sub*'s cursor if it has none; return the cursor (last event id served).

    A new subscriber with ``start = "new"`` starts after the events recorded before
    notify.toml was last written (the moment it was configured); ``"all"`` starts at
    the beginning of the trail.
    """
    with ledger.db.read() as tx:
        row = _cursor(tx, sub.name)
    if row is not None:
        return int(row["last_event_id"])
    with ledger.db.write() as tx:
        row = _cursor(tx, sub.name)
        if row is not None:
            return int(row["last_event_id"])
        if sub.start == "all":
            start = 0
        else:
            mtime = config_mtime(ledger.home)
            start = tx.scalar(
                "SELECT COALESCE(MAX(id), 0) FROM events WHERE host = :host" +
                ("" if mtime is None else " AND at < :t"),
                {} if mtime is None else {"t": clock.stamp(datetime.fromtimestamp(mtime, UTC))})
        tx.execute("INSERT INTO notify_cursors (host, subscriber, last_event_id, created_at) "
                   "VALUES (:host, :s, :id, :at)", {"s": sub.name, "id": int(start),
                                             "at": clock.now()})
        return int(start)


def forget(ledger: Ledger, name: str) -> bool:
    """Drop *name*'s cursor (after the subscriber was removed); True if there was one."""
    with ledger.db.write() as tx:
        removed: int = tx.execute("DELETE FROM notify_cursors WHERE host = :host AND "
                                  "subscriber = :s",
                                  {"s": name})
    return removed > 0


def cursors(ledger: Ledger) -> list[dict[str, Any]]:
    """Every configured subscriber with its delivery state, for ``subscribers list``."""
    return _states(load(ledger.home), ledger.db)


def _states(subs: list[Subscriber], db: Database) -> list[dict[str, Any]]:
    with db.read() as tx:
        rows = {r["subscriber"]: r for r in tx.all(
            "SELECT * FROM notify_cursors WHERE host = :host")}
        newest = int(tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events WHERE host = :host"))
    blank = {"last_event_id": None, "delivered": 0, "failures": 0, "attempts": 0,
             "failing_event_id": None, "next_try_at": None, "last_error": None,
             "delivered_at": None}
    out = []
    for sub in subs:
        row = rows.get(sub.name)
        state = dict(blank) if row is None else {k: row[k] for k in blank}
        cursor = state.pop("last_event_id")
        out.append({"name": sub.name, "type": sub.kind, "target": sub.target,
                    "kinds": list(sub.kinds), "cursor": cursor,
                    "behind": None if cursor is None else newest - cursor, **state})
    return out


def status(ledger: Ledger) -> dict[str, Any]:
    """The notifications at a glance, for ``status``: how many subscribers, how many
    events the furthest-behind one has still to pass, and the failing ones. A broken
    notify.toml is reported here, never raised."""
    return summary(ledger.home, ledger.db)


def summary(home: Home, db: Database) -> dict[str, Any]:
    """``status`` for a home and database (doctor has no full ``Ledger``)."""
    try:
        subs = _states(load(home), db)
    except LedgerError as exc:
        return {"subscribers": None, "pending_events": None, "failing": [],
                "error": str(exc)}
    behind = [s["behind"] for s in subs if s["behind"] is not None]
    return {
        "subscribers": len(subs),
        "pending_events": max(behind, default=0),
        "failing": [{k: s[k] for k in ("name", "attempts", "failing_event_id",
                                       "next_try_at", "last_error")}
                    for s in subs if s["attempts"]],
        "error": None,
    }


# -- one subscriber ------------------------------------------------------------------


def _serve(ledger: Ledger, sub: Subscriber, lineage: str, deadline: float,
           force: bool, cancel: Callable[[], bool] | None = None) -> Outcome:
    register(ledger, sub)
    with ledger.db.read() as tx:
        row = _cursor(tx, sub.name)
    assert row is not None
    out = Outcome(sub.name, cursor=row["last_event_id"], attempts=row["attempts"],
                  event_id=row["failing_event_id"], next_try_at=row["next_try_at"],
                  error=row["last_error"])
    if row["next_try_at"] and row["next_try_at"] > clock.now() and not force:
        out.state = "waiting"
        return out
    done = out.cursor  # the cursor as stored: every move is checked against it
    passed = done  # events up to here need no delivery (the kind filter drops them)
    while out.state == "ok":
        if time.monotonic() >= deadline or (cancel is not None and cancel()):
            out.state = "deferred"
            break
        with ledger.db.read() as tx:
            rows = tx.all("SELECT * FROM events WHERE host = :host AND id > :after "
                          "ORDER BY id LIMIT :n",
                          {"after": passed, "n": BATCH})
        if not rows:
            break
        for event in rows:
            if not sub.wants(event["kind"]):
                passed = event["id"]
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.state = "deferred"
                break
            timeout = min(sub.timeout_s, remaining)
            try:
                error, timed_out = _send(sub, event, lineage, ledger, timeout, cancel)
            except Cancelled:
                out.state = "deferred"  # the run is stopping: not the subscriber's fault
                break
            if timed_out and timeout < sub.timeout_s:
                # The pass's budget ran out first. Counted like a failure all the
                # same: a subscriber that never answers must not cost every pass
                # its whole budget.
                error = (f"no answer within the {timeout:.3g} s left in this pass (its "
                         f"timeout is {sub.timeout_s:g} s): {sub.target}")
            if error is not None:
                _record_failure(ledger, sub, out, expect=done, passed=passed,
                                event_id=event["id"], error=error)
                return out
            if not _move(ledger, sub.name, expect=done, to=event["id"], delivered=True):
                out.state = "moved"
                return out
            done = passed = event["id"]
            out.delivered += 1
            out.attempts, out.event_id, out.next_try_at, out.error = 0, None, None, None
    if passed > done and not _move(ledger, sub.name, expect=done, to=passed, delivered=False):
        out.state = "moved"
        return out
    out.cursor = passed
    return out


def _cursor(tx: Tx, name: str) -> Row | None:
    return tx.one("SELECT * FROM notify_cursors WHERE host = :host AND subscriber = :s",
                  {"s": name})


def _lineage(ledger: Ledger) -> str:
    with ledger.db.read() as tx:
        return meta.lineage(tx)


def _move(ledger: Ledger, name: str, *, expect: int, to: int, delivered: bool) -> bool:
    """Move the cursor from *expect* to *to* (compare and set: False when another
    deliverer moved it first); a delivery also clears the failure state."""
    sets = "last_event_id = :to"
    if delivered:
        sets += (", delivered = delivered + 1, delivered_at = :at, attempts = 0, "
                 "failing_event_id = NULL, next_try_at = NULL, last_error = NULL")
    with ledger.db.write() as tx:
        moved: int = tx.execute(f"UPDATE notify_cursors SET {sets} WHERE host = :host AND "
                                "subscriber = :s AND last_event_id = :expect",
                                {"to": to, "at": clock.now(), "s": name, "expect": expect})
    return moved == 1


def _record_failure(ledger: Ledger, sub: Subscriber, out: Outcome, *, expect: int,
                    passed: int, event_id: int, error: str) -> None:
    """Count a failed attempt at *event_id* and schedule the next try; the cursor still
    passes the filtered-out events before it."""
    now = datetime.now(UTC)
    with ledger.db.write() as tx:
        attempts = 1 + int(tx.scalar(
            "SELECT attempts FROM notify_cursors WHERE host = :host AND subscriber = :s",
            {"s": sub.name}) or 0)
        next_try = clock.stamp(now + timedelta(seconds=sub.retry_delay_s(attempts)))
        changed = tx.execute(
            "UPDATE notify_cursors SET last_event_id = :passed, attempts = :n, "
            "failures = failures + 1, failing_event_id = :e, next_try_at = :next, "
            "last_error = :err, last_attempt_at = :at WHERE host = :host AND subscriber = :s "
            "AND last_event_id = :expect",
            {"passed": passed, "n": attempts, "e": event_id, "next": next_try,
             "err": error[:1000], "at": clock.stamp(now), "s": sub.name, "expect": expect})
    out.state = "failing" if changed else "moved"
    out.cursor, out.event_id, out.attempts = passed, event_id, attempts
    out.next_try_at, out.error = next_try, error


# -- sending -------------------------------------------------------------------------


def payload(event: Row) -> bytes:
    """The body of a notification: the event as ``ledger.queries.event_dict`` shows it."""
    return json.dumps(event_dict(event), ensure_ascii=False).encode("utf-8")


def idempotency_key(lineage: str, event_id: int) -> str:
    """``<lineage>-<event id>``: the same for every delivery of one event of one ledger."""
    return f"{lineage}-{event_id}"


def _send(sub: Subscriber, event: Row, lineage: str, ledger: Ledger, timeout: float,
          cancel: Callable[[], bool] | None) -> tuple[str | None, bool]:
    """Deliver one event within *timeout*: ``(None, False)`` when the subscriber took
    it, else ``(the error in a line, whether the time ran out)``. Raises Cancelled
    when *cancel()* cut it short."""
    key = idempotency_key(lineage, event["id"])
    body = payload(event)
    deadline = Deadline(time.monotonic() + timeout, cancel)
    try:
        if sub.url is not None:
            return _post(sub, body, key, deadline, timeout)
        return _run_hook(sub, body, key, event=event, ledger=ledger, deadline=deadline,
                         timeout=timeout)
    except Cancelled:
        raise
    except Exception as exc:  # any failure is the subscriber's: recorded, not raised
        return f"{type(exc).__name__}: {exc}", False


def _post(sub: Subscriber, body: bytes, key: str, deadline: Deadline,
          timeout: float) -> tuple[str | None, bool]:
    # urllib, http.client and ssl are imported only to send: a run without webhooks
    # never pays for them.
    import http.client  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from ledger.observe import send  # noqa: PLC0415

    assert sub.url is not None
    # S310: the scheme was checked to be http or https when the config was read.
    headers = {**sub.headers, "Content-Type": "application/json", "Idempotency-Key": key,
               "User-Agent": f"upgrade-ledger/{__version__}"}
    request = urllib.request.Request(sub.url, data=body, method="POST",  # noqa: S310
                                     headers=headers)
    timed_out = f"timed out after {timeout:g} s waiting for {sub.target}"
    try:
        with send.opener(deadline).open(request, timeout=timeout) as response:
            response.read(65536)
            return None, False  # urllib raises HTTPError for anything but 2xx
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code} {exc.reason} from {sub.target}", False
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            return timed_out, True
        text = getattr(reason, "strerror", None) or str(reason)
        return f"cannot reach {sub.target} ({text})", False
    except TimeoutError:
        return timed_out, True
    except (OSError, http.client.HTTPException) as exc:
        return f"{sub.target} broke the connection ({type(exc).__name__}: {exc})", False


def _run_hook(sub: Subscriber, body: bytes, key: str, *, event: Row, ledger: Ledger,
              deadline: Deadline, timeout: float) -> tuple[str | None, bool]:
    from ledger.observe import send  # noqa: PLC0415

    assert sub.hook is not None
    problem = check_executable(sub.hook)
    if problem:
        return problem, False
    env = dict(os.environ, LEDGER_EVENT_ID=str(event["id"]), LEDGER_EVENT_KIND=event["kind"],
               LEDGER_IDEMPOTENCY_KEY=key, LEDGER_SUBSCRIBER=sub.name,
               LEDGER_HOME=str(ledger.home.root))
    try:
        code, err = send.run_hook([sub.hook], body + b"\n", env, deadline)
    except TimeoutError:
        return f"timed out after {timeout:g} s: hook {sub.hook} did not finish", True
    if code != 0:
        lines = err.strip().splitlines()
        why = f": {lines[-1][:300]}" if lines else ""
        how = (f"was killed by signal {-code}" if code < 0 else f"exited with {code}")
        return f"hook {sub.hook} {how}{why}", False
    return None, False
