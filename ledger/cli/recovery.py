"""Commands of this group are added by their feature."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
