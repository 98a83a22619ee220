"""``Value``: the base of the small immutable records the per-step path builds.

A frozen dataclass would do, but the per-step commands import these modules on every
call, and ``dataclasses`` (with the code each ``@dataclass`` generates and compiles
at import) costs start-up time there. A subclass names its fields in ``FIELDS`` (in
order; they are its ``__slots__``) and sets them in its own ``__init__`` (typed, with
its defaults); it is equal to, hashed and shown by its fields, and cannot be changed
afterwards.
"""

from __future__ import annotations

from typing import ClassVar


class Value:
    """An immutable record: the fields named in ``FIELDS``, set once in ``__init__``."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def _set(self, **fields: object) -> None:
        """Set the fields (``__init__`` calls it once)."""
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} cannot be changed")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} cannot be changed")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({shown})"
