"""How this host stands with the fleet, from its own ledger: the ``fleet`` section of
``status`` and doctor's ``fleet`` check read it. Nothing here reaches the network."""

from __future__ import annotations

from typing import Any

from ledger.api import Ledger
from ledger.errors import BadInput
from ledger.fleet import connect, pushstate, spawn
from ledger.store import urls
from ledger.store.database import Database


def local(ledger: Ledger) -> dict[str, Any]:
    """The ``fleet`` section of ``status``: the fleet database (password masked), the
    last push, what is not shipped yet (``lag_events``, ``lag_s``), the failures, and
    the pusher running for this home (its PID) if any."""
    return summary(ledger.db, ledger.fleet_url, ledger.home.root)


def summary(db: Database, fleet_url: str | None, home_root: Any) -> dict[str, Any]:
    """``local`` for a database, a fleet URL and a home."""
    data = pushstate.status(db, None if fleet_url is None else urls.mask(fleet_url))
    data["error"] = None
    if fleet_url is not None:
        try:
            connect.check_url(fleet_url)
        except BadInput as exc:
            data["error"] = str(exc)
    data["pusher_pid"] = spawn.pusher_pid(home_root)
    return data


def line(data: dict[str, Any]) -> str:
    """The section in words, for the table and plain formats of ``status``."""
    if data.get("error"):
        return f"misconfigured: {data['error']}"
    pushed = data["pushed_at"] or "never"
    text = f"{data['fleet']}: last push {pushed}"
    if data["lag_events"]:
        text += f", {data['lag_events']} event(s) not shipped (oldest {data['lag_s']:.0f} s)"
    else:
        text += ", everything shipped"
    if data["failures"]:
        text += (f"; {data['failures']} failed push(es) in a row, next try "
                 f"{data['next_try_at']}: {data['last_error']}")
    return text
