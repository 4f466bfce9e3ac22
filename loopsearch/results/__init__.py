"""Tables and plots from stored studies: the leaderboard, the report page and its plots, the
paper's claims vs what was measured, and the analysis of budget sweeps.

Layer: results. Imports the core, ``loopsearch.eval``, ``loopsearch.search`` and
``loopsearch.results``; never experiments or the CLI (tests/test_layers.py checks this).
"""
