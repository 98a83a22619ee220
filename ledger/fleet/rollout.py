"""What the fleet does around an ``apply`` run (a ``during_run`` listener).

Before the run changes anything, a plan with rolling-upgrade limits is checked
against the fleet: the brake (``brake``), then a slot (``slots``), waited for as
long as allowed, then the brake again (hosts may have failed meanwhile). The fleet
database unreachable, the run refuses to start, unless it may run without the limits
(``--fleet-optional``). During the run a ``RunPusher`` ships every change. At the
end the run's last changes are pushed (within ``FINAL_PUSH_S``) before the slot is
freed, so that the next host's brake sees how this run ended. The slot taken and
freed are events of this host's ledger (``slot.taken``, ``slot.freed``).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

from ledger.api import Ledger, RunContext
from ledger.errors import BrakeEngaged, FleetUnavailable, LedgerError, NoSlot, StorageError
from ledger.fleet import brake, connect
from ledger.fleet.pusher import RunPusher
from ledger.fleet.slots import Slots
from ledger.store.sqlite import SqliteDatabase
from ledger.views.document import second

#: The longest the end of a run waits for its last push (seconds).
FINAL_PUSH_S = 10.0
#: How often a run waiting for a slot tries again (seconds, with some jitter).
SLOT_POLL_S = 0.5
#: The slot's session: the server notices a host cut off within about a minute
#: (TCP keepalives), and frees its slot then.
KEEPALIVES = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
              "tcp_keepalives_count": "3"}


@contextlib.contextmanager
def during_run(ledger: Ledger, run: RunContext) -> Iterator[None]:
    """Take part in the fleet for the length of one ``apply`` run (see the module)."""
    if ledger.fleet_url is not None:
        connect.check_url(ledger.fleet_url)  # a misconfiguration, refused before anything
    slots = _coordinate(ledger, run) if run.rollout.limited and not run.idle else None
    pusher = None
    if ledger.fleet_url is not None and isinstance(ledger.db, SqliteDatabase):
        pusher = RunPusher(ledger.db.path, ledger.identity, ledger.fleet_url,
                           ledger.home.root)
        ledger.after_change.append(pusher.poke)
    try:
        yield
    finally:
        if pusher is not None:
            ledger.after_change.remove(pusher.poke)
        try:
            if slots is not None and slots.slot is not None:
                with contextlib.suppress(LedgerError):
                    ledger.note("slot.freed", detail={
                        "plan": run.plan_name, "slot": slots.slot,
                        "upgrade_id": ledger.current_id()})
        finally:
            if pusher is not None and not pusher.finish(FINAL_PUSH_S):
                run.say("the fleet database does not have this run's last changes yet: "
                        "they are pushed later ('upgrade-ledger status' shows the lag)")
            if slots is not None:
                slot = slots.slot
                if slot is not None and not slots.release():
                    run.say(f"slot {slot} of {run.plan_name!r} was lost during the run "
                            "(the connection to the fleet database broke)")
                slots.close()


def _coordinate(ledger: Ledger, run: RunContext) -> Slots | None:
    """The brake and a slot, before the run starts; None when the run goes on without
    the fleet (unreachable, ``--fleet-optional``)."""
    if ledger.fleet_url is None:
        _without_fleet(run, "no fleet database is configured (--fleet URL or "
                            "LEDGER_FLEET_URL)")
        return None
    try:
        db = connect.open_fleet(ledger.fleet_url, ledger.identity, settings=KEEPALIVES)
    except FleetUnavailable as exc:
        _without_fleet(run, f"the fleet database cannot be reached ({exc})")
        return None
    slots = Slots(db, run.plan_name, run.plan_sha256, ledger.pid)
    try:
        with _fleet_failures():
            ignored = _check_brake(run, slots)
        if run.rollout.max_hosts is not None:
            with _fleet_failures():
                taken = _wait_for_slot(run, slots, run.rollout.max_hosts)
            if not taken:
                return slots  # asked to stop while waiting: the run stops before starting
            ledger.note("slot.taken", detail={
                "plan": run.plan_name, "slot": slots.slot, "max_hosts": run.rollout.max_hosts,
                "sha256": run.plan_sha256})
            # Hosts may have failed while this one waited.
            with _fleet_failures():
                ignored = _check_brake(run, slots) or ignored
        if ignored:
            ledger.note("brake.ignored", detail={"plan": run.plan_name,
                                                 "sha256": run.plan_sha256, "hosts": ignored})
    except FleetUnavailable as exc:
        _abandon(ledger, run, slots)
        _without_fleet(run, f"the fleet database cannot be reached ({exc})")
        return None
    except BaseException:
        _abandon(ledger, run, slots)
        raise
    return slots


@contextlib.contextmanager
def _fleet_failures() -> Iterator[None]:
    """The fleet database failing once connected (a lost connection, a restart, a
    statement timeout) is ``FleetUnavailable``, as failing to connect is: the run
    refuses to start, or with ``--fleet-optional`` goes on without the limits."""
    try:
        yield
    except FleetUnavailable:
        raise
    except StorageError as exc:
        raise FleetUnavailable(str(exc)) from exc


def _abandon(ledger: Ledger, run: RunContext, slots: Slots) -> None:
    """Free the slot of a run that will not start."""
    if slots.slot is not None:
        with contextlib.suppress(LedgerError):
            ledger.note("slot.freed", detail={"plan": run.plan_name, "slot": slots.slot,
                                              "upgrade_id": None})
        slots.release()
    slots.close()


def _without_fleet(run: RunContext, why: str) -> None:
    """Refuse to start (``FleetUnavailable``), unless the run may go on without the
    fleet's limits: then say so."""
    if not run.rollout.optional:
        raise FleetUnavailable(f"the plan {run.plan_name!r} sets rolling-upgrade limits "
                               f"([fleet]) and {why}; nothing was started (--fleet-optional "
                               "runs without the limits)")
    run.say(f"{why}: running without the rolling-upgrade limits (--fleet-optional)")


def _check_brake(run: RunContext, slots: Slots) -> list[str]:
    """Refuse the run when the brake is on (``BrakeEngaged``); return the failed hosts
    when it is on and ignored (``--ignore-brake``), else nothing."""
    limit = run.rollout.halt_after_failures
    if limit is None or run.resuming:  # a run in progress is finished, never stranded
        return []
    with slots.db.read() as tx:
        # This host's own failure does not count: it may run the plan again (the
        # brake stops a release spreading to other hosts).
        failed = [f for f in brake.failed_hosts(tx, run.plan_sha256)
                  if f["host"] != slots.db.identity.name]
    if len(failed) < limit:
        return []
    names = ", ".join(f"{f['host']} ({f['outcome']})" for f in failed)
    if run.rollout.ignore_brake:
        run.say(f"brake ignored (--ignore-brake): {len(failed)} host(s) ended this plan "
                f"FAILED or ROLLED_BACK: {names}")
        return [f["host"] for f in failed]
    raise BrakeEngaged(f"the brake is on for plan {run.plan_name!r} (sha256 "
                       f"{run.plan_sha256[:12]}): {len(failed)} host(s) ended it FAILED or "
                       f"ROLLED_BACK (halt_after_failures = {limit}): {names}; nothing was "
                       "started (--ignore-brake overrides it for this host)",
                       [f["host"] for f in failed])


def _wait_for_slot(run: RunContext, slots: Slots, max_hosts: int) -> bool:
    """Take a slot, waiting as the rollout allows; False when asked to stop first."""
    rollout = run.rollout
    deadline = None if rollout.wait_timeout_s is None else \
        time.monotonic() + rollout.wait_timeout_s
    shown: Any = None
    while slots.take(max_hosts) is None:
        holders = slots.holders()
        who = ", ".join(f"{h['host']} (slot {h['slot']}, since {second(h['taken_at'])})"
                        for h in holders) or "sessions that are ending"
        if not rollout.wait or (deadline is not None and time.monotonic() >= deadline):
            waited = "" if not rollout.wait else \
                f" after waiting {rollout.wait_timeout_s:g} s (--wait-timeout)"
            raise NoSlot(f"no free slot for plan {run.plan_name!r} (max_hosts = {max_hosts})"
                         f"{waited}: held by {who}; nothing was started", holders)
        key = [(h["host"], h["slot"]) for h in holders]
        if key != shown:
            shown = key
            run.say(f"waiting for a slot of plan {run.plan_name!r} ({len(holders)} of "
                    f"{max_hosts} taken): held by {who}")
        pause = SLOT_POLL_S * random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not secrecy)
        end = time.monotonic() + pause
        while time.monotonic() < end:
            if run.stopping():
                return False
            time.sleep(0.05)
    return True
