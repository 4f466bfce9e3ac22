"""The command line: parse, call the library, print. No logic lives here.

Errors the user can fix (LoopsearchError) print as one line on stderr with exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from .errors import BudgetError, LoopsearchError
from .spec import SAMPLERS
from .units import format_flops, parse_flops

STORAGE_HELP = "Optuna storage URL (default: $LOOPSEARCH_STORAGE, else sqlite:///loopsearch.db in this directory)."


# one name per metric: study objectives, `evaluate --metric`, leaderboard columns and docs
METRIC_NAMES = ("loop_scaling", "gen_ppl", "zeroshot_bpb", "task_accuracy")
OLD_METRIC_NAMES = {"genppl": "gen_ppl", "zeroshot": "zeroshot_bpb", "task": "task_accuracy"}


def deprecated(old: str, new: str) -> None:
    """One line on stderr for an old spelling that still works."""
    click.echo(f"deprecated: {old} is now {new}; the old spelling will be removed in a later release", err=True)


def _console(stderr: bool = False):
    """A rich console; when output is not a terminal (a pipe, a file, CI) tables get 200 columns
    instead of rich's default 80 so they are not folded, unless COLUMNS says otherwise."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console
    return Console(stderr=stderr, width=200)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loopsearch")
def cli():
    """Search where to loop a masked diffusion LM, under a fixed training-FLOP budget.

    Quickstart: loopsearch study create --space early_middle; loopsearch study run; loopsearch leaderboard
    """


# ---- proxy ---------------------------------------------------------------------------------------
@cli.group()
def proxy():
    """Optuna's gRPC storage proxy: many workers share one database through it."""


@proxy.command("serve")
@click.option("--storage", help="The database the proxy serves (default: $LOOPSEARCH_STORAGE): "
                                "postgresql://user@host/db for hundreds of workers.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; the proxy has no authentication).")
@click.option("--port", default=13000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Request threads (each may hold one database connection).")
def proxy_serve(storage, host, port, threads):
    """Serve a study database to workers over gRPC (optuna.storages.run_grpc_proxy_server).

    Workers then run with --storage grpc://HOST:PORT and talk to the proxy, which holds the only
    database connections: the path past PostgreSQL's connection limit when hundreds of workers run
    one study. Dead workers are found by loopsearch's lease (Optuna's heartbeat does not pass through
    the proxy). Runs until Ctrl-C or SIGTERM. Needs grpcio (pip install 'loopsearch[grpc]').

    Example: loopsearch proxy serve --storage postgresql://postgres@db/studies --host 0.0.0.0 --port 13000
    """
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from .search.storage import grpc_address, mask, open_storage, storage_url

    url = storage_url(storage)
    if grpc_address(url) is not None:
        raise LoopsearchError(f"--storage {mask(url)} is itself a proxy; give the database it should serve, "
                              f"e.g. postgresql://user@host/db")
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise LoopsearchError("proxy serve needs grpcio: pip install 'loopsearch[grpc]'") from None
    import optuna

    backend = open_storage(url)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    click.echo(f"serving {mask(url)} at grpc://{host}:{port} ({threads} threads); run workers with "
               f"--storage grpc://{host}:{port}; Ctrl-C stops", err=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna.storages.run_grpc_proxy_server(backend, host=host, port=port,
                                              thread_pool=ThreadPoolExecutor(max_workers=threads))
    except KeyboardInterrupt:
        click.echo("proxy stopped", err=True)
    except RuntimeError as exc:
        raise LoopsearchError(f"cannot serve at {host}:{port}: {exc}; is the port taken? pass another --port") \
            from None


# ---- plugins -----------------------------------------------------------------------------------
@cli.group()
def plugins():
    """Installed plugins (builtin and third-party)."""


@plugins.command("check")
@click.argument("name")
@click.option("--param", "params", multiple=True, metavar="K=V", help="A parameter of the plugin (repeatable; "
                                                                      "default: its Params defaults).")
@click.option("--block", default="1,3", show_default=True, help="The looped layers start,end of the tiny test model.")
def plugins_check(name, params, block):
    """Run the conformance suite of an installed looping strategy, exit criterion, sampler or backbone.

    The suite (loopsearch.testing.StrategyConformance) checks, on a tiny model: unknown parameters
    are refused, training and inference FLOPs match torch's FlopCounterMode, one loop equals the
    plain model (when the params give one loop), runs are deterministic under a seed, gradients
    reach every parameter, loop counts are consistent (expected_train_loops() is the mean of what
    training executes), and a 2-trial study runs. For an exit criterion (loopsearch.testing.ExitConformance):
    one sticky decision per sequence, min_loops, an exit run equals the model at the loops it reports,
    determinism, and FLOPs (readouts included) against FlopCounterMode. For a sampler
    (loopsearch.testing.SamplerConformance): every MASK filled, the prompt kept, committed tokens
    never change, at most `steps` calls, determinism, and its reported cost against FlopCounterMode.
    For a backbone (loopsearch.testing.BackboneConformance): MASK is the last id, shapes, the flop
    profile against FlopCounterMode (forward and training), gradients, determinism, bidirectional
    attention, token-index support and attention probabilities where offered. No test file is written
    by you; needs pytest (pip install 'loopsearch[plugin-dev]').

    Example: loopsearch plugins check fixed --param n_loops=3 --param train_loops=uniform
    """
    import importlib.util
    import subprocess
    import tempfile

    from .registry import get_registry

    if importlib.util.find_spec("pytest") is None:
        raise LoopsearchError("plugins check needs pytest: pip install 'loopsearch[plugin-dev]'")
    reg = get_registry()
    kinds = [k for k in ("loop_strategy", "sampler", "exit_criterion", "backbone") if name in reg.items(k)]
    if not kinds:
        raise LoopsearchError(f"no installed plugin named {name!r}; see `loopsearch plugins list`")
    if "loop_strategy" in kinds:
        kind, suite, attr, label = "loop_strategy", "StrategyConformance", "strategy", "strategy"
    elif "exit_criterion" in kinds:
        kind, suite, attr, label = "exit_criterion", "ExitConformance", "criterion", "exit criterion"
    elif "sampler" in kinds:
        kind, suite, attr, label = "sampler", "SamplerConformance", "sampler", "sampler"
    else:
        kind, suite, attr, label = "backbone", "BackboneConformance", "backbone", "backbone"
    from .eval.generation import parse_params

    raw = parse_params(params)
    checked = reg.params(kind, name, raw, " (plugins check --param)")  # bad params: one line, now
    parsed = {k: checked.model_dump(mode="json")[k] for k in raw}
    try:
        start, end = (int(x) for x in block.split(","))
    except ValueError:
        raise LoopsearchError(f"--block {block!r}: give start,end, e.g. 1,3") from None
    extra = f"    block = ({start}, {end})\n" if kind == "loop_strategy" else ""
    test = (f"from loopsearch.testing import {suite}\n\n\n"
            f"class TestPluginCheck({suite}):\n"
            f"    {attr} = {name!r}\n    params = {parsed!r}\n{extra}")
    with tempfile.TemporaryDirectory(prefix="loopsearch-check-") as tmp:
        path = Path(tmp) / f"test_check_{re.sub(r'[^A-Za-z0-9_]', '_', name)}.py"
        path.write_text(test)
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp,
                                str(path)], cwd=tmp)
    if code:
        raise LoopsearchError(f"{label} {name!r} failed its conformance suite (the failures are above)")
    click.echo(f"{label} {name!r} passed its conformance suite")


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_list(as_json: bool):
    """List plugins: name, kind, distribution, version and parameters.

    Example: loopsearch plugins list --json
    """
    from .registry import get_registry

    reg = get_registry()
    rows = [{"name": i.name, "kind": i.kind, "distribution": i.distribution, "version": i.version,
             "plugin": i.plugin, "parameters": i.params_schema()} for i in reg.all()]
    failures = [{"plugin": f.plugin, "distribution": f.distribution, "error": f.error} for f in reg.failures]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failures": failures}, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title="loopsearch plugins")
    for col in ("kind", "name", "distribution", "version", "parameters"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={v.get('default', '')}" if "default" in v else k for k, v in r["parameters"].items())
        table.add_row(r["kind"], r["name"], r["distribution"], r["version"], params)
    console = _console()
    console.print(table)
    for f in failures:
        console.print(f"[red]failed to load[/] {f['plugin']} ({f['distribution']}): {f['error']}")


# ---- spaces --------------------------------------------------------------------------------------
@cli.group()
def spaces():
    """Search spaces and study recipes."""


@spaces.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def spaces_list(as_json):
    """List the search spaces and study recipes that plugins provide.

    Example: loopsearch spaces list
    """
    from rich.table import Table

    from .registry import get_registry
    from .search.space import load_recipe, load_space

    reg = get_registry()
    rows = [{"kind": "space", "name": name, "distribution": info.distribution,
             "description": load_space(name).description}
            for name, info in sorted(reg.items("search_space").items())]
    rows += [{"kind": "recipe", "name": name, "distribution": info.distribution,
              "description": load_recipe(name).description}
             for name, info in sorted(reg.items("study_recipe").items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="search spaces (--space) and study recipes (--recipe)")
    for col in ("kind", "name", "from", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["kind"], row["name"], row["distribution"], row["description"])
    _console().print(table)


# ---- studies -------------------------------------------------------------------------------------
@cli.group()
def study():
    """Create, run and inspect Optuna studies."""


def corpus_option(value: str | None) -> dict | None:
    """--corpus: a corpus plugin name, a text file, a directory with *train*/*valid* files, or hf:NAME[/CONFIG]."""
    if value is None:
        return None
    from .registry import get_registry

    names = get_registry().items("corpus")
    path = Path(value)
    if value in names:
        return {"name": value, "params": {}}
    if value.startswith("hf:"):
        dataset, _, config = value[3:].partition("/")
        return {"name": "hub", "params": {"dataset": dataset, **({"config": config} if config else {})}}
    if path.is_file():
        return {"name": "text", "params": {"train": str(path.resolve())}}
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        train = [p for p in files if "train" in p.name]
        valid = [p for p in files if "valid" in p.name]
        if len(train) == 1:
            params = {"train": str(train[0].resolve())}
            if len(valid) == 1:
                params["valid"] = str(valid[0].resolve())
            return {"name": "text", "params": params}
        raise LoopsearchError(f"--corpus {value}: directory needs exactly one file with 'train' in its name "
                              f"(and optionally one with 'valid'); found {[p.name for p in files]}")
    raise LoopsearchError(f"--corpus {value!r} is not a corpus plugin ({', '.join(sorted(names))}), "
                          f"an existing file or directory, or hf:DATASET[/CONFIG]")


@study.command("create")
@click.option("--space", help="Search space: a name (see `loopsearch spaces list`) or a .toml path.")
@click.option("--recipe",
              help="Study recipe (name or .toml path) giving budget, corpus, model; default: the quickstart recipe "
                   "(6 layers, d_model 48, vocabulary 260, 1 TFLOP).")
@click.option("--name", help="Study name (default: SPACE-YYYYmmdd-HHMMSS).")
@click.option("--budget", help="Training FLOPs per trial: 3e13, '30 TFLOP', '2 PFLOP' or GPU time 'h100:2h@0.4'.")
@click.option("--corpus", help="Corpus plugin name, text file, directory (train/valid files) or hf:DATASET[/CONFIG].")
@click.option("--optuna-sampler", "sampler", type=click.Choice(SAMPLERS),
              help="Optuna sampler (default auto: tpe, or nsga2 for a multi-objective study).")
@click.option("--sampler", "old_sampler", type=click.Choice(SAMPLERS), hidden=True)
@click.option("--pruner", type=click.Choice(["none", "median", "successive_halving", "hyperband"]),
              help="Stop weak trials early, comparing val NLL at equal training GFLOPs (default none).")
@click.option("--seed", type=int, help="The study's seed: of the first training seed of every trial (data order, "
                                       "initialisation), of the validation masks and of the sampler.")
@click.option("--seeds", type=click.IntRange(min=1), help="Training seeds per configuration (default: the recipe's or "
              "space's, else 1): every trial trains each and its value is their mean (arms: one trial per seed).")
@click.option("--n-trials", type=click.IntRange(min=1),
              help="Finished trials the study is run to (all workers together).")
@click.option("--estimate/--no-estimate", default=None,
              help="Measure a few training steps of the baseline here and print the time a trial will take "
                   "(default: when the output is a terminal).")
@click.option("--storage", help=STORAGE_HELP)
def study_create(space, recipe, name, budget, corpus, sampler, old_sampler, pruner, seed, seeds, n_trials, estimate,
                 storage):
    """Create a study and store its whole spec in Optuna storage.

    Example: loopsearch study create --space early_middle --name quick --budget '1 TFLOP'
    """
    if old_sampler is not None:
        deprecated("--sampler", "--optuna-sampler")
        sampler = sampler or old_sampler
    from .search import study as studies
    from .search.storage import mask, storage_url

    base = space or (Path(recipe).stem if recipe else "study")
    name = name or f"{Path(base).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    spec = studies.spec_from_options(name, space, recipe, budget, corpus_option(corpus), seed, sampler, n_trials,
                                     pruner, seeds)
    studies.create(spec, storage)
    per = "" if spec.space.seeds == 1 or spec.space.arms else f" x {spec.space.seeds} seeds"
    click.echo(f"created study {name!r} in {mask(storage_url(storage))}: space {spec.space.name}, "
               f"budget {format_flops(spec.budget)} per trial{per}, corpus {spec.corpus.name}, {spec.n_trials} trials, "
               f"baseline enqueued")
    if estimate if estimate is not None else sys.stdout.isatty():
        from .search.workers import worker_threads

        seconds, rate = studies.estimate_trial_seconds(spec, threads=worker_threads(1))
        total = seconds * spec.n_trials * (spec.space.seeds if not spec.space.arms else 1)
        click.echo(f"estimate: about {_duration(seconds)} of training per trial on this machine "
                   f"({rate / 1e9:.3g} GFLOP/s measured on the baseline; looped trials spend the same FLOPs), "
                   f"about {_duration(total)} for the study's {spec.n_trials} trials, validation not included")
    click.echo(f"next: loopsearch study run {name}")


def _study_progress(study, spec, n_trials: int | None, ran: int, elapsed: float) -> str:
    """' (3 of 5 finished; 4 min elapsed, about 3 min to go)': where the study stands after a trial.
    The target is this run's --n-trials, else the study's n_trials; the time to go extrapolates
    this run's mean time per trial."""
    import optuna

    finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                   for t in study.get_trials(deepcopy=False))
    if n_trials:
        target, have = n_trials, ran
    else:
        target, have = spec.n_trials, finished
    left = max(0, target - have)
    to_go = f", about {_duration(elapsed / ran * left)} to go" if left and ran else ""
    return f" ({have} of {target} finished; {_duration(elapsed)} elapsed{to_go})"


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.1 days', '3.3e+02 years'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds < 730 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365.25 * 86400):.3g} years"


def _flops_option(ctx, param, value):
    """--study-budget / --checkpoint-every: FLOPs as 3e13 or '30 TFLOP'."""
    if value is None:
        return None
    try:
        return parse_flops(value)
    except BudgetError as exc:
        raise BudgetError(f"--{param.name.replace('_', '-')}: {exc}") from None


@study.command("run")
@click.argument("name", required=False)
@click.option("--n-trials", type=click.IntRange(min=1),
              help="Run until this many more trials have finished (all workers together; "
                                           "default: until the study has its n_trials finished).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Stop starting new trials after this many seconds (per process).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes (cores // N torch threads each, one GPU each on a GPU machine); "
                   "on a SQLite file they run on a journal file beside it.")
@click.option("--study-budget", callback=_flops_option, metavar="FLOPS",
              help="Total training FLOPs of all trials of the study, across all workers (e.g. '50 TFLOP').")
@click.option("--checkpoint-every", callback=_flops_option, metavar="FLOPS",
              help="Save each trial's training state every this many FLOPs, so a retry resumes "
                   "(default: [train] checkpoint_every of the study, else never).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: [train] device of the study).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=30, show_default=True, metavar="SECONDS",
              help="Heartbeat (RDB) or lease (journal) interval of a running trial.")
@click.option("--grace", type=click.IntRange(min=1), metavar="SECONDS",
              help="A running trial silent this long is failed and retried from its checkpoint "
                   "(default: 4 heartbeats).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per trial.")
@click.option("--storage", help=STORAGE_HELP)
@click.option("--worker-id", type=int, default=0, hidden=True)
@click.option("--threads", type=click.IntRange(min=1), metavar="N",
              help="Torch threads per worker process (default: the cores not busy with other processes, by the "
                   "1-minute load average, shared out among workers). Two threads per process were measured 4-10x "
                   "slower when another process competed; 1 is safe on a shared machine.")
@click.option("--until", type=int, hidden=True)
def study_run(name, n_trials, timeout, workers, study_budget, checkpoint_every, device, heartbeat, grace, progress,
              storage, worker_id, threads, until):
    """Run trials of a study (default: the most recently created one).

    Any number of processes and hosts may run one study on shared storage (PostgreSQL, or a
    journal:PATH file on one host); the trial target and --study-budget hold for all of them.
    A trial whose worker dies is failed after --grace seconds and retried from its last checkpoint.
    Ctrl-C keeps the finished trials and marks the running one failed; run again to continue.

    Examples: loopsearch study run quick --n-trials 4;
    loopsearch study run quick --workers 4 --study-budget '20 TFLOP' --checkpoint-every 1e11
    """
    from .search import study as studies
    from .search import workers as pool

    if grace is not None and grace <= heartbeat:
        raise LoopsearchError(f"--grace {grace} must exceed --heartbeat {heartbeat} (a live worker would be taken for "
                              f"dead between two heartbeats); use e.g. --grace {4 * heartbeat}")
    name = name or studies.latest_study(storage)
    _, loaded = studies.load(name, storage)  # fail early on an unknown study
    from .train import check_device

    check_device(device or loaded.train.device)  # before any trial: a missing GPU is one line, not N failed trials
    studies.check_artifacts_writable(loaded)  # ... and an unwritable checkpoint folder, not a trial lost at the end
    auto = threads is None and workers == 1 and not worker_id
    if auto:  # the free cores, not all of them: two threads collapse when another process competes
        from .search.workers import worker_threads

        threads = worker_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: shared by its ranks
    if threads:
        import torch

        torch.set_num_threads(threads)
    console = _console()
    prefix = f"[worker {worker_id}] " if worker_id else ""
    follower = int(os.environ.get("RANK", "0")) > 0  # torchrun: rank 0 speaks for the trial
    say = lambda message: follower or console.print(f"{prefix}{message}", highlight=False, markup=False)  # noqa: E731
    options = dict(study_budget=study_budget, checkpoint_every=checkpoint_every, device=device, heartbeat=heartbeat,
                   grace=grace)
    if workers > 1:
        console.print(f"running study [bold]{name}[/] with {workers} worker processes")
        try:
            codes = pool.spawn(name, storage, workers, n_trials=n_trials, timeout=timeout, say=say, **options)
        except KeyboardInterrupt:
            click.echo(f"interrupted: finished trials of {name!r} are kept; the running ones saved their training "
                       f"state and are marked interrupted; `loopsearch study run {name}` continues it, retrying "
                       f"them first", err=True)
            sys.exit(130)
        st, _ = studies.load(name, storage)
        counts = _state_counts(st)
        click.echo(f"workers exited with {codes}; study {name!r}: {counts}; "
                   f"see `loopsearch leaderboard --study {name}`")
        if any(code not in (0,) for code in codes):
            sys.exit(1)
        return
    if auto:
        say(f"running study {name} with {threads} torch thread(s) (the free cores of {os.cpu_count()}; "
            f"set --threads to choose)")
    else:
        say(f"running study {name}" + (f" with {threads} torch thread(s)" if threads else ""))

    started, ran_here = time.monotonic(), []

    def done(study, trial):
        ran_here.append(trial.number)
        say(studies.trial_line(trial) + _study_progress(study, loaded, n_trials, len(ran_here),
                                                        time.monotonic() - started))

    try:
        ran = pool.run(name, storage, n_trials, timeout, progress=progress, callback=done, until=until,
                       worker=worker_id, say=say, **options)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished trials of {name!r} are kept; the running one saved its training state "
                   f"and is marked interrupted; `loopsearch study run {name}` continues it, retrying it first",
                   err=True)
        sys.exit(130)
    if worker_id or follower:
        say(f"ran {ran} trials")
    elif ran == 0:
        click.echo(f"study {name!r} already has its trials; pass --n-trials N to run more")
    else:
        click.echo(f"ran {ran} trials; see `loopsearch leaderboard --study {name}`")


@study.command("confirm")
@click.argument("name")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best complete trials to retrain (the baseline always is).")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True,
              help="New training seeds per trial (offsets after every seed it has used).")
@click.option("--study-budget", callback=_flops_option, metavar="FLOPS",
              help="Refuse when the study's training FLOPs plus the confirmation's would exceed this.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per trial.")
@click.option("--storage", help=STORAGE_HELP)
def study_confirm(name, top, seeds, study_budget, progress, storage):
    """Retrain the top trials and the baseline with more seeds; print means with 95% intervals.

    The confirmation runs are trials of the study (they do not count towards n_trials, their FLOPs
    count against --study-budget); the leaderboard merges their seeds into the trials they
    confirm and pairs each trial's difference from the baseline seed by seed.
    Running it again after an interruption finishes the queued confirmation trials.

    Example: loopsearch study confirm quick --top 2 --seeds 2
    """
    from .results import leaderboard as lb
    from .search import confirm as confirming

    console = _console()
    say = lambda message: console.print(message, highlight=False, markup=False)  # noqa: E731
    try:
        numbers = confirming.confirm(name, storage, top=top, seeds=seeds, study_budget=study_budget,
                                     progress=progress, say=say)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished confirmation trials are kept; `loopsearch study confirm {name}` "
                   f"continues the queued ones", err=True)
        sys.exit(130)
    df = lb.frame(storage, [name])
    df = df.filter(df["trial"].is_in(numbers))
    console.print(lb.rich_table(df, f"{name}: confirmed trials (every seed)"))


def _state_counts(st) -> dict[str, int]:
    """Trials per state, without the surplus ones workers did not run."""
    from collections import Counter

    from .search.workers import SURPLUS_ATTR

    return dict(Counter(t.state.name.lower() for t in st.get_trials(deepcopy=False)
                        if not t.user_attrs.get(SURPLUS_ATTR)))


@study.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def study_list(as_json, storage):
    """List the studies in a storage with their trial counts and best val NLL.

    Example: loopsearch study list
    """
    from .search.storage import require_existing

    require_existing(storage)
    import optuna
    from rich.table import Table

    from .search.storage import open_storage

    rows = []
    for s in optuna.get_all_study_summaries(open_storage(storage), include_best_trial=True):
        multi = len(s.directions) > 1
        best = None if multi or s.best_trial is None else s.best_trial.value
        rows.append({"name": s.study_name, "trials": s.n_trials, "best_val_nll": best,
                     "created": s.datetime_start.isoformat(timespec="seconds") if s.datetime_start else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="studies")
    for col in ("name", "trials", "best val NLL", "created"):
        table.add_column(col)
    for row in rows:
        best = "" if row["best_val_nll"] is None else f"{row['best_val_nll']:.4f}"
        table.add_row(row["name"], str(row["trials"]), best, (row["created"] or "").replace("T", " ")[:16])
    _console().print(table)


@study.command("enqueue")
@click.argument("name")
@click.option("--param", "params", multiple=True, metavar="K=V", required=True,
              help="A parameter as the space names it (repeatable): strategy, STRATEGY.PARAM, block_length, "
                   "loop_start, ...; see `loopsearch leaderboard --format json` for the names of earlier trials.")
@click.option("--storage", help=STORAGE_HELP)
def study_enqueue(name, params, storage):
    """Queue a chosen configuration; the next `study run` trains it before any sampled trial.

    The parameters are checked against the study's space now (a missing, unknown or out-of-range
    one is a one-line error). Example: loopsearch study enqueue quickstart --param strategy=fixed
    --param fixed.n_loops=3 --param fixed.train_loops=uniform --param block_length=2 --param loop_start=1
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .eval.generation import parse_params
    from .search.manage import enqueue, parse_value

    checked = enqueue(name, {k: parse_value(v) for k, v in parse_params(params).items()}, storage)
    click.echo(f"queued in {name}: " + ", ".join(f"{k}={v}" for k, v in checked.items())
               + f"; it runs first on `loopsearch study run {name}`")


@study.command("retry")
@click.argument("name")
@click.argument("trial", type=int)
@click.option("--storage", help=STORAGE_HELP)
def study_retry(name, trial, storage):
    """Queue a failed trial again: same parameters, resumed from its last checkpoint.

    Example: loopsearch study retry quickstart 3
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .search.manage import retry

    waiting = retry(name, trial, storage)
    click.echo(f"trial {trial} of {name} queued again ({waiting} waiting); it resumes from its last checkpoint "
               f"on `loopsearch study run {name}`")


@study.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Delete without asking (needed when stdin is not a terminal).")
@click.option("--storage", help=STORAGE_HELP)
def study_delete(name, yes, storage):
    """Delete a study from the storage, and its checkpoints, after a confirmation.

    Example: loopsearch study delete quickstart
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .search.manage import delete, describe

    n, root = describe(name, storage)
    if not yes:
        if not sys.stdin.isatty():
            raise LoopsearchError(f"refusing to delete study {name!r} ({n} trials) without a confirmation: "
                                  f"stdin is not a terminal; pass --yes")
        where = f" and its checkpoints in {root}" if root.exists() else ""
        click.confirm(f"delete study {name!r} ({n} trials){where}?", abort=True)
    n, removed = delete(name, storage)
    click.echo(f"deleted study {name} ({n} trials)" + (f" and {removed}" if removed else ""))


@study.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the stored spec as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def study_show(name, as_json, storage):
    """Show a study's stored spec and the state of its trials.

    Example: loopsearch study show quick
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .search import study as studies

    st, spec = studies.load(name, storage)
    if as_json:
        click.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
        return
    counts = _state_counts(st)
    console = _console()
    console.print(f"[bold]{spec.name}[/]  space {spec.space.name}: {spec.space.description}")
    console.print(f"budget {format_flops(spec.budget)} per trial; "
                  f"corpus {spec.corpus.name} {spec.corpus.params or ''}; "
                  f"backbone {spec.backbone.name} {spec.backbone.params or '(defaults)'}; vocab {spec.vocab_size}; "
                  f"seed {spec.seed}; Optuna sampler {spec.optuna_sampler}; pruner {spec.pruner}; "
                  f"target {spec.n_trials} trials; "
                  f"objectives {', '.join(spec.objective.metrics)}")
    console.print(f"trials: {dict(counts) or 'none yet'}")
    console.print(f"versions: {spec.versions}")


# ---- leaderboard ---------------------------------------------------------------------------------------
@cli.command()
@click.option("--study", "studies_", multiple=True, help="Study to include (repeat for several; default: all).")
@click.option("--top", type=click.IntRange(min=1), help="Show the K best trials of each study.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown", "parquet"]), default=None,
              help="Output format (default: table on the terminal; with --output, from the file's extension: "
                   ".csv, .json, .parquet, .md, else markdown).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write to this file instead of the terminal.")
@click.option("--scaling", is_flag=True, help="Show inference loop scaling (from `loopsearch eval`) instead.")
@click.option("--pareto", is_flag=True, help="Only the Pareto-optimal trials of each study (its best trial if "
                                             "single-objective).")
@click.option("--wide", is_flag=True, help="Every column (strategy, block, loops, params, FLOPs, ...), whatever "
                                           "the terminal's width; by default columns that do not fit are left out.")
@click.option("--storage", help=STORAGE_HELP)
def leaderboard(studies_, top, fmt, output, scaling, pareto, wide, storage):
    """Rank trials by validation NLL, with FLOPs and the difference from each study's baseline.

    Every val NLL carries its standard error, and every difference from the baseline is paired
    (seed by seed, or on identical validation masks) with a 95% interval; a row whose interval
    contains 0 is a tie, said in words. CSV/JSON/Parquet columns: val_nll, val_nll_se,
    val_nll_lo, val_nll_hi, seeds, delta_nll, delta_se, delta_lo, delta_hi, delta_basis
    ("N seeds", "masks" or "unpaired"), tie (true/false), vs_baseline (better, worse, tie).
    Pruned trials are listed with the training FLOPs they used before they were stopped.
    Under the table, for each study whose looped trials share 2+ seeds (replicates, or the trials
    `study confirm` retrained, on its new seeds): whether any of them differs from the others beyond
    seed noise (F test, seed effect removed).

    Examples: loopsearch leaderboard --study quick --top 5 --format csv --output quick.csv;
    loopsearch leaderboard --study multi --pareto
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .results import leaderboard as lb

    if scaling:
        df = lb.scaling_frame(storage, list(studies_) or None)
        table = lambda: lb.rich_scaling_table(df)  # noqa: E731
    else:
        df = lb.frame(storage, list(studies_) or None)
        df = lb.top(lb.pareto(df, storage) if pareto else df, top)
        title = "Pareto-optimal trials of each study (no trial is better in every objective)" if pareto else None
        table = lambda: lb.rich_table(df, title, width=_console().size.width, wide=wide)  # noqa: E731
    if fmt is None:
        suffix = Path(output).suffix.lower() if output else ""
        fmt = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".md": "markdown"}.get(suffix, "table")
    if fmt == "table" and not output:
        _console().print(table())
        if not scaling:
            for line in lb.spread_tests(storage, list(studies_) or None):
                _console().print(f"[dim]{line}[/]", highlight=False)
        return
    text = lb.write(df, fmt, output)
    if text is not None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {len(df)} rows to {output}", err=True)


# ---- reports and comparisons ------------------------------------------------------------------------------
@cli.command("report")
@click.argument("study_name", metavar="STUDY")
@click.option("--output", type=click.Path(file_okay=False), help="Directory to write (default: report-STUDY/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default="html", show_default=True,
              help="report.html (self-contained apart from the PNGs beside it) or report.md.")
@click.option("--storage", help=STORAGE_HELP)
def report_cmd(study_name, output, fmt, storage):
    """Write a study's report: one page with PNG plots and the leaderboard.

    Plots: val NLL vs training FLOPs per trial, loop placement heatmap (vs the baseline),
    inference loop scaling (from `loopsearch eval`), Pareto front (multi-objective studies) and
    parameter importances. Sections without data say so on the page.

    Example: loopsearch report quickstart --output report-quickstart --format md
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .results import report

    result = report.write(study_name, output, fmt, storage)
    console = _console()
    console.print(f"wrote [bold]{result.page}[/] with {len(result.images)} plots: "
                  f"{', '.join(p.name for p in result.images) or 'none'}")
    for s in result.skipped:
        console.print(f"[dim]{s.title}: {s.note}[/]")


@cli.command("repro")
@click.option("--name", default="loopmdm_repro", show_default=True,
              help="Study name (created on first use, continued after).")
@click.option("--recipe", default="loopmdm_repro", show_default=True, help="Recipe whose space has arms with roles.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="Folder with ptb/, wikitext-2/ and lambada/ (default: $LOOPSEARCH_DATA or the nearest shared/data).")
@click.option("--budget", help="Training FLOPs per arm (default: the recipe's, 3.5e13).")
@click.option("--corpus", help="Train on this instead of PTB: corpus plugin, text file, directory or hf:NAME.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Train every arm with N seeds (paired by seed): the claims get 95% intervals over seeds "
                   "(default: the recipe's space's, 1).")
@click.option("--workers", type=int, default=1, show_default=True, help="Train the arms in this many processes.")
@click.option("--output", type=click.Path(file_okay=False), help="Report directory (default: report-NAME/).")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default="html", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (evaluations).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars while training.")
@click.option("--storage", help=STORAGE_HELP)
def repro_cmd(name, recipe, data_dir, budget, corpus, seeds, workers, output, fmt, device, progress, storage):
    """LoopMDM's experiment end to end, with its claims beside the measurements.

    Trains the baseline, an early-middle looped, a late looped and a deeper non-looped model at
    the same training FLOPs on PTB (recipe loopmdm_repro), evaluates inference loop scaling,
    zero-shot bounds on WikiText-2 and LAMBADA and the attention of masked positions, and writes
    the report whose first table says, claim by claim, whether this run agrees with the paper:
    only when the 95% interval of the effect excludes 0 (over seeds with --seeds N; with one
    seed, the validation noise only). About 35 minutes per seed on 2 CPU cores (measured 34);
    run it again to continue after an interruption.

    Example: loopsearch repro --data ../shared/data --format md --seeds 3
    """
    from .experiments import repro

    console = _console()
    say = lambda message: console.print(message, highlight=False, markup=False)  # noqa: E731
    try:
        rep = repro.run(name, recipe, data=data_dir, budget=budget, corpus=corpus_option(corpus), storage=storage,
                        workers=workers, output=output, fmt=fmt, progress=progress, device=device, seeds=seeds,
                        say=say)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished arms of {name!r} are kept; `loopsearch repro --name {name}` continues",
                   err=True)
        sys.exit(130)
    claims = next((s for s in rep.sections if s.key == "claims"), None)
    if claims is not None and claims.rows:
        from rich.table import Table

        table = Table(title="LoopMDM's claims vs this run", show_lines=True)
        for header in claims.headers:
            table.add_column(header)
        for row in claims.rows:
            table.add_row(*row)
        console.print(table)


@cli.command("sweep")
@click.option("--name", help="Study name (default: sweep-YYYYmmdd-HHMMSS); an existing sweep is continued.")
@click.option("--recipe", default="loopmdm_repro", show_default=True, help="Recipe giving model, corpus and budget.")
@click.option("--space", help="Space with [arms.NAME] tables (default: the recipe's).")
@click.option("--arms", help="Comma-separated arms to run (default: all; the baseline arm is always kept).")
@click.option("--scales", default="1,2,4,8", show_default=True, help="Budgets as multiples of the recipe's budget.")
@click.option("--seeds", type=int, default=1, show_default=True, help="Training seeds per arm and budget (paired).")
@click.option("--budget", help="The x1 budget in training FLOPs (default: the recipe's).")
@click.option("--corpus", help="Corpus plugin, text file, directory or hf:NAME (default: the recipe's).")
@click.option("--train-tokens", type=int, help="Train on only the first N tokens (data-limited regime: many passes).")
@click.option("--workers", type=int, default=1, show_default=True, help="Train in this many processes.")
@click.option("--run/--no-run", "run_it", default=True, help="--no-run: create the study only.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars while training.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def sweep_cmd(name, recipe, space, arms, scales, seeds, budget, corpus, train_tokens, workers, run_it, progress,
              as_json, storage):
    """Iso-FLOP curves: the same arms at a ladder of training budgets, and the crossover.

    Every arm trains at every budget (and seed); each arm's final val NLL is compared with the
    baseline trained with the same seed at the same budget on identical validation masks; each
    difference gets a 95% interval (t over seeds, n - 1 degrees of freedom; with one seed only
    the validation noise). "crosses" needs one change of sign with intervals excluding 0 on both
    sides; otherwise the verdict says inconclusive or mixed. With >= 3 budgets each arm's means are
    fitted with L(C) = E + A (C/C0)^-alpha and the fits predict the crossover (95% bootstrap over
    seeds); with >= 4 the largest budget is held out of a second fit and the prediction checked
    there. `loopsearch report NAME` draws the curves and the fits.

    Example: loopsearch sweep --name iso --arms baseline,early_middle --budget 2e12 --scales 1,2,4,8 --seeds 2
    """
    from .experiments import sweep as sweeping
    from .results import sweep
    from .search import study as studies
    from .search.workers import run_to_target

    name = name or f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    if name not in studies.study_names(storage):
        chosen = [a.strip() for a in arms.split(",") if a.strip()] if arms else None
        spec = sweeping.make_spec(name, recipe, space, chosen, sweeping.parse_scales(scales), seeds, budget,
                                  corpus_option(corpus), train_tokens)
        if chosen is not None and not any(a.is_baseline for a in spec.space.arms.values()):
            raise LoopsearchError(f"--arms {arms}: keep the baseline arm (strategy none) to compare with")
        studies.create(spec, storage)
        total = sum(spec.space.budget_scales) * len(spec.space.arms) * seeds * spec.budget
        click.echo(f"created sweep {name!r}: {len(spec.space.arms)} arms x {len(spec.space.budget_scales)} budgets "
                   f"x {seeds} seed(s) = {spec.n_trials} trials, {total:.3g} training FLOPs")
    if run_it:
        console = _console()
        say = lambda message: console.print(message, highlight=False, markup=False)  # noqa: E731
        try:
            run_to_target(name, storage, workers, progress, say)
        except KeyboardInterrupt:
            click.echo(f"interrupted: finished trials are kept; `loopsearch sweep --name {name}` continues", err=True)
            sys.exit(130)
    st, spec = studies.load(name, storage)
    if not run_it and sweep.frame(st).is_empty():
        click.echo(f"next: loopsearch sweep --name {name}")
        return
    result = sweep.analyse(st, spec)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for table in sweep.rich_tables(result):
        _console().print(table)


@cli.command("compare")
@click.argument("names", metavar="STUDY...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows and warnings as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def compare_cmd(names, as_json, storage):
    """Compare studies side by side: budget, corpus, backbone, baseline and best trial of each.

    Warns (yellow) when budgets, corpora, backbones or vocab sizes differ: then val NLLs are not
    comparable across studies, only each best trial's difference from its own baseline.
    `loopsearch leaderboard --study A --study B` lists their trials side by side.

    Example: loopsearch compare em deep
    """
    from .search.storage import require_existing

    require_existing(storage)
    from .results import report

    rows, warnings = report.comparison(list(names), storage)
    if as_json:
        click.echo(json.dumps({"studies": rows, "warnings": warnings}, indent=2))
    else:
        _console().print(report.rich_comparison(rows))
    err = _console(stderr=True)
    for w in warnings:
        err.print(f"[yellow]warning: {w}[/]")


# ---- evaluation -------------------------------------------------------------------------------------------
def _loop_scaling(study_name, trial, loops, exit_specs, device, as_json, storage, loops_param="loops"):
    """`evaluate --metric loop_scaling`: val NLL (± its standard error) and inference FLOPs per
    token at each loop count, with and without exit criteria; stored in the study."""
    from .eval import loop_scaling as scaling
    from .exits import check_exits, parse_exit
    from .search import study as studies

    counts = scaling.parse_loops(loops)
    exits = [parse_exit(spec) for spec in exit_specs]
    check_exits(exits)  # unknown names and bad parameters fail before any work
    st, _ = studies.load(study_name, storage)
    directory = scaling.trial_checkpoint(st, trial)
    plain = st.trials[trial].user_attrs.get("strategy") == "none" if trial < len(st.trials) else False
    asked = click.get_current_context().get_parameter_source(loops_param) != click.core.ParameterSource.DEFAULT
    if plain and ((asked and counts != [1]) or exits):
        raise LoopsearchError(f"trial {trial} is the plain model (no loop block): it has one loop count and nothing to "
                              f"exit from; evaluate it with --loops 1 and no --exit, or pick a looped trial")
    if plain and counts != [1]:
        click.echo(f"note: trial {trial} is the plain model (no loop block): evaluated at its one loop count", err=True)
    rows = scaling.loop_scaling(directory, counts, device, exits)
    scaling.store(st, trial, directory, rows)
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.items() if k != "val_windows"} for r in rows], indent=2))
        return
    from .results import leaderboard as lb

    _console().print(lb.rich_scaling_table(lb.scaling_frame(storage, [study_name]).filter(
        lb.pl.col("trial") == trial)))


@cli.command("eval")
@click.argument("study_name", metavar="STUDY")
@click.argument("trial", type=int)
@click.option("--loops", default="1,2,3,4,6,8", show_default=True, help="Loop counts to evaluate: 1,2,4,8 or 1-8.")
@click.option("--exit", "exit_specs", multiple=True, metavar="SPEC",
              help="Also evaluate with an exit criterion, the loop count as a cap: NAME or NAME:key=value,... "
                   "(e.g. hidden_delta:tol=0.01, kl, argmax:patience=2). Repeatable.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def eval_cmd(study_name, trial, loops, exit_specs, device, as_json, storage):
    """Deprecated spelling of `loopsearch evaluate STUDY TRIAL --metric loop_scaling`.

    Example: loopsearch evaluate quickstart 2 --metric loop_scaling --loops 1,2,3,4,6,8
    """
    deprecated("loopsearch eval", "loopsearch evaluate --metric loop_scaling")
    _loop_scaling(study_name, trial, loops, exit_specs, device, as_json, storage)


# ---- sampling ------------------------------------------------------------------------------------------------
@cli.command("sample")
@click.argument("study_name", metavar="STUDY")
@click.argument("trial", type=int)
@click.option("--sampler", default="ancestral", show_default=True,
              help="Sampler plugin: ancestral, cached, confidence, threshold (see `loopsearch plugins list`).")
@click.option("--steps", type=click.IntRange(min=1),
              help="Sampler steps (network calls at most; default: one per generated token).")
@click.option("--loop-schedule", "loops", metavar="SCHEDULE",
              help="Loops per network call: N, constant:N, decreasing:LO-HI, increasing:LO-HI or middle:LO-HI, "
                   "optionally @mask_rate (default: the trial's own loop count).")
@click.option("--exit", "exit_spec", metavar="SPEC", help="Exit criterion for the loops, the scheduled count its cap: "
                                                          "NAME or NAME:key=value,... (e.g. hidden_delta:tol=0.01).")
@click.option("--model-schedule", metavar="RANGES",
              help="Use other trials' models for ranges of steps: START-END:TRIAL,... fractions of the steps, "
                   "e.g. 0-0.3:0 (the baseline for the first 30%).")
@click.option("--prompt", help="Text the samples start with (conditional generation).")
@click.option("--suffix", help="Text the samples end with (infilling between --prompt and --suffix).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Sampler parameter, repeatable (e.g. --param threshold=0.8 --param block_length=8).")
@click.option("-n", "--n-samples", "n", type=click.IntRange(min=1), default=4, show_default=True,
              help="Samples to draw (one batch).")
@click.option("--seq-len", type=click.IntRange(min=1),
              help="Tokens per sample (default and maximum: the trial's training length).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler's noise.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print samples and cost as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def sample_cmd(study_name, trial, sampler, steps, loops, exit_spec, model_schedule, prompt, suffix, params, n,
               seq_len, seed, device, as_json, storage):
    """Generate text from a trained trial, and say what it cost in network calls, loops and FLOPs.

    Example: loopsearch sample quickstart 1 --sampler confidence --steps 32 --loop-schedule middle:1-4 --prompt "ROMEO:"
    """
    from .eval import generation
    from .eval import loop_scaling as scaling
    from .exits import check_exits, parse_exit
    from .sampling import get_sampler, parse_loop_schedule
    from .search import study as studies

    schedule = parse_loop_schedule(loops) if loops else None
    exit_ = parse_exit(exit_spec) if exit_spec else None
    if exit_ is not None:
        check_exits([exit_])
    sampler_params = generation.parse_params(params)
    get_sampler(sampler, sampler_params)  # unknown names and bad parameters fail before any work
    ranges = generation.parse_model_schedule(model_schedule) if model_schedule else []
    if n < 1:
        raise LoopsearchError(f"--n-samples must be >= 1, got {n}")
    st, _ = studies.load(study_name, storage)
    loaded = generation.load_trial(scaling.trial_checkpoint(st, trial), device)
    models = [(a, b, generation.load_trial(scaling.trial_checkpoint(st, k), device).model) for a, b, k in ranges]
    result, texts = generation.sample_trial(loaded, n=n, sampler=sampler, steps=steps, seed=seed,
                                            params=sampler_params, loops=schedule, exit=exit_, prompt=prompt,
                                            suffix=suffix, seq_len=seq_len, models=models)
    cost = result.cost.as_dict()
    if as_json:
        click.echo(json.dumps({"samples": texts, "tokens": result.tokens.cpu().tolist(), "cost": cost,
                               "loops_per_call": result.cost.loops_per_call}, indent=2))
        return
    from rich.markup import escape

    console = _console()
    for i, text in enumerate(texts):
        console.rule(f"sample {i}")
        console.print(escape(text))
    console.rule()
    console.print(f"{sampler}: {cost['network_calls']} network calls ({cost['sequence_calls']} sequence passes, "
                  f"{cost['cached_calls']} steps fully cached), "
                  f"{cost['mean_loops']:.2f} loops per call, {cost['flops']:.3g} FLOPs = "
                  f"{cost['flops_per_token']:.3g} per generated token, {cost['wall_s']:.2f} s, "
                  f"{cost['tokens_per_s']:.0f} tokens/s")


# ---- generation and zero-shot metrics ----------------------------------------------------------------------
@cli.command("evaluate")
@click.argument("study_name", metavar="STUDY")
@click.argument("trial", type=int)
@click.option("--metric", type=click.Choice([*METRIC_NAMES, *OLD_METRIC_NAMES]), required=True,
              help="loop_scaling: val NLL and inference FLOPs at several loop counts (--loops, --exit); gen_ppl: "
                   "samples scored by the study's reference LM (+ unigram entropy); zeroshot_bpb: ELBO bound in "
                   "bits/byte on --data; task_accuracy: exact-match accuracy on --task by conditional sampling.")
@click.option("--loops", "loop_counts", default="1,2,3,4,6,8", show_default=True,
              help="loop_scaling: loop counts to evaluate, 1,2,4,8 or 1-8.")
@click.option("--data", "data_paths", multiple=True, metavar="PATH",
              help="zeroshot: text file(s) to evaluate (wiki.test.raw, lambada_test.jsonl, ptb.test.txt, any .txt).")
@click.option("--sequences", type=click.IntRange(min=0), default=64, show_default=True,
              help="zeroshot: windows of seq_len tokens evaluated (0: the whole file).")
@click.option("--task", default="addition", show_default=True, help="task: addition or gsm8k.")
@click.option("--task-param", "task_params", multiple=True, metavar="KEY=VALUE",
              help="task parameter, repeatable (e.g. --task-param digits=3, --task-param path=test.jsonl for gsm8k).")
@click.option("--n", "n_problems", type=click.IntRange(min=1), default=64, show_default=True,
              help="task: problems evaluated.")
@click.option("--sampler", default="confidence", show_default=True, help="genppl/task: sampler plugin.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Sampler parameter, repeatable.")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: one per generated token).")
@click.option("--loop-schedule", "loops", metavar="SCHEDULE",
              help="Loops per network call (see `loopsearch sample --help`).")
@click.option("--exit", "exit_specs", multiple=True, metavar="SPEC",
              help="Exit criterion: for the loops while sampling (gen_ppl, task_accuracy: one), or, with "
                   "loop_scaling, each loop count also evaluated as its cap (repeatable). E.g. hidden_delta:tol=0.01.")
@click.option("-n", "--n-samples", "n_samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="genppl: samples drawn.")
@click.option("--reference", type=click.Path(file_okay=False),
              help="genppl: reference LM directory (default: the study's, trained on first use; "
                   "see `loopsearch reference train`).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampler's noise / the zero-shot masks.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the result rows as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def evaluate_cmd(study_name, trial, metric, loop_counts, data_paths, sequences, task, task_params, n_problems,
                 sampler, params, steps, loops, exit_specs, n_samples, reference, seed, device, as_json, storage):
    """Measure a trained trial: loop scaling, generative perplexity, zero-shot bound or task accuracy.

    Results are stored with the trial (the leaderboard shows them; `leaderboard --scaling` the
    loop-scaling rows). The metric names are the study objectives' and the leaderboard columns'.

    Examples: loopsearch evaluate quickstart 1 --metric loop_scaling --loops 1-6 --exit hidden_delta:tol=0.01;
    loopsearch evaluate quickstart 1 --metric gen_ppl --sampler cached --steps 128;
    loopsearch evaluate quickstart 1 --metric zeroshot_bpb --data ../shared/data/wikitext-2/wiki.test.raw
    """
    if metric in OLD_METRIC_NAMES:
        deprecated(f"--metric {metric}", f"--metric {OLD_METRIC_NAMES[metric]}")
        metric = OLD_METRIC_NAMES[metric]
    if metric == "loop_scaling":
        return _loop_scaling(study_name, trial, loop_counts, exit_specs, device, as_json, storage, "loop_counts")
    if len(exit_specs) > 1:
        raise LoopsearchError(f"--metric {metric} takes one --exit (the loops while sampling); got {len(exit_specs)}")
    exit_spec = exit_specs[0] if exit_specs else None
    from .eval import generation, metrics
    from .eval import loop_scaling as scaling
    from .exits import check_exits, parse_exit
    from .sampling import get_sampler, parse_loop_schedule
    from .search import study as studies

    sampler_params = generation.parse_params(params)
    get_sampler(sampler, sampler_params)
    if loops:
        parse_loop_schedule(loops)  # a bad schedule fails before any work
    exit_ = parse_exit(exit_spec) if exit_spec else None
    if exit_ is not None:
        check_exits([exit_])
    if metric == "zeroshot_bpb" and not data_paths:
        raise LoopsearchError("--metric zeroshot_bpb needs --data PATH (e.g. ../shared/data/wikitext-2/wiki.test.raw)")
    st, spec = studies.load(study_name, storage)
    loaded = generation.load_trial(scaling.trial_checkpoint(st, trial), device)
    sampling = dict(sampler=sampler, params=sampler_params, steps=steps, seed=seed, loops=loops, exit=exit_)
    if metric == "gen_ppl":
        ref = reference or metrics.ensure_reference(spec)
        rows = [metrics.gen_ppl_metric(loaded, ref, n_samples=n_samples, **sampling)]
    elif metric == "zeroshot_bpb":
        rows = [metrics.zeroshot_metric(loaded, path, sequences=sequences or None, seed=seed) for path in data_paths]
    else:
        if spec.corpus.name != task:
            click.echo(f"warning: study {study_name!r} trained on corpus {spec.corpus.name!r}, not on task {task!r}: "
                       f"this accuracy is of a model that never saw the task (train on it with [corpus] name = "
                       f"{task!r} where a corpus of that name exists)", err=True)
        rows = [metrics.task_metric(loaded, task, generation.parse_params(task_params), n=n_problems, **sampling)]
    for row in rows:
        metrics.store(st, trial, row)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    _console().print(metrics.rich_table(rows, f"{study_name} trial {trial}"))


@cli.group()
def reference():
    """The reference causal LM that scores samples (generative perplexity)."""


@reference.command("train")
@click.argument("study_name", metavar="STUDY")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Reference LM setting, repeatable: n_layer, d_model, n_heads, seq_len, batch_size, lr, steps, "
                   "budget (FLOPs), seed, device.")
@click.option("--force", is_flag=True, help="Retrain even if the study already has a reference.")
@click.option("--storage", help=STORAGE_HELP)
def reference_train(study_name, params, force, storage):
    """Train a small causal transformer on the study's corpus and tokeniser, for gen-PPL.

    It is stored in ARTIFACTS_DIR/STUDY/reference; `loopsearch evaluate --metric genppl` and
    gen_ppl study objectives use it (and train it with the defaults on first use if missing).

    Example: loopsearch reference train quickstart --param steps=600
    """
    from .eval import generation, metrics
    from .search import study as studies

    _, spec = studies.load(study_name, storage)
    path = metrics.reference_path(spec)
    if (path / "model.safetensors").exists() and not force:
        raise LoopsearchError(f"study {study_name!r} already has a reference LM in {path}; pass --force to retrain it")
    info = metrics.train_reference_for(spec, generation.parse_params(params), progress=True)
    click.echo(f"reference LM for {study_name!r} in {path}: val NLL {info['val_nll']:.4f} nats/token "
               f"(ppl {info['val_ppl']:.2f}) after {info['steps']} steps, {info['wall_s']:.0f} s")


# ---- analysis ----------------------------------------------------------------------------------------------
@cli.group()
def analyze():
    """Look inside a trained trial."""


@analyze.command("attention")
@click.argument("study_name", metavar="STUDY")
@click.argument("trial", type=int)
@click.option("--rates", default="0.15,0.5,0.85", show_default=True, help="Mask rates, each in (0, 1).")
@click.option("--loops", "n_loops", type=int, default=None,
              help="Loop count of the block (default: the strategy's inference count).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--storage", help=STORAGE_HELP)
def analyze_attention(study_name, trial, rates, n_loops, device, as_json, storage):
    """Share of attention mass masked queries put on masked vs unmasked keys, per layer and loop.

    On the study's validation split, at each mask rate. mask→mask counts the attention a masked
    query pays to *other* masked keys; its own position is reported apart (self); "uniform share"
    is the masked fraction of the other keys (what uniform attention over them would give). The loop
    block is applied as a plain repetition (the fixed strategy's reinject included; halting's
    freezing is not reproduced).

    Example: loopsearch analyze attention quickstart 2 --rates 0.15,0.5,0.85
    """
    from .eval import attention
    from .eval import loop_scaling as scaling
    from .search import study as studies

    parsed = attention.parse_rates(rates)
    if n_loops is not None and n_loops < 1:
        raise LoopsearchError(f"--loops must be >= 1, got {n_loops}")
    st, _ = studies.load(study_name, storage)
    directory = scaling.trial_checkpoint(st, trial)
    rows = attention.trial_attention_shares(directory, parsed, n_loops, device)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _console().print(attention.rich_table(rows))


def main(argv: list[str] | None = None) -> None:
    import logging

    handler = logging.StreamHandler()  # library warnings (e.g. a plugin that failed to load) on stderr
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logging.getLogger("loopsearch").addHandler(handler)
    try:
        code = cli.main(args=argv, prog_name="loopsearch", standalone_mode=False)
    except LoopsearchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the known fatal conditions become one line; the rest re-raise
        line = fatal_line(exc, sys.argv[1:] if argv is None else argv)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _chain(exc: BaseException):
    """The exception and its causes, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fatal_line(exc: BaseException, argv: list[str]) -> str | None:
    """One line for a disk that is full or a study database that cannot be read (naming the file
    and what to do), or None for anything else."""
    import errno

    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" writing {e.filename}" if e.filename else ""
            return (f"no space left on the device{where}: free some space, or write elsewhere (the recipe's "
                    f"artifacts_dir for checkpoints, --storage for the study database, --output for files)")
    text = " ".join(str(e) for e in _chain(exc))
    storage_failure = any(type(e).__name__ in ("StorageInternalError", "DatabaseError", "OperationalError")
                          for e in _chain(exc))
    damaged = ("malformed", "not a database", "file is encrypted", "disk i/o error")
    if storage_failure and any(d in text.lower() for d in damaged):
        from .search.storage import mask, storage_url

        explicit = None
        for i, arg in enumerate(argv):
            if arg == "--storage" and i + 1 < len(argv):
                explicit = argv[i + 1]
            elif arg.startswith("--storage="):
                explicit = arg.split("=", 1)[1]
        why = next((d for d in damaged if d in text.lower()), "damaged")
        return (f"the study database {mask(storage_url(explicit))} is damaged ({why}) and cannot be read: restore "
                f"it from a copy, or start a new one with --storage (or LOOPSEARCH_STORAGE)")
    return None


if __name__ == "__main__":
    main()
