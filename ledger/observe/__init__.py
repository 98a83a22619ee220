"""Watching a ledger: Prometheus metrics, notifications to subscribers, and
following the event trail as it grows.
"""
