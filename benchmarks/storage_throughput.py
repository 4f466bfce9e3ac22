"""Trials per second through Optuna's gRPC storage proxy vs direct PostgreSQL (issue 14 item 8).

Many lightweight clients (processes, no training) ask for a trial, report a value and ask again,
for a fixed time, against one study: once with every client connected to PostgreSQL directly,
once through `loopsearch proxy serve` in front of the same database. Prints trials/s, the median
and 95th-percentile ask+tell latency, and the database connections each setting holds.

    python benchmarks/storage_throughput.py --clients 8 32 --seconds 20

The clients use Optuna's RandomSampler, so the figures measure storage round trips, not a sampler.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
import warnings

PG = "postgresql://postgres@127.0.0.1:5432/test"


def client(url: str, name: str, seconds: float, start_at: float, out: mp.Queue) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from loopsearch.search.storage import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(url),
                              sampler=optuna.samplers.RandomSampler(seed=os.getpid()))
    while time.time() < start_at:
        time.sleep(0.005)
    latencies = []
    end = start_at + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        trial = study.ask()
        x = trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, x * x)
        latencies.append(time.perf_counter() - t0)
    out.put(latencies)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_connections() -> int:
    import sqlalchemy

    with sqlalchemy.create_engine(PG).connect() as c:
        return int(c.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'test'").scalar())


def measure(url: str, clients: int, seconds: float) -> dict:
    import optuna

    from loopsearch.search.storage import open_storage

    name = f"throughput-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=open_storage(url))
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 3.0 + 0.15 * clients  # every client connected before the clock starts
    procs = [mp.Process(target=client, args=(url, name, seconds, start_at, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(max(0.0, start_at - time.time()) + seconds / 2)
    connections = pg_connections()
    lat = [x for _ in procs for x in out.get(timeout=seconds + 120)]
    for p in procs:
        p.join()
    optuna.delete_study(study_name=name, storage=open_storage(PG))
    lat.sort()
    return {"trials_per_s": len(lat) / seconds, "p50_ms": 1e3 * statistics.median(lat),
            "p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))], "trials": len(lat), "pg_connections": connections}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--proxy-threads", type=int, default=16)
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "loopsearch", "proxy", "serve", "--storage", PG, "--port",
                              str(port), "--threads", str(args.proxy_threads)], stderr=subprocess.DEVNULL)
    try:
        print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"{args.seconds:g} s per row; RandomSampler; proxy threads {args.proxy_threads}")
        print("| clients | storage | trials/s | ask+tell p50 (ms) | p95 (ms) | PostgreSQL connections |")
        print("|---|---|---|---|---|---|")
        for n in args.clients:
            for label, url in (("PostgreSQL direct", PG), ("gRPC proxy", f"grpc://127.0.0.1:{port}")):
                r = measure(url, n, args.seconds)
                print(f"| {n} | {label} | {r['trials_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                      f"{r['pg_connections']} |", flush=True)
    finally:
        proxy.terminate()
        proxy.wait()


if __name__ == "__main__":
    main()
