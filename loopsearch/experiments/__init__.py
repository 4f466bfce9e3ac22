"""Multi-step runs: ``repro`` (the paper's experiment: create, train every arm, evaluate, report)
and ``sweep`` (the same arms at a ladder of budgets).

Layer: experiments. May import every layer below it (core, eval, search, results); only the
CLI and the conformance kit (loopsearch/cli.py, loopsearch/testing.py) import it.
"""
