"""The model a run loads: ``cfg.model`` instantiated, the attention cache in front of it, and the
content hashes of its weight files (the weights' fingerprint).

- ``eval.models.model``
- ``eval.models.attention_cache``
- ``eval.models.digests``
"""
