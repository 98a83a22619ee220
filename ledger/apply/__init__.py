"""The plan engine behind ``upgrade-ledger apply``: plan files, the run, its jobs and
scheduler, shell commands, backups, and the dry-run preview.
"""
