"""Measurements of trained checkpoints: loop scaling (val NLL at several inference loop counts),
gen-PPL against a reference LM, zero-shot ELBO bounds, task accuracy, attention shares, and
sampling from a trial.

Layer: eval. Imports the core (flat ``loopsearch/`` modules) and ``loopsearch.eval`` only; never
search, results, experiments or the CLI (tests/test_layers.py checks this).
"""
