"""What a run records and where it goes: the ledger and its columns, the settings and provenance of a row, the published cells a row is compared with, the loggers and the pictures.

- ``eval.results.ledger``
- ``eval.results.columns``
- ``eval.results.record``
- ``eval.results.paper``
- ``eval.results.loggers``
- ``eval.results.visualize``
"""
