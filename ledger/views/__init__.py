"""The files legacy tooling reads: the ``state.json`` document built from the
ledger, the patch that keeps it current cheaply, and the importer of such documents.
"""
