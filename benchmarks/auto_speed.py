"""The default speed settings against every manual one: one whole trial per setting (issue 13).

Issue 13's acceptance: with no precision or compile set (``precision = "auto"``, ``compile =
"auto"``, the defaults) a trial at 8 layers, d_model 256 must run within 10% of the fastest manual
setting on a CPU with bf16 units, and within 10% of fp32 eager on one without. This script trains
the same trial (8L/d256, 4 heads, seq 128, batch 32, Tiny Shakespeare at vocabulary 2048, strategy
none, same seed) once per setting and compares the *whole* trial's wall time, which is what a user
waits for: the auto row includes its probe (run against an empty probe cache, so nothing is
reused) and a compiled row its compilation.

Settings: auto, fp32, fp32 + compile, bf16, bf16 + compile (bf16 rows only where the machine has
bf16 units: ``loopsearch.probe.bf16_supported``; on AVX2 bf16 ran ~30x slower and is not worth the
hour). Rows run in the order given by --settings, --repeats times round-robin so that a change in
machine load hits every setting. Every row is a fresh process with empty probe and torch.compile
caches (``LOOPSEARCH_CACHE``, ``TORCHINDUCTOR_CACHE_DIR``): no row inherits another's compilation.

    OMP_NUM_THREADS=1 python benchmarks/auto_speed.py --threads 1 --budget 2.5e13
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from loopsearch.checkpoint import build_model
from loopsearch.data import prepare
from loopsearch.probe import bf16_supported
from loopsearch.registry import get_registry
from loopsearch.spec import PluginRef, TrainConfig, TrialConfig
from loopsearch.train import train

SETTINGS = {  # name -> (precision, compile)
    "auto": ("auto", "auto"),
    "fp32": ("fp32", False),
    "fp32+compile": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+compile": ("bf16", True),
}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)


def run_trial(name: str, data, args) -> dict:
    precision, compile_ = SETTINGS[name]
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-3, device="cpu",
                      precision=precision, compile=compile_, eval_points=1, eval_sequences=64,
                      eval_curve_sequences=16, min_steps=1)
    config = TrialConfig(study="auto_speed", trial=0,
                         backbone=PluginRef(name="transformer", params={"n_layer": 8, "d_model": 256, "n_heads": 4}),
                         strategy=PluginRef(name="none"), corpus=PluginRef(name="shakespeare"),
                         vocab_size=data.vocab_size, train=cfg, budget=args.budget, seed=0)
    torch.manual_seed(0)
    model = build_model(config, data.vocab_size)
    began = time.perf_counter()
    result = train(model, data, cfg, args.budget, seed=0, progress=False)
    wall = time.perf_counter() - began
    return {"setting": name, "wall_s": wall, "train_s": result.wall_s - result.eval_s, "steps": result.steps,
            "tokens_per_s": result.tokens_per_s, "val_nll": result.val_nll, "speed": result.speed}


def run_in_fresh_process(name: str, args) -> dict:
    """One row in a new process with empty probe and compile caches."""
    with tempfile.TemporaryDirectory() as probe_cache, tempfile.TemporaryDirectory() as inductor_cache:
        env = {**os.environ, "LOOPSEARCH_CACHE": probe_cache, "TORCHINDUCTOR_CACHE_DIR": inductor_cache,
               "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--only", name, "--budget", str(args.budget), "--threads", str(args.threads),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode != 0 or not rows:
        raise SystemExit(f"{name} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(rows[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=2.5e13, help="training FLOPs of each trial (the default is "
                    "about 6 min fp32 eager on one thread: long enough that auto probes compilation)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=1, help="round-robin passes over the settings")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    ap.add_argument("--only", choices=list(SETTINGS), help=argparse.SUPPRESS)  # one row, in this process
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only:
        data = prepare(get_registry().build("corpus", "shakespeare", {}), 2048)
        print("ROW " + json.dumps(run_trial(args.only, data, args)), flush=True)
        return
    has_bf16 = bf16_supported(torch.device("cpu"))
    names = [n for n in args.settings if has_bf16 or not n.startswith("bf16")]
    data = prepare(get_registry().build("corpus", "shakespeare", {}), 2048)
    print(f"{platform.processor() or platform.machine()}, flags: {cpu_flags()}; bf16 units: {has_bf16}; "
          f"{args.threads} thread(s); torch {torch.__version__}; budget {args.budget:.3g} FLOPs; "
          f"settings {', '.join(names)}", flush=True)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            row = run_in_fresh_process(name, args)
            rows[name].append(row)
            speed = row["speed"]
            chosen = {k: speed.get(k) for k in ("precision", "compile", "reason", "step_s", "compile_s")}
            print(f"pass {r + 1} {name:13s} wall {row['wall_s']:7.1f} s (training {row['train_s']:7.1f} s, "
                  f"{row['steps']} steps, {row['tokens_per_s']:7.0f} tok/s) val NLL {row['val_nll']:.4f}; "
                  f"speed {json.dumps(chosen)}", flush=True)
            if args.json:
                print(json.dumps(row), flush=True)
    med = {n: statistics.median(x["wall_s"] for x in rows[n]) for n in names}
    manual = {n: v for n, v in med.items() if n != "auto"}
    if "auto" in med and manual:
        best = min(manual, key=manual.get)
        print("median whole-trial wall: " + ", ".join(f"{n} {v:.1f} s" for n, v in med.items()))
        print(f"auto vs the fastest manual setting ({best}): {100 * (med['auto'] / manual[best] - 1):+.1f}%; "
              f"vs fp32 eager: {100 * (med['auto'] / med.get('fp32', float('nan')) - 1):+.1f}% "
              f"({args.repeats} pass(es))")


if __name__ == "__main__":
    main()
