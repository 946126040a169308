"""How a prediction is scored: the per-image Hungarian matching, the summed metric, the protocols (what the model sees and what is scored), the contingency tables a run keeps and the scoring rules and granularity read from them.

- ``eval.scoring.matching``
- ``eval.scoring.metrics``
- ``eval.scoring.protocol``
- ``eval.scoring.contingency``
- ``eval.scoring.rules``
- ``eval.scoring.granularity``
"""
