"""Tables and plots made from the ledger (``python -m eval.report.tables``); torch-free.

- ``eval.report.tables``
- ``eval.report.sweeps``
"""
