"""Issue 14's kill -9 experiment: worker processes on PostgreSQL killed with SIGKILL mid-trial,
the baseline among them, again and again; does the study end whole?

A study of ``--trials`` trials (the tiny conformance recipe, checkpoints every quarter of a
trial) runs on ``--workers`` independent ``loopsearch study run`` processes against PostgreSQL.
While it runs, the script kills ``--kills`` workers with SIGKILL, each while it is training a
trial, and starts a new worker in its place (as a scheduler would). The first ``--baseline-kills``
kills target whichever worker runs the **baseline** (the trial that every other is compared with),
including its retries; the rest hit a random running trial. At the end it counts, from storage:

- **finished**: trials COMPLETE or PRUNED (should be exactly ``--trials``);
- **lost**: killed trials whose chain of retries never finished (0 expected; a retry names its
  original trial, ``failed_trial``, so the chain is the original and all its retries);
- **duplicated**: chains that finished more than once, or more finished trials than asked (0);
- **stuck**: trials still RUNNING or WAITING when every worker has exited (0);
- **baseline**: finished baseline trials (exactly 1), and how many times the baseline was killed;
- **resumed**: retries that resumed from their dead trial's checkpoint, and the FLOPs lost.

    python benchmarks/kill9_experiment.py --storage postgresql://postgres@127.0.0.1:5432/test

It prints one summary line per kill and a result table; ``--json`` prints the counts as JSON.
Exit status 1 when any count is off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

from loopsearch.search.space import BASELINE_ATTR
from loopsearch.search.storage import mask
from loopsearch.testing import TINY_RECIPE


def worker_pid(trial) -> int | None:
    w = trial.user_attrs.get("worker")
    try:
        return int(str(w).rsplit(":", 1)[1]) if w else None
    except (IndexError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--baseline-kills", type=int, default=3, help="of the kills, how many target the baseline")
    ap.add_argument("--budget", type=float, default=8e9, help="training FLOPs per trial (tiny model)")
    ap.add_argument("--seed", type=int, default=0, help="which running trial a random kill picks")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before the experiment gives up")
    ap.add_argument("--keep", action="store_true", help="keep the study in storage afterwards")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    name = f"kill9-{uuid.uuid4().hex[:8]}"
    every = args.budget / 4
    tmp = Path(tempfile.mkdtemp(prefix="kill9-"))
    text = "\n".join(ln for ln in TINY_RECIPE.splitlines() if not ln.startswith(("budget =", "n_trials =")))
    text = f"budget = {json.dumps(str(args.budget))}\nn_trials = {args.trials}\n" + text
    recipe = tmp / "recipe.toml"
    recipe.write_text(text.replace("[train]\n", f"[train]\ncheckpoint_every = {every}\n"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOPSEARCH_STORAGE": args.storage}
    lb = [sys.executable, "-m", "loopsearch"]
    subprocess.run(lb + ["study", "create", "--space", "early_middle", "--recipe", str(recipe), "--name", name,
                         "--no-estimate"], env=env, cwd=tmp, check=True, capture_output=True, text=True)
    cmd = lb + ["study", "run", name, "--no-progress", "--threads", "1", "--heartbeat", "1", "--grace", "4"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    procs = {p.pid: p for p in (start() for _ in range(args.workers))}
    st = optuna.load_study(study_name=name, storage=args.storage)
    killed: list[dict] = []
    began = time.time()
    try:
        while len(killed) < args.kills and time.time() - began < args.timeout:
            want_baseline = len(killed) < args.baseline_kills
            running = [t for t in st.get_trials(states=(TrialState.RUNNING,))
                       if worker_pid(t) in procs and procs[worker_pid(t)].poll() is None
                       and t.number not in {k["trial"] for k in killed}
                       and t.intermediate_values]  # training has reported once: mid-trial, not mid-sampling
            if want_baseline:
                running = [t for t in running if t.user_attrs.get(BASELINE_ATTR)]
            if not running:
                if all(p.poll() is not None for p in procs.values()):
                    break  # the study finished before every kill was made
                time.sleep(0.3)
                continue
            victim = rng.choice(running)
            pid = worker_pid(victim)
            os.kill(pid, signal.SIGKILL)
            procs.pop(pid).wait(timeout=30)
            killed.append({"trial": victim.number, "baseline": bool(victim.user_attrs.get(BASELINE_ATTR)),
                           "pid": pid, "at_s": round(time.time() - began, 1)})
            print(f"kill {len(killed)}: SIGKILL worker {pid} in trial {victim.number}"
                  f"{' (baseline)' if killed[-1]['baseline'] else ''} at {killed[-1]['at_s']} s; a new worker starts",
                  flush=True)
            p = start()
            procs[p.pid] = p
        for p in procs.values():
            p.wait(timeout=max(60.0, args.timeout - (time.time() - began)))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.time() - began

    trials = st.get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    stuck = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # a retry names the original trial (system attribute failed_trial; retry_history lists the chain), so
    # every trial belongs to the chain of its original: lost = a killed trial's chain never finished;
    # duplicated = a chain that finished more than once (the same configuration trained twice)
    root = {t.number: t.system_attrs.get("failed_trial", t.number) for t in trials}
    finished_per_root: dict[int, int] = {}
    for t in done:
        finished_per_root[root[t.number]] = finished_per_root.get(root[t.number], 0) + 1
    lost = sorted({root[k["trial"]] for k in killed if not finished_per_root.get(root[k["trial"]])})
    duplicated = [r for r, n in finished_per_root.items() if n > 1]
    resumed = [t for t in done if "resumed_from_flops" in t.user_attrs]
    baselines = [t for t in done if t.user_attrs.get(BASELINE_ATTR)]
    result = {
        "study": name, "storage": mask(args.storage),
        "workers": args.workers, "trials_asked": args.trials, "kills": len(killed),
        "baseline_kills": sum(k["baseline"] for k in killed), "finished": len(done),
        "lost": len(lost), "duplicated": len(duplicated) + max(0, len(done) - args.trials), "stuck": len(stuck),
        "retries": sum(1 for t in trials if "failed_trial" in t.system_attrs),
        "baseline_finished": len(baselines), "resumed_from_checkpoint": len(resumed),
        "flops_lost_max": max((t.user_attrs.get("flops_lost", 0.0) for t in resumed), default=0.0),
        "checkpoint_every": every, "wall_s": round(wall, 1), "killed": killed,
    }
    ok = (result["finished"] == args.trials and not lost and not result["duplicated"] and not stuck
          and len(baselines) == 1)
    print(f"\n{args.workers} workers on PostgreSQL, {args.trials} trials, {len(killed)} x SIGKILL "
          f"({result['baseline_kills']} of them the baseline), {wall:.0f} s:")
    for key in ("finished", "lost", "duplicated", "stuck", "retries", "baseline_finished", "resumed_from_checkpoint"):
        print(f"  {key:<24} {result[key]}")
    print(f"  {'flops_lost (max)':<24} {result['flops_lost_max']:.3g} (checkpoint every {every:.3g})")
    print("verdict: " + ("OK: nothing lost, duplicated or stuck, one baseline" if ok else "FAILED"))
    if args.json:
        print(json.dumps(result))
    if not args.keep:
        optuna.delete_study(study_name=name, storage=args.storage)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
