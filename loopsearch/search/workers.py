"""Many workers, one study: Optuna's shared storage schedules, loopsearch fills Optuna's gaps.

Any number of processes, on any number of hosts, run ``loopsearch study run NAME`` on the same
storage (PostgreSQL, or a journal file on one host); each asks Optuna for the next trial. What
Optuna leaves to the caller is done here:

* **Study-wide limits.** ``n_trials`` and ``timeout`` in ``Study.optimize`` are per process.
  Here a worker counts finished (complete + pruned) trials in the storage before every trial,
  and stops when the study has its target; with ``--study-budget`` it also stops when the
  training FLOPs spent by all trials, plus the full per-trial budget of every running trial and
  of the next one, would exceed it. While other workers' running trials could still reach the
  target, a worker waits (and watches for dead ones) instead of starting a surplus trial.
  Two workers that pass the check at the same moment are settled inside the objective: a trial
  whose lower-numbered trials already reach a limit is not run (it is marked failed and
  ``loopsearch.surplus``; the leaderboard leaves it out).
* **Dead workers.** RDB storages use Optuna's heartbeat (``heartbeat_interval``,
  ``grace_period``); journal stores, which have none, get a lease: a thread refreshes the
  trial's ``loopsearch.lease`` system attribute every interval. Every worker, before each trial
  and while it waits, fails running trials silent for longer than the grace period and enqueues
  a retry with Optuna's ``RetryHeartbeatStaleTrialCallback`` (same parameters and user attributes,
  intermediate values kept), at most 3 times per trial. The retry inherits the dead trial's
  training-state directory and resumes from its newest checkpoint (loopsearch/resume.py).
* **SQLite.** It is not safe for several processes, so ``--workers N`` on a SQLite file runs the
  workers on a journal file beside it (``loopsearch.db`` -> ``loopsearch.journal``, Optuna's
  ``JournalFileBackend``, file-locked) and copies the study back into the SQLite file when they stop.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from .. import checkpoint, interrupt
from ..errors import LoopsearchError
from ..resume import Checkpointer
from ..spec import TrialConfig
from ..train import train
from .storage import journal_path, mask, open_storage, sqlite_path, storage_url
from .space import BASELINE_ATTR
from .study import (CONFIRM_OF_ATTR, FINISHED, INTERRUPTED_ATTR, SPEC_ATTR, Objective, counted, ensure_baseline, load,
                    make_pruner, make_sampler, trial_budget, trial_line)

LEASE_ATTR = "loopsearch.lease"
# a trial a worker did not run: the study's limit was reached (results leave it out)
SURPLUS_ATTR = "loopsearch.surplus"
MAX_RETRY = 3  # retries of a trial whose worker died
MAX_FAILURES = 3  # a worker stops after this many failed trials in a row
DEFAULT_HEARTBEAT = 30  # seconds between heartbeats / lease renewals
POLL_S = 1.0  # how often a waiting worker looks at the storage again

log = logging.getLogger("loopsearch")


class StudyLimitReached(LoopsearchError):
    """Raised inside the objective for a trial the study no longer needs (another worker won)."""


def _quiet_surplus(record) -> bool:
    """Optuna logs every trial that raises; a surplus trial is expected, not an error."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, StudyLimitReached) and "StudyLimitReached" not in record.getMessage()


for _handler in optuna.logging.get_logger("optuna").handlers:
    _handler.addFilter(_quiet_surplus)


@dataclass
class Limits:
    """Study-wide limits: ``target`` finished trials; ``study_budget`` training FLOPs of all
    trials together (None: no limit); ``trial_budget`` the FLOPs one trial may spend."""

    target: int
    study_budget: float | None
    trial_budget: float


def sampler_offset(n_before: int, worker: int, pid: int, others_running: bool) -> int:
    """The sampler seed's offset for this process. Workers spawned by one ``--workers N`` parent are
    told apart by their index; an independent process (``worker`` 0: another terminal, another host,
    on any storage, SQLite included) that finds trials of the study already running also by its pid,
    so two of them do not replay the same draws. A process alone on its study keeps a reproducible
    seed (a rerun, or a torchrun group against one process, proposes the same configurations). A
    configuration proposed twice anyway is not retrained (``Objective.duplicate_of``)."""
    return n_before + 7919 * worker + (pid if worker == 0 and others_running else 0)


def flops_spent(trials: list[FrozenTrial]) -> float:
    """Training FLOPs the study's trials spent: each trial's ``train_flops`` (complete, pruned,
    failed; a resumed trial counts the part its dead predecessor saved) plus the FLOPs a dead
    worker ran after its last checkpoint (``flops_lost``, recorded on the retry)."""
    return sum(float(t.user_attrs.get("train_flops", 0.0)) + float(t.user_attrs.get("flops_lost", 0.0))
               for t in trials if not t.user_attrs.get(SURPLUS_ATTR))


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=True)


def requeue(study: optuna.Study, t: FrozenTrial) -> None:
    """Queue a failed trial again as its retry: same parameters, user attributes (less the failure)
    and intermediate values, and the retry history that points it at the first attempt's
    training-state directory, so it resumes from the newest checkpoint there."""
    history = [*t.system_attrs.get("retry_history", []), t.number]
    user = {k: v for k, v in t.user_attrs.items() if k not in ("failed", "train_flops", INTERRUPTED_ATTR)}
    system = {**t.system_attrs, "failed_trial": t.system_attrs.get("failed_trial", t.number), "retry_history": history}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                                              user_attrs=user, system_attrs=system,
                                              intermediate_values=t.intermediate_values))


def retried(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of the trials that already have a retry."""
    return {int(n) for t in trials for n in t.system_attrs.get("retry_history", [])}


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Queue every trial that a Ctrl-C or SIGTERM ended (and that has no retry yet) again, ahead of
    new samples; return their numbers."""
    trials = study.get_trials(deepcopy=False)
    done = retried(trials)
    again = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR)
             and t.number not in done]
    for t in again:
        requeue(study, t)
    return [t.number for t in again]


# ---- dead workers ---------------------------------------------------------------------------------
def fail_stale(study: optuna.Study, grace: float) -> list[int]:
    """Fail running trials whose worker stopped (heartbeat or lease older than ``grace`` s) and
    enqueue their retries. Returns the numbers of the trials this call failed."""
    store = study._storage
    now, retry = time.time(), retry_callback()
    if optuna.storages._heartbeat.is_heartbeat_enabled(store):
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls the storage's retry callback
        stale = _without_heartbeat(store, [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                                           if t.datetime_start and now - t.datetime_start.timestamp() > grace])
        failed = [t.number for t in stale if _fail_and_retry(study, t, retry)]
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sorted((running - still) | set(failed))
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        last = max(float(t.system_attrs.get(LEASE_ATTR, 0.0)), started)  # a retry inherits an old lease
        if now - last > grace and _fail_and_retry(study, t, retry):
            failed.append(t.number)
    return failed


@contextlib.contextmanager
def stale_watcher(study: optuna.Study, grace: float, interval: float | None = None):
    """While the block runs, a daemon thread fails the trials of dead workers (``fail_stale``) every
    ``interval`` seconds (default: grace / 2, at least 1 s), so a dead trial is failed and retried
    within about a grace period even while this worker is inside a long trial of its own (before,
    only between trials). The thread has its own storage handle; errors are logged, not raised."""
    stop = threading.Event()
    every = interval if interval is not None else max(1.0, grace / 2)

    def watch() -> None:
        while not stop.wait(every):
            try:
                failed = fail_stale(study, grace)
                if failed:
                    log.info("failed stale trial(s) %s of %s and queued their retries", failed, study.study_name)
            except Exception as exc:  # noqa: BLE001 - a storage hiccup must not kill the watcher or the worker
                log.warning("stale-trial watcher: %s", exc)

    thread = threading.Thread(target=watch, name="loopsearch-stale-watcher", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=5)


def _fail_and_retry(study: optuna.Study, t: FrozenTrial, retry) -> bool:
    """Fail a dead trial and enqueue its retry; False if another worker failed it first."""
    store = study._storage
    try:
        if not store.set_trial_state_values(t._trial_id, TrialState.FAIL):
            return False
    except (UpdateFinishedTrialError, KeyError):
        return False
    retry(study, store.get_trial(t._trial_id))
    return True


def _without_heartbeat(store, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Running RDB trials that never sent a heartbeat (left by a worker killed before its first
    one, or by a version without heartbeats): Optuna never calls them stale, so they would
    hold a place in the study forever."""
    if not trials:
        return []
    backend = getattr(store, "_backend", store)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(backend.scoped_session) as session:
            beating = {row[0] for row in session.query(models.TrialHeartbeatModel.trial_id)
                       .filter(models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in trials])).all()}
    except Exception as exc:  # noqa: BLE001 - Optuna internals moved: skip this extra check
        log.debug("cannot look up heartbeats: %s", exc)
        return []
    return [t for t in trials if t._trial_id not in beating]


@contextlib.contextmanager
def lease(trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Renew the trial's lease every ``interval`` s while it runs (journal stores)."""
    store, trial_id, stop = trial.study._storage, trial._trial_id, threading.Event()

    def renew() -> None:
        while True:
            try:
                store.set_trial_system_attr(trial_id, LEASE_ATTR, time.time())
            except Exception:  # noqa: BLE001 - the trial finished or the store went away: stop renewing
                return
            if stop.wait(interval):
                return

    thread = threading.Thread(target=renew, name=f"lease-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---- limits -------------------------------------------------------------------------------------------
def decide(study: optuna.Study, limits: Limits, grace: float) -> tuple[str, str]:
    """Before a trial: ("stop" | "wait" | "go", why). A baseline that is missing (killed, failed,
    never enqueued) is enqueued again here, at every decision, and the study is not done without
    a finished one: every other trial is compared with it."""
    fail_stale(study, grace)
    if SPEC_ATTR in study.user_attrs:  # a loopsearch study (not a bare Optuna one)
        ensure_baseline(study)
    trials = study.get_trials(deepcopy=False)
    done = sum(counted(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    baseline = [t.state for t in trials if t.user_attrs.get(BASELINE_ATTR)]
    if done >= limits.target and TrialState.COMPLETE not in baseline:
        if TrialState.WAITING in baseline:
            return "go", ""  # the queued baseline runs first, past the target if need be
        if TrialState.RUNNING in baseline:
            return "wait", "the baseline is running; the study is not done without it"
    if done >= limits.target:
        return "stop", f"the study has {done} finished trials (target {limits.target})"
    if limits.study_budget is not None:
        spent = flops_spent(trials)
        if spent + (running + 1) * limits.trial_budget > limits.study_budget:
            if running:
                return "wait", f"{running} running trials may use the rest of the study budget"
            return "stop", (f"the study budget {limits.study_budget:.3g} FLOPs cannot pay for another trial "
                            f"({spent:.3g} spent, {limits.trial_budget:.3g} per trial)")
    if done + running >= limits.target:
        return "wait", f"{running} running trials may complete the study"
    return "go", ""


def claim(study: optuna.Study, trial: optuna.Trial, limits: Limits) -> None:
    """Inside the objective: raise StudyLimitReached if the trials numbered below this one
    (finished, running or waiting) already reach a limit. Lower numbers win, so of two workers
    that passed ``decide`` together exactly the later trial yields. The baseline always runs, once:
    a baseline trial yields only to another baseline that is finished, or alive (running or waiting)
    with a lower number. Two can be queued when the baseline was killed: a worker that found none alive
    enqueues a fresh one while the stale-trial watcher queues the dead one's retry (kill -9 experiment,
    benchmarks/kill9_experiment.py: two baselines finished in 2 of 4 runs before this check)."""
    if trial.user_attrs.get(BASELINE_ATTR):
        if trial.user_attrs.get(CONFIRM_OF_ATTR) is not None:  # retraining the baseline with more seeds
            return
        other = next((t for t in study.get_trials(deepcopy=False)
                      if t.number != trial.number and t.user_attrs.get(BASELINE_ATTR)
                      and not t.user_attrs.get(SURPLUS_ATTR) and t.user_attrs.get(CONFIRM_OF_ATTR) is None
                      and (t.state in FINISHED
                           or (t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number))),
                     None)
        if other is not None:
            reason = f"baseline trial {other.number} is {other.state.name.lower()}: one baseline per study"
            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.set_user_attr("failed", f"not run: {reason}")
            raise StudyLimitReached(f"trial {trial.number} not run: {reason}")
        return
    trials = study.get_trials(deepcopy=False)
    ahead = [t for t in trials if t.number < trial.number
             and (t.state in FINISHED or t.state in (TrialState.RUNNING, TrialState.WAITING))
             and not t.user_attrs.get(SURPLUS_ATTR) and t.user_attrs.get(CONFIRM_OF_ATTR) is None]
    reason = None
    if len(ahead) >= limits.target:
        reason = f"{len(ahead)} trials ahead of it reach the study's target of {limits.target}"
    elif limits.study_budget is not None:
        pending = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in ahead)
        if flops_spent(trials) + (pending + 1) * limits.trial_budget > limits.study_budget:
            reason = f"trials ahead of it may use the rest of the study budget {limits.study_budget:.3g} FLOPs"
    if reason:
        trial.set_user_attr(SURPLUS_ATTR, True)
        trial.set_user_attr("failed", f"not run: {reason}")
        raise StudyLimitReached(f"trial {trial.number} not run: {reason}")


# ---- one worker -----------------------------------------------------------------------------------------
def run(name: str, storage: str | None = None, n_trials: int | None = None, timeout: float | None = None,
        progress: bool = True, callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        **options: Any) -> int:
    """Run trials of a stored study in this process. Without ``n_trials``, run until the study
    has the spec's ``n_trials`` finished (complete or pruned) trials, counted in the storage, so
    an interrupted run continues where it stopped and several workers share one target; with
    it, until n_trials more have finished. ``options``: see ``work`` (study budget, heartbeat,
    device, checkpoint interval, ...). Returns how many trials this call ran."""
    return work(name, storage, n_trials=n_trials, timeout=timeout, progress=progress, callback=callback, **options)


def work(name: str, storage: str | None = None, *, n_trials: int | None = None, until: int | None = None,
         timeout: float | None = None, progress: bool = True,
         callback: Callable[[optuna.Study, FrozenTrial], None] | None = None, study_budget: float | None = None,
         worker: int = 0, heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None, device: str | None = None,
         checkpoint_every: float | None = None, say: Callable[[str], None] | None = None) -> int:
    """Run trials of a stored study in this process until a study-wide limit, ``timeout``
    (seconds, this process) or MAX_FAILURES failed trials in a row. The target is ``until``
    finished trials, else the finished ones now plus ``n_trials``, else the spec's ``n_trials``.
    Returns how many trials this process ran."""
    say = say or (lambda message: None)
    grace = grace if grace is not None else 4 * heartbeat
    rank, world = init_distributed()
    if rank > 0:  # a data-parallel follower: rank 0 talks to Optuna
        try:
            return follow(load(name, storage)[1], device=device, checkpoint_every=checkpoint_every)
        finally:
            close_distributed()
    url = storage_url(storage)
    store = open_storage(url, heartbeat=(heartbeat, grace), on_stale=retry_callback())
    study, spec = load(name, url, store=store)
    before = study.get_trials(deepcopy=False)
    running = any(t.state == TrialState.RUNNING for t in before)
    study.sampler = make_sampler(spec, offset=sampler_offset(len(before), worker, os.getpid(), running))
    study.pruner = make_pruner(spec)
    if worker == 0:
        again = requeue_interrupted(study)
        if again:
            say(f"retrying interrupted trial(s) {', '.join(map(str, again))} first, from their saved state")
        ensure_baseline(study)
    done = sum(counted(t) for t in before)
    target = until if until is not None else (done + n_trials if n_trials is not None else spec.n_trials)
    limits = Limits(target, study_budget, trial_budget(spec))
    objective = Objective(spec, progress, device=device, checkpoint_every=checkpoint_every,
                          share=share if world > 1 else None)
    journal = not optuna.storages._heartbeat.is_heartbeat_enabled(study._storage)

    def guarded(trial: optuna.Trial):
        claim(study, trial, limits)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        with lease(trial, heartbeat) if journal else contextlib.nullcontext():
            return objective(trial)

    last: list[FrozenTrial] = []
    callbacks = [lambda st, t: last.append(t)] + ([callback] if callback else [])
    deadline = time.monotonic() + timeout if timeout is not None else None
    with interrupt.deferred(), stale_watcher(study, grace):
        ran = _loop(study, guarded, callbacks, last, limits, grace, deadline, timeout, name, say)
    if world > 1:
        share(None)  # the followers stop
        close_distributed()
    return ran


def _loop(study, guarded, callbacks, last, limits, grace, deadline, timeout, name, say) -> int:
    ran, failures, waiting = 0, 0, ""
    while True:
        interrupt.check()
        if deadline is not None and time.monotonic() >= deadline:
            say(f"stopping: --timeout {timeout:g} s reached")
            break
        decision, why = decide(study, limits, grace)
        if decision == "stop":
            say(f"stopping: {why}")
            break
        if decision == "wait":
            if why != waiting:
                say(f"waiting: {why}")
                waiting = why
            time.sleep(POLL_S)
            continue
        waiting = ""
        try:
            study.optimize(guarded, n_trials=1, callbacks=callbacks, catch=(RuntimeError,))
        except StudyLimitReached:
            continue
        except (UpdateFinishedTrialError, ValueError) as exc:
            if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                raise
            # this worker was stalled (stopped, swapped out) for longer than --grace: another worker
            # failed its trial and retried it; the retry owns the trial now, so this attempt is dropped
            say("abandoned a trial that another worker took over while this one was stalled longer than "
                "--grace (its retry continues it)")
            continue
        ran += 1
        failures = failures + 1 if last and last[-1].state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES:
            say(f"stopping: {failures} trials in a row failed in this worker "
                f"(see `loopsearch leaderboard --study {name}`)")
            break
    return ran


# ---- one trial, several processes (torchrun) ------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """Join the torchrun group when this process was started by torchrun (WORLD_SIZE > 1):
    NCCL on GPUs (one per rank, LOCAL_RANK), gloo on CPU. Returns (rank, world size)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 may wait long for other workers' trials (decide: "wait") between two messages
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Leave the torchrun group together: a rank that exits while another still holds its gloo
    connections can abort the other one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def share(message: dict | None) -> dict | None:
    """Broadcast a JSON message from rank 0 to every rank (no pickle); ranks > 0 pass None."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = json.dumps(message).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if dist.get_rank() == 0
           else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


class _Pruned(Exception):
    pass


def follow(spec, device: str | None = None, checkpoint_every: float | None = None) -> int:
    """Ranks > 0 of a torchrun group: train every trial rank 0 announces, on this rank's shard of
    each global batch, stop when rank 0 prunes it, until rank 0 says the run is over. Returns the
    number of trials trained."""
    objective, trained = Objective(spec, progress=False, device=device, checkpoint_every=checkpoint_every), 0
    while (message := share(None)) is not None:
        config = TrialConfig.model_validate(message["config"])
        data = objective.data()
        torch.manual_seed(config.seed)
        model = checkpoint.build_model(config, data.vocab_size)
        ckpt = Checkpointer(message["state"], config.train.checkpoint_every, writer=False)

        def report(gflops: int, nll: float) -> None:
            if spec.objective.metrics == ["val_nll"] and share(None)["prune"]:
                raise _Pruned

        try:
            train(model, data, config.train, config.budget, config.seed, report=report, progress=False,
                  checkpointer=ckpt, eval_seed=config.mask_seed)
        except (_Pruned, FloatingPointError):  # every rank sees the same (rank-averaged) loss
            pass
        trained += 1
    return trained


# ---- local worker processes ---------------------------------------------------------------------------
def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(workers: int, load: float | None = None) -> int:
    """torch threads per worker: the cores that are free, shared out. More threads than free cores
    per process made tiny models 3-10x slower on a 2-core machine with one other busy process
    (measured: 23 s quiet, 103-319 s competing with 2 threads, 29-33 s with 1). ``load``: the
    machine's run-queue length before these workers start (default: the 1-minute load average)."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            load = 0.0
    free = max(1.0, cores() - load)
    return max(1, min(cores() // workers, int(free / workers + 0.5)))


def visible_gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([d.strip() for d in listed.split(",") if d.strip()] if listed
           else [str(i) for i in range(torch.cuda.device_count())])
    return ids


def to_journal(name: str, sqlite_url: str, journal_url: str) -> None:
    """Copy the study from SQLite into the journal file (replacing an older copy there)."""
    src, dst = open_storage(sqlite_url), open_storage(journal_url)
    in_src = name in [s.study_name for s in optuna.get_all_study_summaries(src, include_best_trial=False)]
    in_dst = name in [s.study_name for s in optuna.get_all_study_summaries(dst, include_best_trial=False)]
    if not in_src:
        if in_dst:  # an earlier run stopped before copying back: the journal has the study
            return
        raise LoopsearchError(f"unknown study {name!r} in {mask(sqlite_url)}")
    if in_dst:
        optuna.delete_study(study_name=name, storage=dst)
    optuna.copy_study(from_study_name=name, from_storage=src, to_storage=dst)


def settle(name: str, url: str) -> None:
    """After every local worker exited: trials still running in the journal are dead; fail them
    and enqueue their retries, so the next run resumes them."""
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    retry = retry_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                retry(study, study._storage.get_trial(t._trial_id))
        except UpdateFinishedTrialError:
            pass


def from_journal(name: str, journal_url: str, sqlite_url: str) -> None:
    """Copy the study back into SQLite; drop it from the journal (and the file once it is empty)."""
    src, dst = open_storage(journal_url), open_storage(sqlite_url)
    if name in [s.study_name for s in optuna.get_all_study_summaries(dst, include_best_trial=False)]:
        optuna.delete_study(study_name=name, storage=dst)
    optuna.copy_study(from_study_name=name, from_storage=src, to_storage=dst)
    optuna.delete_study(study_name=name, storage=src)
    if not optuna.get_all_study_summaries(src, include_best_trial=False):
        path = journal_path(journal_url)
        for p in (path, path.with_name(path.name + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def run_to_target(name: str, storage: str | None, workers: int, progress: bool, say: Callable[[str], None]) -> None:
    """Run a study to its target in this process (a line per finished trial) or in ``workers``
    processes; a worker that fails is an error (``repro`` and ``sweep`` need every arm)."""
    if workers <= 1:
        run(name, storage, progress=progress, say=say, callback=lambda st, t: say(trial_line(t)))
        return
    codes = spawn(name, storage, workers, say=say)
    if any(codes):
        raise LoopsearchError(f"workers exited with {codes}; see `loopsearch leaderboard --study {name}`")


def spawn(name: str, storage: str | None, workers: int, *, n_trials: int | None = None, timeout: float | None = None,
          study_budget: float | None = None, heartbeat: int = DEFAULT_HEARTBEAT, grace: int | None = None,
          device: str | None = None, checkpoint_every: float | None = None,
          say: Callable[[str], None] | None = None) -> list[int]:
    """Start ``workers`` local worker processes (this CLI, ``study run --worker-id I``) on one
    storage and wait for them. Each gets cores // workers torch threads and, on a GPU machine,
    one of the visible GPUs (round robin). The storage URL reaches them through the environment,
    never the command line (where ``ps`` would show a password). Returns their exit codes."""
    say = say or (lambda message: None)
    url = storage_url(storage)
    run_url, db = url, sqlite_path(url)
    if db is not None:
        run_url = f"journal:{db.with_suffix('.journal')}"
        to_journal(name, url, run_url)
        say(f"SQLite is not safe for {workers} processes: running them on the journal file "
            f"{journal_path(run_url)} (copied back into {db} when they stop)")
    study, spec = load(name, run_url)
    again = requeue_interrupted(study)
    if again:
        say(f"retrying interrupted trial(s) {', '.join(map(str, again))} first, from their saved state")
    ensure_baseline(study)
    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    until = done + n_trials if n_trials is not None else spec.n_trials
    threads, gpus = worker_threads(workers), visible_gpus() if device in (None, "auto", "cuda") else []
    options = [("--timeout", timeout), ("--study-budget", study_budget), ("--grace", grace), ("--device", device),
               ("--checkpoint-every", checkpoint_every)]
    procs: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum, frame) -> None:  # SIGINT or SIGTERM to this process: to every worker, at once
        received.append(signum)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(1, workers + 1):
            env = {**os.environ, "LOOPSEARCH_STORAGE": run_url, "OMP_NUM_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[(i - 1) % len(gpus)]
            cmd = [sys.executable, "-m", "loopsearch", "study", "run", name, "--no-progress", "--worker-id", str(i),
                   "--threads", str(threads), "--until", str(until), "--heartbeat", str(heartbeat)]
            cmd += [str(x) for key, value in options if value is not None for x in (key, value)]
            # their own session: a terminal's Ctrl-C reaches only this process, which forwards it once (a
            # second SIGINT would make a worker stop at once, without saving its trial's state)
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            if received:  # a signal came while starting them: the ones started now get it too
                forward(received[-1], None)
        codes = [p.wait() for p in procs]  # the workers checkpoint, mark their trials failed and exit
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if db is not None:
            settle(name, run_url)
            from_journal(name, run_url, url)
    if received:
        raise KeyboardInterrupt  # the caller says how to continue, and exits non-zero
    return codes
