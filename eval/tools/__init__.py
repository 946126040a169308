"""Command-line tools around the runs: fetching and preparing the datasets, segmenting images, training the toy model.

- ``eval.tools.prepare``
- ``eval.tools.download``
- ``eval.tools.segment``
- ``eval.tools.train_toy``
"""
