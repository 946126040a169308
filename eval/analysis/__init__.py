"""Commands over finished runs that the run itself never imports: rescoring a run's contingency tables without the model, tuning a setting from the ledger.

- ``eval.analysis.rescore``
- ``eval.analysis.tune``
"""
