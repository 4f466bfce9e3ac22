"""Training time of the quickstart baseline trial, quiet and with one competing process, by torch threads.

Two torch threads per process were measured 4-10x slower on a 2-core machine when another process
competed for the cores (issue 15). This script reproduces that table: it trains the former
quickstart recipe's baseline (benchmarks/recipe_d64.toml: 6 layers, d_model 64, 1 TFLOP by default)
with 1 thread, with all cores, and with ``study run``'s default (``worker_threads``: the free cores
by the load average), first on a quiet machine and then while a second process runs fp32 matmuls on
one core (a stand-in for "another `study run`", a compiler or a browser). Runs are in that order;
the load average needs a minute to see the competitor, so the script waits 60 s after starting it
before asking for the default.

    python benchmarks/threads_under_load.py            # about 5 minutes on 2 cores
    python benchmarks/threads_under_load.py --budget 5e11
"""

from __future__ import annotations

import argparse
from pathlib import Path
import multiprocessing as mp
import os
import time

import torch

RECIPE = Path(__file__).resolve().parent / "recipe_d64.toml"  # the former quickstart (published figures)


def compete(stop) -> None:
    """A competing process: fp32 matmuls on one thread until told to stop."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def train_once(budget: float, threads: int) -> tuple[float, int]:
    from loopsearch.checkpoint import build_model
    from loopsearch.data import prepare
    from loopsearch.registry import get_registry
    from loopsearch.search import study as studies
    from loopsearch.spec import PluginRef, TrialConfig
    from loopsearch.train import train

    torch.set_num_threads(threads)
    spec = studies.make_spec(studies.load_recipe(str(RECIPE)), "threads", "early_middle")
    data = prepare(get_registry().build("corpus", spec.corpus.name, spec.corpus.params), spec.vocab_size)
    cfg = spec.train.model_copy(update={"precision": "fp32", "compile": False})
    config = TrialConfig(study="threads", trial=0, backbone=spec.backbone, strategy=PluginRef(name="none"),
                         corpus=spec.corpus, vocab_size=data.vocab_size, train=cfg, budget=budget, seed=0)
    torch.manual_seed(0)
    model = build_model(config, data.vocab_size)
    began = time.perf_counter()
    r = train(model, data, cfg, budget, seed=0, progress=False)
    return time.perf_counter() - began, r.steps


def main() -> None:
    from loopsearch.search.workers import cores, worker_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=1e12, help="training FLOPs of the trial")
    args = ap.parse_args()
    rows = []

    def run(state: str) -> None:
        auto = worker_threads(1)
        for label, n in (("1 thread", 1), (f"{cores()} threads (all cores)", cores()),
                         (f"default ({auto}: free cores, load {os.getloadavg()[0]:.2f})", auto)):
            seconds, steps = train_once(args.budget, n)
            rows.append((state, label, seconds, steps))
            print(f"{state:<22} {label:<40} {seconds:7.1f} s  ({steps} steps)", flush=True)

    run("quiet")
    stop = mp.Event()
    rival = mp.Process(target=compete, args=(stop,), daemon=True)
    rival.start()
    time.sleep(60)  # the 1-minute load average catches up with the competitor
    try:
        run("one competing process")
    finally:
        stop.set()
        rival.join(timeout=10)
    print(f"\n{cores()} cores, torch {torch.__version__}, budget {args.budget:.3g} FLOPs, quickstart baseline")


if __name__ == "__main__":
    main()
