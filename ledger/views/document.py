"""The legacy state document: built from the ledger, parsed and validated on import.

``state.json`` and ``history/<id>.json`` follow ``state.schema.json`` (shipped in this
package). The ledger is the truth; a document is a view of one upgrade that also
carries ``serial`` (the ledger's last event id when it was built) and ``lineage``
(the ledger's id), so a stale or foreign view can be told from a current one.

Keys a saved or imported document carries that the ledger does not know (a script's
own, at the top level, in ``metadata``, a phase or a component) are kept verbatim
in the ledger's ``extra`` columns and written back after the ledger's own fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ledger.core import states
from ledger.core.validate import (
    MAX_NAME,
    check_id,
    check_name,
    check_path,
    check_text,
    check_version,
)
from ledger.errors import BadInput, InvalidDocument, NotFound
from ledger.store import meta
from ledger.store.database import Tx

MAX_DOCUMENT = 32 * 1024 * 1024
MAX_DEPTH = 16
#: The most bytes of kept keys (their JSON text, all levels together) per upgrade.
MAX_KEPT = 64 * 1024

#: The keys the ledger knows at each level of a document; any other key is kept.
TOP_KEYS = frozenset({
    "upgrade_id", "current_state", "started_at", "updated_at", "current_phase",
    "current_component", "phases", "rollback_available", "can_resume", "metadata",
    "outcome", "rollback_points", "serial", "lineage", "superseded_by", "error"})
REQUIRED_KEYS = ("upgrade_id", "current_state", "started_at", "updated_at", "current_phase",
                 "current_component", "phases", "rollback_available", "can_resume",
                 "metadata")
METADATA_KEYS = frozenset({"hostname", "user", "pid"})
PHASE_KEYS = frozenset({"state", "started_at", "completed_at", "failed_at", "error",
                        "components"})
COMPONENT_KEYS = frozenset({"state", "from_version", "to_version", "started_at",
                            "completed_at", "failed_at", "attempts", "last_error",
                            "backup_path", "note"})

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


# -- building -----------------------------------------------------------------------

def second(stamp: str | None) -> str | None:
    """A ledger timestamp (millisecond precision) at the document's second precision."""
    return None if stamp is None else stamp[:19] + "Z"


#: The component columns a document shows, in the order ``component`` reads them.
COMPONENT_COLUMNS = ("phase, name, state, from_version, to_version, attempts, last_error, "
                     "note, started_at, completed_at, failed_at, backup_path, extra")


def build(tx: Tx, upgrade_id: str) -> dict[str, Any]:
    """The state document of *upgrade_id*, read in the caller's transaction."""
    u = tx.one("SELECT * FROM upgrades WHERE host = :host AND id = :id", {"id": upgrade_id})
    if u is None:
        raise NotFound(f"no upgrade {upgrade_id!r} in this ledger")
    phases: dict[str, dict[str, Any]] = {}
    for p in tx.all(
        "SELECT name, state, started_at, completed_at, failed_at, error, extra FROM phases "
        "WHERE host = :host AND upgrade_id = :id ORDER BY position", {"id": upgrade_id},
    ):
        phase: dict[str, Any] = {"state": p["state"]}
        _stamps(phase, p)
        if p["error"] is not None:
            phase["error"] = p["error"]
        # Before "components", which ends a phase: views.patch relies on that.
        add_kept(phase, p["extra"])
        phase["components"] = {}
        phases[p["name"]] = phase
    for c in tx.all(
        f"SELECT {COMPONENT_COLUMNS} FROM components WHERE host = :host AND upgrade_id = :id "
        f"ORDER BY position",
        {"id": upgrade_id},
    ):
        phases[c["phase"]]["components"][c["name"]] = component(c)
    return frame(tx, u, phases)


def component(c: Any) -> dict[str, Any]:
    """One component's entry in the document, from its row (``COMPONENT_COLUMNS``)."""
    comp: dict[str, Any] = {"state": c["state"], "from_version": c["from_version"],
                            "to_version": c["to_version"]}
    _stamps(comp, c)
    comp["attempts"] = c["attempts"]
    for key in ("last_error", "backup_path", "note"):
        if c[key] is not None:
            comp[key] = c[key]
    add_kept(comp, c["extra"])
    return comp


def frame(tx: Tx, u: Any, phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document of the upgrade row *u* around *phases*: every other field."""
    upgrade_id = u["id"]
    points = [
        {"component": r["component"], "backup_path": r["backup_path"],
         "size_bytes": r["size_bytes"], "sha256": r["sha256"]}
        for r in tx.all(
            "SELECT component, backup_path, size_bytes, sha256 FROM rollback_points "
            "WHERE host = :host AND upgrade_id = :id AND cleared_at IS NULL ORDER BY "
            "id", {"id": upgrade_id},
        )
    ]
    lineage = meta.lineage(tx)
    # The serial is the id of the upgrade's last event: a view whose serial is behind
    # the ledger's is stale (doctor reports it).
    serial = upgrade_serial(tx, upgrade_id)
    doc: dict[str, Any] = {
        "upgrade_id": u["id"],
        "current_state": u["state"],
        "started_at": second(u["started_at"]),
        "updated_at": second(u["updated_at"]),
        "current_phase": u["current_phase"],
        "current_component": u["current_component"],
        "phases": phases,
        "rollback_available": bool(points),
        "can_resume": states.is_resumable(u["state"]),
        "metadata": add_kept({
            "hostname": u["hostname"],
            "user": u["username"],
            "pid": None if u["pid"] is None else str(u["pid"]),
        }, u["metadata_extra"]),
        "outcome": u["outcome"],
        "rollback_points": points,
        "serial": serial or 0,
        "lineage": lineage,
    }
    if u["superseded_by"] is not None:
        doc["superseded_by"] = u["superseded_by"]
    if u["error"] is not None:
        doc["error"] = u["error"]
    return add_kept(doc, u["extra"])


def add_kept(target: dict[str, Any], kept: str | None) -> dict[str, Any]:
    """Append the kept keys (``extra``, a JSON object as text) after the ledger's own
    fields; a key the ledger writes itself is never overridden."""
    if kept:
        for key, value in json.loads(kept).items():
            target.setdefault(key, value)
    return target


def kept_text(record: Mapping[str, Any], known: frozenset[str], where: str) -> str | None:
    """The keys of *record* that are not in *known*, as the JSON text the ledger keeps
    (``extra``), or None when there are none. ``InvalidDocument`` for a value that
    JSON text cannot hold (an overflowing number, a lone surrogate)."""
    kept = {key: value for key, value in record.items() if key not in known}
    if not kept:
        return None
    try:
        text = json.dumps(kept, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode()
    except (ValueError, UnicodeError) as exc:
        raise InvalidDocument(f"document: the keys {where} that the ledger keeps as they "
                              f"are hold a value JSON cannot carry ({exc})") from None
    return text


def upgrade_serial(tx: Tx, upgrade_id: str) -> int:
    """The upgrade's serial: the id of its last event (0 before any); known without a
    query when the transaction read or wrote it (``tx.memo``)."""
    key = ("serial", upgrade_id)
    if key not in tx.memo:
        tx.memo[key] = int(tx.scalar("SELECT MAX(id) FROM events WHERE host = :host AND "
                                     "upgrade_id = :id", {"id": upgrade_id}) or 0)
    return int(tx.memo[key])


def _stamps(target: dict[str, Any], row: Any) -> None:
    for key in ("started_at", "completed_at", "failed_at"):
        if row[key] is not None:
            target[key] = second(row[key])


def dumps(doc: dict[str, Any]) -> bytes:
    """The document as written to disk: indented like ``jq .`` output, newline-ended."""
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


# -- parsing and validation ----------------------------------------------------------

def parse(text: str | bytes) -> dict[str, Any]:
    """Parse and validate a whole document; ``InvalidDocument`` names the first problem."""
    return validate(load(text))


def load(text: str | bytes) -> dict[str, Any]:
    """Parse a document as JSON without looking at its fields: one object, no
    duplicate keys, no NaN or Infinity, not too big or too deep."""
    if len(text) > MAX_DOCUMENT:
        raise InvalidDocument(f"document is {len(text)} bytes; at most {MAX_DOCUMENT} allowed")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError as exc:
        raise InvalidDocument("document is nested too deeply") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidDocument(f"document is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidDocument("document must be a JSON object")
    if _depth(doc) > MAX_DEPTH:
        raise InvalidDocument(f"document is nested deeper than {MAX_DEPTH} levels")
    return doc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidDocument(f"document has the key {key!r} twice")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise InvalidDocument(f"document contains {name}, which is not JSON")


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def validate(doc: Any, *, whole: bool = True) -> dict[str, Any]:
    """Check *doc* against state.schema.json's rules and the ledger's input rules.

    A *whole* document has every field the legacy format requires; otherwise (a
    document saved into an upgrade the ledger has) each known field it has is
    checked, and the caller checks ``current_phase`` against the upgrade's phases.
    """
    try:
        _validate(doc, whole)
    except BadInput as exc:
        if isinstance(exc, InvalidDocument):
            raise
        raise InvalidDocument(f"document: {exc}") from exc
    return doc  # type: ignore[no-any-return]


def check_current_phase(current_phase: str | None, phases: Any,
                        whose: str = "the document's") -> None:
    """``current_phase`` must name one of the phases (or be null)."""
    if current_phase is not None and current_phase not in phases:
        raise InvalidDocument(f"current_phase {current_phase!r} is not one of {whose} "
                              "phases")


def _validate(doc: Any, whole: bool) -> None:
    if not isinstance(doc, dict):
        raise InvalidDocument("document must be a JSON object")
    if _depth(doc) > MAX_DEPTH:
        raise InvalidDocument(f"document is nested deeper than {MAX_DEPTH} levels")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing and whole:
        raise InvalidDocument(f"document lacks {', '.join(missing)}")
    if "upgrade_id" in doc:
        check_id(doc["upgrade_id"])
    if "current_state" in doc:
        states.check_state("upgrade", doc["current_state"])
    for key in ("started_at", "updated_at"):
        if key in doc:
            _stamp(doc[key], key)
    for key, kind in (("current_phase", "phase"), ("current_component", "component")):
        if doc.get(key) is not None:
            check_name(doc[key], kind)
    for key in ("rollback_available", "can_resume"):
        if key in doc and not isinstance(doc[key], bool):
            raise InvalidDocument(f"{key} must be true or false")
    if "metadata" in doc:
        _validate_metadata(doc["metadata"])
    if "phases" in doc:
        phases = doc["phases"]
        if not isinstance(phases, dict):
            raise InvalidDocument("phases must be an object")
        seen_components: set[tuple[str, str]] = set()
        for name, phase in phases.items():
            check_name(name, "phase")
            _validate_phase(name, phase, seen_components)
        if "current_phase" in doc:
            check_current_phase(doc["current_phase"], phases)
    _validate_additions(doc)


def _validate_metadata(meta: Any) -> None:
    if not isinstance(meta, dict) or any(k not in meta for k in METADATA_KEYS):
        raise InvalidDocument("metadata must be an object with hostname, user and pid")
    for key in ("hostname", "user"):
        if meta[key] is not None:
            check_text(meta[key], f"metadata.{key}", 255)
    if meta["pid"] is not None and not (isinstance(meta["pid"], str) and meta["pid"].isdigit()
                                        and len(meta["pid"]) < 12):
        raise InvalidDocument("metadata.pid must be a decimal process id as a string, or null")


def _validate_additions(doc: dict[str, Any]) -> None:
    """The fields the ledger adds to the legacy format; each is optional, since a
    legacy document has none of them, but when present it must make sense."""
    outcome = doc.get("outcome")
    if outcome is not None and states.check_state("upgrade", outcome) \
            not in states.TERMINAL_STATES:
        raise InvalidDocument(f"outcome {outcome!r} is not allowed; expected null or one of: "
                              + ", ".join(sorted(states.TERMINAL_STATES)))
    check_text(doc.get("error"), "error")
    if doc.get("superseded_by") is not None:
        check_id(doc["superseded_by"], "superseded_by")
    serial = doc.get("serial", 0)
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise InvalidDocument("serial must be a whole number from 0")
    check_text(doc.get("lineage"), "lineage", MAX_NAME)
    points = doc.get("rollback_points", [])
    if not isinstance(points, list):
        raise InvalidDocument("rollback_points must be a list")
    for n, point in enumerate(points):
        where = f"rollback_points[{n}]"
        if not isinstance(point, dict) or "component" not in point or "backup_path" not in point:
            raise InvalidDocument(f"{where} must be an object with component and backup_path")
        check_name(point["component"], f"{where}.component")
        check_path(point["backup_path"], f"{where}.backup_path")
        size = point.get("size_bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InvalidDocument(f"{where}.size_bytes must be a whole number from 0, or null")
        digest = point.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise InvalidDocument(f"{where}.sha256 must be 64 lower-case hex digits, or null")


def _validate_phase(name: str, phase: Any, seen: set[tuple[str, str]]) -> None:
    where = f"phases.{name}"
    if not isinstance(phase, dict):
        raise InvalidDocument(f"{where} must be an object")
    if "state" not in phase:
        raise InvalidDocument(f"{where} lacks state")
    states.check_state("phase", phase["state"])
    for key in ("started_at", "completed_at", "failed_at"):
        if key in phase:
            _stamp(phase[key], f"{where}.{key}")
    check_text(phase.get("error"), f"{where}.error")
    comps = phase.get("components", {})
    if not isinstance(comps, dict):
        raise InvalidDocument(f"{where}.components must be an object")
    for cname, comp in comps.items():
        check_name(cname, "component")
        seen.add((name, cname))
        cwhere = f"{where}.components.{cname}"
        if not isinstance(comp, dict) or "state" not in comp:
            raise InvalidDocument(f"{cwhere} must be an object with a state")
        state = comp["state"]
        if state == "IN_PROGRESS":  # the legacy schema's alias of UPGRADING
            state = states.UPGRADING
        states.check_state("component", state)
        for key in ("from_version", "to_version"):
            check_version(comp.get(key), f"{cwhere}.{key}")
        for key in ("started_at", "completed_at", "failed_at"):
            if key in comp:
                _stamp(comp[key], f"{cwhere}.{key}")
        attempts = comp.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not \
                0 <= attempts < 1_000_000:
            raise InvalidDocument(f"{cwhere}.attempts must be a whole number from 0")
        check_text(comp.get("last_error"), f"{cwhere}.last_error")
        check_text(comp.get("note"), f"{cwhere}.note")
        if comp.get("backup_path") is not None:
            check_path(comp["backup_path"], f"{cwhere}.backup_path")


def _stamp(value: Any, where: str) -> None:
    try:
        ok = isinstance(value, str) and bool(_STAMP.fullmatch(value)) and bool(
            datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        ok = False
    if not ok:
        raise InvalidDocument(f"{where} must be a UTC timestamp like 2025-12-27T10:30:00Z")
