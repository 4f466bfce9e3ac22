"""Search at scale (issue 5): FLOP-keyed pruning, multi-objective, study-wide limits across worker
processes on PostgreSQL and the journal file store, dead workers retried from their checkpoint,
data parallel training, and storage URLs that never show their password.

Worker processes get one torch thread each (the CLI shares the cores out); PostgreSQL is the real
server on 127.0.0.1:5432 (database `test`), skipped when it is not reachable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import polars as pl
import pytest
import torch
from optuna.trial import TrialState

from conftest import run_cli
from helpers import tiny_model
from loopsearch.resume import Checkpointer
from loopsearch.results import leaderboard
from loopsearch.search import manage
from loopsearch.search import study as studies
from loopsearch.search import workers
from loopsearch.search.space import BASELINE_ATTR
from loopsearch.search.storage import mask
from loopsearch.testing import TINY_RECIPE

torch.set_num_threads(1)
PG_SECRET_URL = "postgresql://postgres:hunter2@127.0.0.1:5432/test"  # trust auth: any password is accepted
ENV1 = {"OMP_NUM_THREADS": "1"}



def recipe(tmp_path: Path, extra: str = "", **top) -> Path:
    """The tiny recipe with top-level keys replaced (budget, n_trials, pruner, sampler) and extra
    [train] lines."""
    text = TINY_RECIPE
    for key, value in top.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        text = "\n".join([f"{key} = {json.dumps(value)}"] + lines)
    path = tmp_path / f"recipe-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text.replace("[train]\n", "[train]\n" + extra))
    return path


def finished(st: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in st.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# ---- resume: exact, from safetensors ------------------------------------------------------------------
def test_resumed_training_equals_uninterrupted_training(tmp_path):
    """Weights, optimizer, RNG, data position and FLOPs restored: a run interrupted after its first
    checkpoint and resumed ends bit-identical to one that was never interrupted."""
    from loopsearch.data import prepare
    from loopsearch.spec import TrainConfig
    from loopsearch.train import train
    from loopsearch_builtins.corpora import Shakespeare, ShakespeareParams

    data = prepare(Shakespeare(ShakespeareParams()), 300)
    cfg = TrainConfig(batch_size=4, seq_len=32, min_steps=1, eval_points=3, eval_sequences=8)
    loop = (0, 2, {"n_loops": 4, "train_loops": "uniform"})
    ref = train(tiny_model(vocab=data.vocab_size, seq_len=32, loop=loop), data, cfg, 2e9, seed=0, progress=False)

    class Crash(Exception):
        pass

    def crash(gflops, nll):
        raise Crash

    ck = Checkpointer(tmp_path / "state", every=2e8)
    with pytest.raises(Crash):
        train(tiny_model(vocab=data.vocab_size, seq_len=32, loop=loop), data, cfg, 2e9, seed=0, progress=False,
              checkpointer=ck, report=crash)
    saved = ck.saved_spent()
    assert 0 < saved <= ck.progress()["spent"] <= saved + 2e8  # at most one interval since the last save
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["ckpt-00000007", "latest", "progress.json"]
    assert {p.suffix for p in (tmp_path / "state" / "ckpt-00000007").iterdir()} == {".safetensors"}  # no pickles
    resumed = Checkpointer(tmp_path / "state", every=2e8)
    other_init = tiny_model(vocab=data.vocab_size, seq_len=32, loop=loop, seed=5)  # overwritten by the checkpoint
    r = train(other_init, data, cfg, 2e9, seed=0, progress=False, checkpointer=resumed)
    assert resumed.resumed.spent == saved
    assert (r.val_nll, r.final_loss, r.steps, r.train_flops, r.history) == \
           (ref.val_nll, ref.final_loss, ref.steps, ref.train_flops, ref.history)


# ---- limits, leases and retries without training ----------------------------------------------------
def _study(storage, n_running=0, n_complete=0, n_waiting=0):
    st = optuna.create_study(storage=storage, study_name=f"s-{uuid.uuid4().hex[:6]}")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i in range(n_complete):
        st.add_trial(optuna.create_trial(params={"x": i / 10}, distributions=dist, value=1.0,
                                         user_attrs={"train_flops": 1e9}))
    for _ in range(n_waiting):
        st.enqueue_trial({"x": 0.5})
    for _ in range(n_running):
        st.ask()
    return st


def test_claim_lets_the_lower_numbered_trial_win():
    st = _study(optuna.storages.InMemoryStorage(), n_complete=2, n_waiting=1)
    limits = workers.Limits(target=3, study_budget=None, trial_budget=1e9)
    first, second = st.ask(), st.ask()  # the enqueued trial (2), then a new one (3)
    workers.claim(st, first, limits)  # 2 ahead of it: runs
    with pytest.raises(workers.StudyLimitReached, match="reach the study's target of 3"):
        workers.claim(st, second, limits)
    assert second.user_attrs[workers.SURPLUS_ATTR]
    budget = workers.Limits(target=10, study_budget=3.5e9, trial_budget=1e9)  # 2e9 spent + trial 2 + one more
    workers.claim(st, first, budget)
    with pytest.raises(workers.StudyLimitReached, match="study budget"):
        workers.claim(st, second, budget)
    assert workers.decide(st, limits, grace=60) == ("wait", "2 running trials may complete the study")


def test_a_second_baseline_yields_to_the_first():
    """Killing the baseline can queue two: a fresh one from a worker that found none alive, and the
    dead one's retry. Only one may train: the later yields to one finished or alive before it
    (the kill -9 experiment saw two baselines finish in 2 of 4 runs without this)."""
    st = _study(optuna.storages.InMemoryStorage())
    limits = workers.Limits(target=10, study_budget=None, trial_budget=1e9)
    for _ in range(2):
        st.enqueue_trial({"x": 0.5}, user_attrs={BASELINE_ATTR: True})
    first, second = st.ask(), st.ask()
    workers.claim(st, first, limits)  # the first baseline runs
    with pytest.raises(workers.StudyLimitReached, match="baseline trial 0 is running"):
        workers.claim(st, second, limits)
    assert second.user_attrs[workers.SURPLUS_ATTR]
    st.tell(second, state=TrialState.FAIL)
    st.tell(first, 1.0)
    st.enqueue_trial({"x": 0.5}, user_attrs={BASELINE_ATTR: True})  # a third, queued after the first finished
    with pytest.raises(workers.StudyLimitReached, match="baseline trial 0 is complete"):
        workers.claim(st, st.ask(), limits)
    st.enqueue_trial({"x": 0.5}, user_attrs={BASELINE_ATTR: True, studies.CONFIRM_OF_ATTR: 0})
    workers.claim(st, st.ask(), limits)  # retraining the baseline with more seeds is not a second baseline


def test_dead_worker_on_journal_store_is_failed_and_retried_once(tmp_path):
    url = f"journal:{tmp_path / 'j.log'}"
    st = _study(studies.open_storage(url), n_complete=1)
    st.enqueue_trial({"x": 0.25}, user_attrs={studies.RESUME_ATTR: "/some/state", BASELINE_ATTR: True})
    dead = st.ask()
    dead.suggest_float("x", 0, 1)
    st._storage.set_trial_system_attr(dead._trial_id, workers.LEASE_ATTR, time.time() - 100)
    assert workers.fail_stale(st, grace=60) == []  # started just now: datetime_start counts as a lease
    time.sleep(1.1)
    other = optuna.load_study(study_name=st.study_name, storage=studies.open_storage(url))  # a second worker
    assert workers.fail_stale(st, grace=1) == [dead.number]
    assert workers.fail_stale(other, grace=1) == []  # already failed: no second retry
    trials = other.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    retry = trials[-1]
    assert retry.params == {"x": 0.25} and retry.system_attrs["failed_trial"] == dead.number
    assert retry.user_attrs[studies.RESUME_ATTR] == "/some/state" and retry.user_attrs[BASELINE_ATTR]
    live, before = other.ask(), time.time()  # pops the retry
    with workers.lease(live, 0.05):  # the lease thread renews while a trial runs
        time.sleep(0.3)
        lease = other._storage.get_trial(live._trial_id).system_attrs[workers.LEASE_ATTR]
        assert time.time() - 0.2 < lease and lease > before
    assert live.params == {"x": 0.25}


def test_running_trial_without_any_heartbeat_is_failed_after_the_grace_period(tmp_path):
    """A trial left running by a worker killed before its first heartbeat (or by an older version)
    would otherwise hold a place in the study forever: Optuna only fails trials with a stale heartbeat."""
    url = f"sqlite:///{tmp_path / 'z.db'}"
    zombie = optuna.create_study(storage=url, study_name="z").ask()
    zombie.suggest_float("x", 0, 1)
    st = optuna.load_study(study_name="z", storage=studies.open_storage(url, (1, 1), workers.retry_callback()))
    assert workers.fail_stale(st, grace=1) == []
    time.sleep(1.2)
    assert workers.fail_stale(st, grace=1) == [0]
    assert [(t.state, t.params) for t in st.get_trials()] == [(TrialState.FAIL, zombie.params),
                                                              (TrialState.WAITING, zombie.params)]


def test_out_of_memory_fails_the_trial_with_its_reason_and_the_study_goes_on(tiny_recipe, monkeypatch):
    import loopsearch.search.study as study_module

    real_train = study_module.train
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(study_module, "train", flaky)
    studies.create(studies.spec_from_options("oom", "early_middle", str(tiny_recipe), None, None, None, None, 2))
    assert workers.run("oom", progress=False) == 3
    trials = studies.load("oom")[0].get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    failed = trials[0].user_attrs["failed"]
    assert "CUDA out of memory" in failed and "lower batch_size" in failed
    df = leaderboard.frame(studies=["oom"])
    assert "CUDA out of memory" in df.filter(pl.col("state") == "fail")["note"][0]


# ---- multi-fidelity on FLOPs ------------------------------------------------------------------------------
def _total_flops(name: str) -> float:
    return workers.flops_spent(studies.load(name)[0].get_trials())


@pytest.mark.slow
def test_pruning_reduces_total_training_flops(tmp_path, capsys):
    """Same seed, same random sampler (so the same trials in both): the median pruner stops
    weak trials at 1/3 or 2/3 of the budget; pruned trials are on the leaderboard with the FLOPs used."""
    totals = {}
    for pruner in ("none", "median"):
        path = recipe(tmp_path, budget="4.5e9", n_trials=8, sampler="random", pruner=pruner)
        path.write_text(path.read_text().replace("eval_points = 2", "eval_points = 3"))
        studies.create(studies.spec_from_options(pruner, "early_middle", str(path), None, None, None, None, None))
        workers.run(pruner, progress=False)
        totals[pruner] = _total_flops(pruner)
    st = studies.load("median")[0]
    pruned = [t for t in st.get_trials() if t.state == TrialState.PRUNED]
    assert pruned and len(finished(st)) == 8
    assert [t.params for t in st.get_trials()] == [t.params for t in studies.load("none")[0].get_trials()]
    for t in pruned:
        assert 0 < t.user_attrs["train_flops"] < 4.5e9 * 0.7
        assert "pruned by median pruner at" in t.user_attrs["rejected"]
    df = leaderboard.frame(studies=["median"]).filter(pl.col("state") == "pruned")
    assert len(df) == len(pruned) and df["train_flops"].min() > 0 and df["val_nll"].null_count() == len(df)
    saving = 1 - totals["median"] / totals["none"]
    with capsys.disabled():
        print(f"\npruning: {totals['none']:.4g} FLOPs without, {totals['median']:.4g} with the median pruner "
              f"({len(pruned)} of 8 trials pruned): {saving:.1%} fewer training FLOPs")
    assert totals["median"] < totals["none"] * 0.95


def test_pruners_use_gflops_as_their_resource(tmp_path):
    made = {}
    for pruner in ("successive_halving", "hyperband"):
        spec = studies.spec_from_options(pruner, "early_middle", str(recipe(tmp_path, budget="8e9")), None, None,
                                         None, None, None, pruner)
        made[pruner] = studies.make_pruner(spec)
    assert isinstance(made["successive_halving"], optuna.pruners.SuccessiveHalvingPruner)
    assert made["successive_halving"]._min_resource == 4  # first report: 8 GFLOPs / 2 eval points
    assert isinstance(made["hyperband"], optuna.pruners.HyperbandPruner)
    assert (made["hyperband"]._min_resource, made["hyperband"]._max_resource) == (4, 8)
    with pytest.raises(studies.SpecError, match="raise --budget to at least 2e"):  # 1.5 GFLOPs / 2 reports
        studies.spec_from_options("p", "early_middle", str(recipe(tmp_path, budget="1.5e9")), None, None, None, None,
                                  None, "median")


# ---- multi-objective ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_multi_objective_study_uses_nsga2_and_shows_its_pareto_front(tmp_path):
    path = recipe(tmp_path, n_trials=4)
    path.write_text(path.read_text() + '\n[objective]\nmetrics = ["val_nll", "inference_flops"]\n')
    spec = studies.spec_from_options("mo", "early_middle", str(path), None, None, None, None, None)
    assert spec.optuna_sampler == "auto" and isinstance(studies.make_sampler(spec), optuna.samplers.NSGAIISampler)
    studies.create(spec)
    workers.run("mo", progress=False)
    st = studies.load("mo")[0]
    assert [d.name for d in st.directions] == ["MINIMIZE", "MINIMIZE"]
    for t in finished(st):
        assert t.values == [t.user_attrs["val_nll"], t.user_attrs["inference_flops_per_token"]]
    front = {t.number for t in st.best_trials}
    assert 0 in front  # the no-loop baseline has the fewest inference FLOPs
    df = leaderboard.pareto(leaderboard.frame(studies=["mo"]))
    assert set(df["trial"].to_list()) == front
    r = run_cli("leaderboard", "--study", "mo", "--pareto", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert {row["trial"] for row in json.loads(r.stdout)} == front
    with pytest.raises(studies.SpecError, match="sampler 'cmaes' cannot optimise several objectives"):
        studies.spec_from_options("mo2", "early_middle", str(path), None, None, None, "cmaes", None)


# ---- many workers -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_workers_on_postgresql_complete_exactly_n_trials(pg, tmp_path):
    name = f"pg-w-{uuid.uuid4().hex[:8]}"
    path = recipe(tmp_path, n_trials=6)
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(path), "--name", name,
                "--storage", PG_SECRET_URL)
    assert r.returncode == 0, r.stderr
    st = optuna.load_study(study_name=name, storage=pg)
    enqueued = [{"strategy": "fixed", "fixed.n_loops": n, "fixed.train_loops": "constant", "block_length": b,
                 "loop_start": s} for b, s, n in ((1, 0, 2), (1, 1, 3), (2, 0, 4))]
    for params in enqueued:
        st.enqueue_trial(params)
    try:
        r = run_cli("study", "run", name, "--workers", "3", "--heartbeat", "1", "--grace", "8",
                    "--storage", PG_SECRET_URL, env=ENV1, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "hunter2" not in r.stdout + r.stderr
        trials = st.get_trials()
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 6
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        done = finished(st)
        assert sum(bool(t.user_attrs.get(BASELINE_ATTR)) for t in done) == 1
        for params in enqueued:  # every enqueued parameter set ran exactly once
            assert sum(t.params == params for t in done) == 1, params
        assert len({t.user_attrs["worker"] for t in done}) >= 2  # the work was shared
        # the study budget holds across workers: room for exactly one more trial
        spent = workers.flops_spent(trials)
        budget = spent + 1.5 * 3e9
        r = run_cli("study", "run", name, "--workers", "2", "--n-trials", "5", "--study-budget", f"{budget:.6g}",
                    "--heartbeat", "1", env={**ENV1, "LOOPSEARCH_STORAGE": PG_SECRET_URL}, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "study budget" in r.stdout and "hunter2" not in r.stdout + r.stderr
        trials = st.get_trials()
        assert workers.flops_spent(trials) <= budget
        trained = [t for t in finished(st)[6:] if t.user_attrs.get("train_flops", 0) > 0]
        assert len(trained) == 1  # trials rejected before training (min_steps) cost nothing
    finally:
        optuna.delete_study(study_name=name, storage=pg)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_worker_killed_mid_trial_is_retried_from_its_checkpoint(pg, tmp_path):
    """Two workers; one is killed with SIGKILL after its trial saved a checkpoint. The other
    fails the silent trial after the grace period, runs its retry from the checkpoint, and the
    study completes all its trials. FLOPs lost <= one checkpoint interval."""
    name = f"pg-kill-{uuid.uuid4().hex[:8]}"
    every = 2e9
    path = recipe(tmp_path, budget="1.6e10", n_trials=3, extra=f"checkpoint_every = {every}\n")
    studies.create(studies.spec_from_options(name, "early_middle", str(path), None, None, None, None, None), pg)
    # two distinct looped configurations after the baseline: a retry whose configuration another trial
    # finished meanwhile reuses that result instead of resuming (it failed this test once, 2026-12-02)
    for n_loops in (2, 3):
        manage.enqueue(name, {"strategy": "fixed", "fixed.n_loops": n_loops, "fixed.train_loops": "constant",
                              "block_length": 1, "loop_start": 1}, pg)
    env = {**os.environ, **ENV1, "LOOPSEARCH_STORAGE": pg}
    cmd = [sys.executable, "-m", "loopsearch", "study", "run", name, "--no-progress", "--heartbeat", "1",
           "--grace", "4"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    st = optuna.load_study(study_name=name, storage=pg)
    try:
        def mid_interval_trial():  # a running trial half way between two checkpoints
            for t in st.get_trials(states=(TrialState.RUNNING,)):
                ck = Checkpointer(t.user_attrs.get(studies.RESUME_ATTR, "/nonexistent"), every)
                saved, progress = ck.saved_spent(), ck.progress()
                if saved and progress and progress["spent"] > saved + every / 3 and "worker" in t.user_attrs:
                    return t, ck.dir
            return None

        victim, state_dir = _wait_for(mid_interval_trial, 120, "a running trial between two checkpoints")
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        seen = Checkpointer(state_dir, every).saved_spent()
        os.kill(pid, signal.SIGKILL)
        killed = next(p for p in procs if p.pid == pid)
        killed.wait(timeout=30)
        at_death = Checkpointer(state_dir, every).progress()["spent"]
        survivor = next(p for p in procs if p.pid != pid)
        out, _ = survivor.communicate(timeout=300)
        assert survivor.returncode == 0, out
        trials = st.get_trials()
        assert len(finished(st)) == 3, [(t.number, t.state) for t in trials]
        dead = next(t for t in trials if t.number == victim.number)
        assert dead.state == TrialState.FAIL
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
        a = retry.user_attrs
        assert retry.state == TrialState.COMPLETE and retry.params == victim.params
        rows = [(t.number, t.state.name, bool(t.user_attrs.get(BASELINE_ATTR)), t.system_attrs.get("failed_trial"))
                for t in trials]
        why = (f"victim {victim.number} (baseline {bool(victim.user_attrs.get(BASELINE_ATTR))}), retry {retry.number}; "
               f"trials {rows}; state dir now "
               f"{sorted(p.name for p in state_dir.iterdir()) if state_dir.exists() else 'gone'}")
        assert a[studies.RESUME_ATTR] == str(state_dir) and "loopsearch.resume_from" in a, why
        assert a["loopsearch.resume_from"].startswith(str(state_dir))
        assert seen <= a["resumed_from_flops"] <= at_death
        assert a["flops_lost"] == pytest.approx(at_death - a["resumed_from_flops"])
        assert 0 < a["flops_lost"] <= every  # lost at most one checkpoint interval
        assert a["train_flops"] <= 1.6e10 and a["steps"] > 0
        assert set(dead.intermediate_values) <= set(retry.intermediate_values)  # inherited
        assert not state_dir.exists()  # the finished retry removed the training state
        print(f"\nkill test: checkpoint every {every:.3g} FLOPs; the retry of trial {victim.number} resumed at "
              f"{a['resumed_from_flops']:.3g} FLOPs, {a['flops_lost']:.3g} FLOPs lost")
        df = leaderboard.frame(pg, [name])
        notes = dict(zip(df["trial"].to_list(), df["note"].to_list()))
        assert f"retried as trial {retry.number}" in notes[victim.number]
        assert "resumed trial" in notes[retry.number]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        optuna.delete_study(study_name=name, storage=pg)


@pytest.mark.slow
def test_four_workers_on_the_journal_file_store(tiny_recipe, tmp_path):
    """--workers 4 on a SQLite file: the workers run on a journal file beside it, nothing is locked,
    nothing is lost, and the study is back in the SQLite file afterwards."""
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "j",
                "--n-trials", "6")
    assert r.returncode == 0, r.stderr
    r = run_cli("study", "run", "j", "--workers", "4", "--heartbeat", "1", env=ENV1, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "locked" not in out.lower() and "Traceback" not in out
    assert "journal file" in out and "workers exited with [0, 0, 0, 0]" in out
    st = studies.load("j")[0]  # the SQLite study, copied back
    trials = st.get_trials()
    assert len(finished(st)) == 6 and not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(Path(t.user_attrs["checkpoint"], "model.safetensors").is_file() for t in finished(st)
               if t.state == TrialState.COMPLETE)
    assert all(t.user_attrs.get(workers.SURPLUS_ATTR) for t in trials if t.state == TrialState.FAIL)
    assert not list(tmp_path.glob("*.journal*"))  # the journal file is gone once the study is copied back


# ---- data parallel --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_with_two_gloo_processes_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m loopsearch study run` (gloo, CPU): rank 0 runs the Optuna
    trials, each on half of every global batch; the loss curve (val NLL at 4 FLOP points, the last
    training loss) and the FLOPs match one process with the same global batch."""
    # fp32 eager in both: DDP is never probed (fp32), while one process with precision = "auto" may
    # pick bf16 on a CPU with bf16 units (the fresh-clone run on an AMX Xeon did: 2.5e-4 apart)
    path = recipe(tmp_path, n_trials=2, extra='precision = "fp32"\ncompile = false\n')
    path.write_text(path.read_text().replace("eval_points = 2", "eval_points = 4"))
    for name in ("ddp", "one"):
        studies.create(studies.spec_from_options(name, "early_middle", str(path), None, None, None, None, None))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(29500 + os.getpid() % 1000), "-m", "loopsearch", "study", "run", "ddp", "--no-progress",
                        "--threads", "1"],  # as this process
                       env={**os.environ, **ENV1}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    workers.run("one", progress=False)
    ddp, one = (studies.load(name)[0].get_trials() for name in ("ddp", "one"))
    assert [t.state for t in ddp] == [TrialState.COMPLETE] * 2 and ddp[1].params == one[1].params
    for a, b in zip(one, ddp):
        curve_a, curve_b = a.user_attrs["history"], b.user_attrs["history"]  # (FLOPs spent, val NLL, its SE)
        assert len(curve_a) == 4 and [h[0] for h in curve_a] == [h[0] for h in curve_b]
        assert [h[1] for h in curve_b] == pytest.approx([h[1] for h in curve_a], abs=1e-4)
        for key in ("steps", "train_flops"):
            assert a.user_attrs[key] == b.user_attrs[key]
        assert b.user_attrs["final_loss"] == pytest.approx(a.user_attrs["final_loss"], abs=1e-4)


# ---- security ---------------------------------------------------------------------------------------------------
def test_mask_hides_passwords_everywhere():
    assert mask("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask("postgresql+psycopg://u:p%40ss@h/db?sslmode=require") == "postgresql+psycopg://u:***@h/db?sslmode=require"
    assert mask("postgresql://h/db?user=u&password=s3cret") == "postgresql://h/db?user=u&password=***"
    assert (mask("error: cannot open postgresql://u:s3cret@h/db: refused")
            == "error: cannot open postgresql://u:***@h/db: refused")


@pytest.mark.slow
def test_password_never_printed_by_the_cli(pg, tiny_recipe):
    name = f"pg-sec-{uuid.uuid4().hex[:8]}"
    env = {"LOOPSEARCH_STORAGE": PG_SECRET_URL}
    outputs = []
    studies.create(studies.spec_from_options(name, "early_middle", str(tiny_recipe), None, None, None, None, None),
                   PG_SECRET_URL)
    try:
        for args in (("study", "show", name), ("leaderboard", "--study", name), ("study", "run", "no-such-study")):
            r = run_cli(*args, env=env)
            outputs.append(r.stdout + r.stderr)
        r = run_cli("study", "list", "--storage", "postgresql://postgres:hunter2@127.0.0.1:1/none")
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 2 and "postgres:***@127.0.0.1:1" in r.stderr
    finally:
        optuna.delete_study(study_name=name, storage=pg)
    assert name in outputs[0] and "unknown study 'no-such-study' in postgresql://postgres:***@" in outputs[2]
    assert not [o for o in outputs if "hunter2" in o]


def test_checkpoints_are_never_unpickled():
    """Weights and training states are read through safetensors (and JSON) only."""
    package = Path(studies.__file__).parent
    for path in [*package.glob("*.py"), *package.parent.joinpath("plugins").glob("*.py")]:
        for line in path.read_text().splitlines():
            assert "import pickle" not in line and "pickle.load" not in line, (path, line)
            assert "torch.load(" not in line or "weights_only=True" in line, (path, line)


def test_a_lost_baseline_is_enqueued_again_and_the_study_is_not_done_without_it(tiny_recipe):
    """The baseline killed (failed) every time it ran and the target reached by other trials: the
    next decision enqueues it again and runs it past the target; the study never ends without one."""
    from optuna.trial import TrialState, create_trial

    from loopsearch.search.space import BASELINE_ATTR

    studies.create(studies.spec_from_options("lost", "early_middle", str(tiny_recipe), None, None, None, None, 2))
    st, _ = studies.load("lost")
    for _ in range(4):  # killed four times: each time failed, nothing waiting any more
        t = st.ask()
        assert t.user_attrs.get(BASELINE_ATTR)
        st.tell(t, state=TrialState.FAIL)
        studies.ensure_baseline(st)
    st.ask()  # the fifth enqueued baseline is taken and failed too
    st.tell(st.trials[-1].number, state=TrialState.FAIL)
    for value in (4.0, 4.1):  # the target (2 trials) is reached by looped trials
        st.add_trial(create_trial(state=TrialState.COMPLETE, value=value, user_attrs={"strategy": "fixed"}))
    assert not any(t.user_attrs.get(BASELINE_ATTR) and t.state == TrialState.WAITING for t in st.get_trials())
    workers.run("lost", progress=False)
    st, _ = studies.load("lost")
    base = [t for t in st.get_trials() if t.user_attrs.get(BASELINE_ATTR) and t.state == TrialState.COMPLETE]
    assert len(base) == 1 and base[0].user_attrs.get("strategy") == "none"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_workers_parent_reaches_every_worker_at_once(tiny_recipe, sig):
    """What `timeout`, systemd, SLURM and Kubernetes send (SIGTERM), or a `kill -INT` of the parent:
    the parent forwards it to its workers, which stop at their next safe point and mark their
    trials failed (state kept for the rerun); no trial is left RUNNING, the exit status is non-zero."""
    assert run_cli("study", "create", "--space", "early_middle", "--recipe", str(tiny_recipe), "--name", "sig",
                   "--n-trials", "30").returncode == 0
    storage = os.environ["LOOPSEARCH_STORAGE"]
    proc = subprocess.Popen([sys.executable, "-m", "loopsearch", "study", "run", "sig", "--workers", "2",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    journal = storage.replace("sqlite:///", "").replace(".db", ".journal")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(journal) and os.path.getsize(journal) > 2000):
        time.sleep(0.2)  # the workers run on the journal file copied from SQLite
    time.sleep(3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continues it" in err and "Traceback" not in err
    trials = optuna.load_study(study_name="sig", storage=storage).get_trials()
    assert trials and "RUNNING" not in [t.state.name for t in trials]
    assert sum(t.state.name == "COMPLETE" for t in trials) < 30  # stopped early, not run to the end


def test_threads_follow_the_free_cores(monkeypatch):
    """Issue 15: two torch threads per process collapse when another process competes; the default
    takes the cores that are free (by the load average) and shares them among workers."""
    monkeypatch.setattr(workers, "cores", lambda: 2)
    assert workers.worker_threads(1, load=0.1) == 2  # quiet: both cores
    assert workers.worker_threads(1, load=1.0) == 1  # one competing process: one thread
    assert workers.worker_threads(1, load=3.5) == 1  # very busy: never below 1
    assert workers.worker_threads(2, load=0.0) == 1  # two workers share two cores
    monkeypatch.setattr(workers, "cores", lambda: 16)
    assert workers.worker_threads(1, load=4.0) == 12 and workers.worker_threads(4, load=4.0) == 3


def test_the_stale_watcher_fails_a_dead_trial_while_this_worker_is_busy(tmp_path):
    """A worker inside a long trial of its own still fails a dead worker's trial within about a
    grace period (a watcher thread), not only between its own trials (issue 14)."""
    store = studies.open_storage(f"journal:{tmp_path / 'watch.journal'}")
    study = optuna.create_study(study_name="watch", storage=store)
    dead = study.ask()  # RUNNING, and nobody renews its lease: its worker died
    dead.suggest_int("x", 0, 3)
    began = time.time()
    with workers.stale_watcher(study, grace=1.0, interval=0.2):
        trial = _wait_for(lambda: next((t for t in study.get_trials() if t.number == dead.number
                                        and t.state == TrialState.FAIL), None), 15, "the dead trial failed")
    assert time.time() - began < 10
    retry = study.get_trials()[-1]
    assert trial.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == {"x": dead.params["x"]} and retry.system_attrs["failed_trial"] == dead.number


@pytest.mark.slow
def test_a_stalled_worker_abandons_its_trial_to_the_retry(tmp_path):
    """A worker stopped (SIGSTOP) for longer than --grace has its trial failed and retried by
    another worker; when it wakes up it abandons the trial cleanly (one line, exit 0) instead of
    crashing on the finished trial or writing into the retry's directory (issue 14)."""
    url = f"journal:{tmp_path / 'stall.journal'}"
    path = recipe(tmp_path, budget="3e10", n_trials=1)
    r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(path), "--name", "stall",
                "--storage", url)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, **ENV1, "LOOPSEARCH_STORAGE": url}
    run = [sys.executable, "-m", "loopsearch", "study", "run", "stall", "--no-progress", "--heartbeat", "1",
           "--grace", "3", "--n-trials", "1"]
    a = subprocess.Popen(run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    st = optuna.load_study(study_name="stall", storage=studies.open_storage(url))
    try:
        _wait_for(lambda: any(t.state == TrialState.RUNNING for t in st.get_trials()), 120, "a running trial")
        time.sleep(1.0)
        a.send_signal(signal.SIGSTOP)
        time.sleep(5.0)  # longer than --grace 3: the trial's lease is stale now
        b = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stderr
    finally:
        a.send_signal(signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "abandoned a trial that another worker took over" in out + err
    trials = st.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["retry_history"] == [0]


# ---- past one database: Optuna's gRPC storage proxy --------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_storage_url_errors_are_one_line(tmp_path):
    pytest.importorskip("grpc")
    r = run_cli("study", "list", "--storage", "grpc://127.0.0.1:notaport", cwd=tmp_path)
    assert r.returncode != 0 and "grpc://HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    port = _free_port()  # nothing listens there
    r = run_cli("study", "list", "--storage", f"grpc://127.0.0.1:{port}", cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "no storage proxy answers" in r.stderr and "proxy serve" in r.stderr
    r = run_cli("proxy", "serve", "--storage", f"grpc://127.0.0.1:{port}", cwd=tmp_path)
    assert r.returncode != 0 and "itself a proxy" in r.stderr


@pytest.mark.slow
def test_eight_workers_through_the_grpc_proxy_survive_kill_9(pg, tmp_path):
    """Issue 14 item 8: `loopsearch proxy serve` in front of PostgreSQL, 8 worker processes on
    --storage grpc://, two of them killed with SIGKILL mid-trial. The lease (Optuna's heartbeat does
    not pass through the proxy) fails their trials, the survivors retry them, and the study ends
    with exactly n_trials finished, one baseline, nothing stuck and nothing run twice."""
    pytest.importorskip("grpc")
    port = _free_port()
    url = f"grpc://127.0.0.1:{port}"
    env = {**os.environ, **ENV1}
    env.pop("LOOPSEARCH_STORAGE", None)
    proxy = subprocess.Popen([sys.executable, "-m", "loopsearch", "proxy", "serve", "--storage", pg,
                              "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    name = f"grpc-{uuid.uuid4().hex[:8]}"
    n_trials = 12
    procs: list[subprocess.Popen] = []
    try:
        path = recipe(tmp_path, budget="6e9", n_trials=n_trials, extra="checkpoint_every = 1.5e9\n")
        r = run_cli("study", "create", "--space", "early_middle", "--recipe", str(path), "--name", name,
                    "--storage", url, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr + proxy_output(proxy)
        cmd = [sys.executable, "-m", "loopsearch", "study", "run", name, "--no-progress", "--heartbeat", "1",
               "--grace", "4", "--storage", url]
        procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(8)]
        pids = {p.pid for p in procs}
        st = optuna.load_study(study_name=name, storage=pg)
        killed: dict[int, int] = {}  # pid -> the trial it was running

        def running_victim():
            for t in st.get_trials(states=(TrialState.RUNNING,)):
                pid = int(t.user_attrs.get("worker", "x:0").rsplit(":", 1)[1])
                if pid in pids and pid not in killed and t.number not in killed.values():
                    return pid, t.number
            return None

        for _ in range(2):
            pid, number = _wait_for(running_victim, 240, "a running trial to kill")
            os.kill(pid, signal.SIGKILL)
            killed[pid] = number
        outs = {p.pid: p.communicate(timeout=480)[0] for p in procs}
        for p in procs:
            if p.pid not in killed:
                assert p.returncode == 0, outs[p.pid]
        trials = st.get_trials()
        done = finished(st)
        assert len(done) == n_trials, [(t.number, t.state.name) for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        assert sum(bool(t.user_attrs.get(BASELINE_ATTR)) for t in done) == 1
        for number in killed.values():
            dead = trials[number]
            assert dead.state == TrialState.FAIL
            retries = [t for t in done if t.system_attrs.get("failed_trial") == number]
            assert len(retries) == 1  # retried once, nothing duplicated
            # the same configuration (a worker killed while its trial was still being sampled left only the
            # first parameters: the retry keeps them and samples the rest)
            assert dead.params.items() <= retries[0].params.items()
        assert len({t.user_attrs["worker"] for t in done}) >= 4  # the work was shared
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        proxy.terminate()
        proxy.wait(timeout=30)
        try:
            optuna.delete_study(study_name=name, storage=pg)
        except KeyError:
            pass


def proxy_output(proxy: subprocess.Popen) -> str:
    if proxy.poll() is None:
        return ""
    return "\nproxy: " + (proxy.stdout.read() if proxy.stdout else "")
