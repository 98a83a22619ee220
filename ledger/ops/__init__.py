"""Operating a ledger: ``doctor`` and its checks, snapshots, and ``restore``.
"""
