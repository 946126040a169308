"""Evaluation harness for DiffSeg: datasets, the official Hungarian scoring, runs and paper tables.

Sub-modules are imported on demand (``eval.matching``, ``eval.metrics``, ``eval.tables``...), so
importing the package itself stays cheap and pulls in neither torch nor pandas.
"""
