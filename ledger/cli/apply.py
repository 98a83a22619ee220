"""The ``apply`` command: run an upgrade plan, resumably."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
