"""The Optuna search: search spaces, the study spec and objective, storage, the workers that run
trials (study-wide limits, dead workers, many processes) and confirmation runs.

Layer: search. Imports the core, ``loopsearch.eval`` and ``loopsearch.search``; never results,
experiments or the CLI (tests/test_layers.py checks this).
"""
