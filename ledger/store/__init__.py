"""Where a ledger lives: the home folder, the database interface and its drivers
(stdlib sqlite3; SQLAlchemy for URLs), the schema and its migrations.
"""
