"""The version of upgrade-ledger (shown by ``--version``, the metrics and webhooks)."""

__version__ = "0.1.0"
