"""Test and bench tooling, not the library: the offline assets (SmolLM2, the corpus) and tiny model builders.

``cores`` never imports it (``tests/test_layering.py``); tests, ``bench/`` and
``scripts/prepare_assets.py`` do.
"""
