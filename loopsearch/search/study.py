"""The Optuna glue: a study spec stored in the study, and the objective
(suggest -> build -> train under the FLOP budget -> evaluate -> save -> report).

Everything a worker needs is in the study's user attributes (``loopsearch.spec``, plain JSON),
so ``loopsearch study run NAME`` needs nothing but the storage. Every trial of a study uses
the study's seed: trials see the same data order and the same validation masks (a paired
comparison), and differ only in what was searched.
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.metadata as md
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from .. import checkpoint, interrupt
from ..data import prepare
from ..errors import BudgetError, LoopsearchError, SpecError, StudyNotFoundError
from ..eval import metrics
from ..eval.reference import ReferenceConfig
from ..registry import get_registry
from ..resume import Checkpointer, TrialTakenOver
from ..sampling import get_sampler, parse_loop_schedule
from ..spec import MULTI_OBJECTIVE_SAMPLERS, SearchSpace, StudyRecipe, StudySpec, TrialConfig, TrainConfig, validate
from ..stats import mean_interval
from ..tasks import get_task
from ..train import TrainResult, check_memory, distributed, plan_steps, train
from ..units import format_flops
from .record import TrialRecord
from .space import BASELINE, BASELINE_ATTR, Choice, check_space, load_recipe, load_space, suggest
from .storage import mask, open_storage, storage_url

SPEC_ATTR = "loopsearch.spec"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _drop_interrupt_tracebacks(record) -> bool:
    """Ctrl-C is not a failure worth a traceback: the CLI says what happened in one line (so does a
    worker that abandons a trial a retry took over). Optuna's
    "Trial N failed with value None." follows every exception (the real ones are logged with their
    error anyway) and would precede that line on an interrupt: it is dropped too."""
    quiet = (KeyboardInterrupt, UpdateFinishedTrialError, TrialTakenOver)
    if record.exc_info and issubclass(record.exc_info[0], quiet):
        return False  # an interrupt, or a trial a retry took over from a stalled worker: said in one line
    return not str(record.getMessage()).endswith("failed with value None.")


for _handler in optuna.logging.get_logger("optuna").handlers:  # filters on handlers see child loggers' records
    _handler.addFilter(_drop_interrupt_tracebacks)


# ---- names and paths ------------------------------------------------------------------------------
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_name(name: str) -> str:
    """A study name is also a directory name: letters, digits, '.', '_' and '-', starting with a
    letter or digit, at most 100 characters."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        shown = name if len(str(name)) <= 60 else f"{str(name)[:57]}..."
        raise SpecError(f"study name {shown!r} is not allowed; use 1-100 letters, digits, '.', '_' or '-', starting "
                        f"with a letter or digit (no '..', '/' or spaces), e.g. --name em-2tflop")
    return name


def artifacts_root(spec: StudySpec) -> Path:
    """Where a study's checkpoints go: ARTIFACTS_DIR/STUDY (the name checked again: stored specs are
    read back from a database)."""
    return (Path(spec.artifacts_dir) / check_name(spec.name)).resolve()


def inside(path: Path, root: Path) -> Path:
    """``path`` resolved, if it lies inside ``root``; a LoopsearchError otherwise."""
    resolved = Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise LoopsearchError(f"refusing to use {resolved}: it is outside the study's directory {root}")
    return resolved


# ---- specs -------------------------------------------------------------------------------------
def make_spec(recipe: StudyRecipe, name: str, space: str | SearchSpace | None = None) -> StudySpec:
    """Resolve a recipe into a full, checked StudySpec (space file contents, versions); ``space``
    (a name, a path or a SearchSpace) replaces the recipe's."""
    check_name(name)
    reg = get_registry()
    space_src = space.name if isinstance(space, SearchSpace) else (space or recipe.space)
    resolved = space if isinstance(space, SearchSpace) else load_space(space_src, reg)
    data = recipe.model_dump()
    data.update(name=name, space=resolved.model_dump(), versions={})
    spec = validate(StudySpec, data, f"study {name!r}")
    # a relative checkpoint folder is resolved where the study is created and stored absolute: later
    # commands run from another directory (evaluate, the reference LM, resumes) find the same files
    spec.artifacts_dir = str(Path(spec.artifacts_dir).expanduser().resolve())
    # store every parameter explicitly: the spec then says exactly what was trained
    spec.backbone.params = reg.params("backbone", spec.backbone.name, spec.backbone.params,
                                      f"study {name!r}").model_dump()
    spec.corpus.params = reg.params("corpus", spec.corpus.name, spec.corpus.params, f"study {name!r}").model_dump()
    if spec.seeds is not None:  # the recipe's (or --seeds) replicates override the space's
        spec.space.seeds = spec.seeds
    spec.seeds = spec.space.seeds
    check_space(spec.space, spec.backbone.name, spec.backbone.params, f"search space {space_src!r}", reg)
    if spec.space.arms:  # a grid: the study is done when every arm ran at every budget and seed
        spec.n_trials = len(spec.space.grid())
    check_budget(spec)
    check_objective(spec)
    check_pruner(spec)
    spec.versions = versions(spec)
    return spec


def check_objective(spec: StudySpec) -> None:
    """Fail at creation, not after the first trial's training, on a bad objective setting."""
    obj = spec.objective
    if obj.metrics == ["val_nll"]:
        return
    if obj.multi and spec.optuna_sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise SpecError(f"study {spec.name!r}: sampler {spec.optuna_sampler!r} cannot optimise several objectives "
                        f"{obj.metrics}; use sampler \"auto\" (NSGA-II) or one of "
                        f"{', '.join(MULTI_OBJECTIVE_SAMPLERS[1:])}")
    where = f"study {spec.name!r}: [objective]"
    if {"gen_ppl", "task_accuracy"} & set(obj.metrics):
        get_sampler(obj.sampler.name, obj.sampler.params)
        if obj.loops:
            parse_loop_schedule(obj.loops)
    if "task_accuracy" in obj.metrics:
        get_task(obj.task.name, obj.task.params)
    if "zeroshot_bpb" in obj.metrics and not Path(obj.zeroshot).is_file():
        raise SpecError(f"{where} zeroshot = {obj.zeroshot!r} is not a file; give the path of a text file "
                        f"(e.g. ../shared/data/wikitext-2/wiki.test.raw)")
    if "gen_ppl" in obj.metrics:
        validate(ReferenceConfig, obj.reference, f"{where} reference")
    if spec.pruner != "none" and obj.metrics != ["val_nll"]:
        raise SpecError(f"{where} pruner {spec.pruner!r} compares val NLL during training, but the objective is "
                        f"{obj.metrics}; set pruner = \"none\" or metrics = [\"val_nll\"]")


def check_pruner(spec: StudySpec) -> None:
    """Pruners compare val NLL at equal GFLOPs: each of the eval_points reports needs its own
    whole GFLOP, or reports share a step and the pruner compares nothing."""
    if spec.pruner == "none":
        return
    gap = spec.budget / spec.train.eval_points
    if gap < 1e9:
        raise SpecError(f"study {spec.name!r}: pruner {spec.pruner!r} compares val NLL every budget / eval_points = "
                        f"{format_flops(gap)}, below the 1 GFLOP step of the reports; raise --budget to at least "
                        f"{spec.train.eval_points * 1e9:.3g} or lower [train] eval_points")
    if spec.train.eval_points < 2:
        raise SpecError(f"study {spec.name!r}: pruner {spec.pruner!r} needs intermediate reports; "
                        f"set [train] eval_points >= 2 (it is {spec.train.eval_points})")


def versions(spec: StudySpec) -> dict[str, str]:
    reg = get_registry()
    used = [reg.items("backbone")[spec.backbone.name], reg.items("corpus")[spec.corpus.name]]
    used += [reg.items("loop_strategy")[s] for s in spec.space.used_strategies()]
    out = {info.distribution: info.version for info in used}
    for dist in ("loopsearch", "torch", "optuna"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def trial_config(spec: StudySpec, number: int, choice: Choice) -> TrialConfig:
    train_cfg = validate(TrainConfig, {**spec.train.model_dump(), **choice.train}, f"trial {number} train config")
    return TrialConfig(
        study=spec.name, trial=number,
        backbone={"name": spec.backbone.name, "params": {**spec.backbone.params, **choice.backbone}},
        strategy={"name": choice.strategy, "params": choice.strategy_params},
        loop_start=choice.loop_start, loop_end=choice.loop_end, corpus=spec.corpus,
        vocab_size=spec.vocab_size, train=train_cfg, budget=spec.budget * choice.budget_scale,
        seed=spec.seed + choice.seed_offset, eval_seed=spec.seed,
    )


def _config_key(config: TrialConfig) -> str:
    """What a trial trains, without its identity (study, trial number): equal keys, equal runs."""
    data = config.model_dump(mode="json")
    data.pop("trial", None)
    data.pop("study", None)
    return json.dumps(data, sort_keys=True)


def meta_model(config: TrialConfig, vocab_size: int | None = None):
    """The model a config describes, without weights (for FLOP planning)."""
    with torch.device("meta"):
        return checkpoint.build_model(config, vocab_size or config.vocab_size)


def check_budget(spec: StudySpec) -> None:
    """The baseline must afford ``min_steps`` steps: otherwise no trial of the study can run."""
    cfg = trial_config(spec, -1, BASELINE)
    model = meta_model(cfg)
    if spec.train.device in ("auto", "cpu"):  # a GPU named in the spec may be on the workers, not here
        check_memory(model, cfg.train)  # a model that cannot fit is refused before anything is allocated
    steps = plan_steps(model, cfg.train, spec.budget)  # raises below one step
    if steps < spec.train.min_steps:
        step = model.train_step_flops(cfg.train.seq_len, cfg.train.batch_size, 1)
        raise BudgetError(
            f"budget {format_flops(spec.budget)} buys only {steps} steps of the no-loop baseline "
            f"(min_steps = {spec.train.min_steps}); raise --budget to at least {step * spec.train.min_steps:.3g}")


def counted(t: optuna.trial.FrozenTrial) -> bool:
    """A finished trial that counts towards the study's n_trials (confirmation runs do not)."""
    return t.state in FINISHED and t.user_attrs.get(CONFIRM_OF_ATTR) is None


def trial_budget(spec: StudySpec) -> float:
    """The training FLOPs one trial may spend: the budget (at its largest scale) times the seeds
    it trains (a search trains every seed in one trial; an arms grid one seed per trial)."""
    if spec.space.arms:
        return spec.budget * max(spec.space.budget_scales)
    return spec.budget * spec.space.seeds


# ---- storage-level helpers ------------------------------------------------------------------------
def study_names(storage: str | None = None) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(open_storage(storage), include_best_trial=False)]


def load(name: str, storage: str | None = None,
         store: optuna.storages.BaseStorage | None = None) -> tuple[optuna.Study, StudySpec]:
    """A stored study and its spec; ``store`` (already opened from ``storage``) is used if given."""
    store = store or open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]
    if name not in names:
        raise StudyNotFoundError(name, names, mask(storage_url(storage)))
    study = optuna.load_study(study_name=name, storage=store)
    raw = study.user_attrs.get(SPEC_ATTR)
    if raw is None:
        raise LoopsearchError(f"study {name!r} was not created by loopsearch (no {SPEC_ATTR} attribute); "
                              f"create one with `loopsearch study create`")
    return study, StudySpec.model_validate(raw)


def latest_study(storage: str | None = None) -> str:
    names = study_names(storage)
    if not names:
        raise LoopsearchError(f"no studies in {mask(storage_url(storage))}; create one with "
                              f"`loopsearch study create --space early_middle`")
    return names[-1]


def make_sampler(spec: StudySpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler. ``auto``: TPE, or NSGA-II when the study has several objectives
    (population: a quarter of the trials, 4 to 50). ``offset`` varies the seed: a resumed study,
    or another worker, must not replay the same random draws."""
    seed = spec.seed + offset
    name = spec.optuna_sampler
    if name == "auto":
        name = "nsga2" if spec.objective.multi else "tpe"
    return {
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, spec.n_trials // 4))),
        # constant liar: parallel workers do not all propose the point that looks best right now
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, constant_liar=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
    }[name]()


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Pruners compare val NLL at equal training FLOPs: intermediate values are keyed by the
    nominal GFLOPs of ``eval_points`` equal fractions of the budget (the same steps for every trial). Successive halving
    and Hyperband use GFLOPs as their resource: the first rung is the first report
    (budget / eval_points), the last the whole budget, reduction factor 3."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    first = max(1, int(spec.budget / spec.train.eval_points // 1e9))
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max(first, int(spec.budget // 1e9)),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


MIN_CORPUS_BYTES = 1000  # below this a text corpus cannot fill training windows and a validation split


def check_text_corpus(spec: StudySpec) -> None:
    """A text-file corpus (``--corpus FILE``, corpus ``text``) that is empty, binary or tiny fails
    at create, in one line, not as failed trials later."""
    if spec.corpus.name != "text":
        return
    for split in ("train", "valid"):
        path = spec.corpus.params.get(split)
        if not path:
            continue
        file = Path(path)
        if not file.is_file():
            raise LoopsearchError(f"corpus {split} file {file} not found; pass an existing text file")
        head = file.read_bytes()[: 1 << 20]
        size = file.stat().st_size
        if size == 0:
            raise LoopsearchError(f"corpus {split} file {file} is empty; give it text")
        try:  # the first MiB, strictly (a character cut at its end is not an error)
            if b"\0" in head:
                raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
            codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= len(head))
        except UnicodeDecodeError:
            raise LoopsearchError(f"corpus {split} file {file} is not UTF-8 text (binary data?); pass a text "
                                  f"file") from None
        if split == "train" and size < MIN_CORPUS_BYTES:
            raise LoopsearchError(f"corpus {split} file {file} has only {size} bytes; a corpus needs at least "
                                  f"{MIN_CORPUS_BYTES:,} bytes of text (training windows and a validation split)")


def create(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    check_text_corpus(spec)
    store = open_storage(storage)
    if spec.name in [s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)]:
        raise LoopsearchError(f"study {spec.name!r} already exists in {mask(storage_url(storage))}; "
                              f"pick another --name or run it with `loopsearch study run {spec.name}`")
    study = optuna.create_study(storage=store, study_name=spec.name, directions=spec.objective.directions,
                                sampler=make_sampler(spec), pruner=make_pruner(spec))
    study.set_user_attr(SPEC_ATTR, spec.model_dump(mode="json"))
    with warnings.catch_warnings():  # "experimental" in Optuna 4-5; stable enough for a label
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objective.metrics))  # optuna-dashboard shows "val_nll", not "Objective 0"
    ensure_baseline(study)
    return study


def check_artifacts_writable(spec: StudySpec) -> Path:
    """Fail before any training when the study's checkpoint folder cannot be written (a trial would
    otherwise train to the end and die saving): one line naming the folder and the fix."""
    import os
    import tempfile

    root = artifacts_root(spec)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise LoopsearchError(f"cannot write checkpoints to {root} ({exc.strerror or exc}); make it writable, or set "
                              f"artifacts_dir in the recipe to a writable folder") from None
    if not os.access(root, os.W_OK):
        raise LoopsearchError(f"cannot write checkpoints to {root}; make it writable or set artifacts_dir")
    return root


def ensure_baseline(study: optuna.Study) -> None:
    """Enqueue the no-loop baseline unless one is finished, waiting or running (in a space of
    arms: every grid point that is not)."""
    space = StudySpec.model_validate(study.user_attrs[SPEC_ATTR]).space
    if space.arms:
        return ensure_grid(study, space)
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(BASELINE_ATTR) and t.state in (*FINISHED, TrialState.WAITING, TrialState.RUNNING):
            return
    study.enqueue_trial({}, user_attrs={BASELINE_ATTR: True})


def ensure_grid(study: optuna.Study, space) -> None:
    """Enqueue each (arm, budget_scale, seed_offset) of an arms space that has no finished,
    waiting or running trial: a failed or interrupted one is queued again. The baseline arm at
    budget scale 1 (else the first) and seed 0 is the study's baseline."""
    live = (*FINISHED, TrialState.WAITING, TrialState.RUNNING)
    key = lambda p: (p.get("arm"), float(p.get("budget_scale", space.budget_scales[0])),  # noqa: E731
                     int(p.get("seed_offset", 0)))
    have = {key({**t.system_attrs.get("fixed_params", {}), **t.params})
            for t in study.get_trials(deepcopy=False) if t.state in live}
    base_scale = 1.0 if 1.0 in space.budget_scales else space.budget_scales[0]
    for point in space.grid():
        if key(point) in have:
            continue
        params = {k: v for k, v in point.items()
                  if k == "arm" or (k == "budget_scale" and len(space.budget_scales) > 1)
                  or (k == "seed_offset" and space.seeds > 1)}
        baseline = space.arms[point["arm"]].is_baseline and point["budget_scale"] == base_scale \
            and point["seed_offset"] == 0
        study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True} if baseline else {})


# ---- the objective ---------------------------------------------------------------------------------
RESUME_ATTR = "loopsearch.resume_dir"  # the trial's training-state directory (written for people, never read)
INTERRUPTED_ATTR = "loopsearch.interrupted"  # failed by a Ctrl-C or SIGTERM: the next run retries it first
CONFIRM_OF_ATTR = "loopsearch.confirm_of"  # a confirmation trial: the trial whose configuration it retrains
CONFIRM_SEEDS_ATTR = "loopsearch.confirm_seeds"  # ... and the seed offsets it trains


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The attributes of a trial trained with several seeds: the mean over seeds of val NLL (and
    of the per-window validation values: every seed is scored on the same masks), its Monte-Carlo
    standard error, the seeds' interval (t, n - 1 degrees of freedom), and the FLOPs of all seeds
    (what the trial cost). Other results are the first seed's."""
    first = dict(rows[0]["attrs"])
    values = [r["val_nll"] for r in rows]
    ci = mean_interval(values)
    windows = [r["attrs"].get("val_windows") for r in rows]
    if all(w is not None and len(w) == len(windows[0]) for w in windows):
        first["val_windows"] = [round(sum(col) / len(col), 6) for col in zip(*windows)]
    first.update(
        val_nll=ci.mean, perplexity=math.exp(min(ci.mean, 700)),
        val_nll_se=math.sqrt(sum(r["val_nll_se"] ** 2 for r in rows)) / len(rows),
        seeds=len(rows), seed_se=ci.se, seed_lo=ci.lo, seed_hi=ci.hi,
        train_flops=sum(float(r["train_flops"]) for r in rows),
        wall_s=sum(float(r["attrs"].get("wall_s", 0.0)) for r in rows),
        eval_s=sum(float(r["attrs"].get("eval_s", 0.0)) for r in rows),
    )
    return first


class Objective:
    """build -> train under the budget -> evaluate -> save -> report; returns val NLL (nats/token).

    ``device`` and ``checkpoint_every`` (FLOPs) override the spec's [train] settings for this
    process; they change where and how safely a trial runs, not what it computes. ``share``
    (data parallel, rank 0 of a torchrun group) sends each trial's config and every pruning
    decision to the other ranks (loopsearch/search/workers.py: follow)."""

    def __init__(self, spec: StudySpec, progress: bool = True, device: str | None = None,
                 checkpoint_every: float | None = None, share: Callable[[dict | None], Any] | None = None):
        self.spec, self.progress, self.share = spec, progress, share
        self.overrides = {k: v for k, v in (("device", device), ("checkpoint_every", checkpoint_every))
                          if v is not None}
        self._data = None

    def data(self):
        if self._data is None:
            corpus = get_registry().build("corpus", self.spec.corpus.name, self.spec.corpus.params)
            self._data = prepare(corpus, self.spec.vocab_size)
        return self._data

    def choose(self, trial: optuna.Trial) -> Choice:
        if trial.user_attrs.get(BASELINE_ATTR) and not self.spec.space.arms:
            return BASELINE
        return suggest(trial, self.spec.space, self.spec.backbone.params)

    def seed_offsets(self, trial: optuna.Trial, choice: Choice) -> list[int]:
        """The training seeds (offsets from the study's seed) this trial trains: a confirmation
        trial's new seeds; an arm's own seed; else ``seeds`` replicates, 0 .. seeds - 1."""
        confirm = trial.user_attrs.get(CONFIRM_SEEDS_ATTR)
        if confirm is not None:
            return [int(s) for s in confirm]
        if self.spec.space.arms:
            return [choice.seed_offset]
        return list(range(self.spec.space.seeds))

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """Train the trial's configuration once per seed (the replicates), store every seed's
        result as it finishes (a retried trial skips them), and return the mean over seeds."""
        choice = self.choose(trial)
        offsets = self.seed_offsets(trial, choice)
        source = self.duplicate_of(trial, choice, offsets)
        if source is not None:
            value = self.reuse(trial, source)
            # a retry whose configuration another trial finished meanwhile: nothing will resume from
            # the dead attempt's training state, so it goes too, unless another live retry of the
            # same first attempt (`study retry` beside the automatic one) still trains from it
            if not self.shares_state(trial):
                for i, offset in enumerate(offsets):
                    suffix = f"-seed{offset}" if len(offsets) > 1 and i else ""
                    Checkpointer(self.state_dir(trial, suffix), None).clear()
            return value
        done = {int(r["seed_offset"]): r for r in trial.user_attrs.get("seed_results", [])}
        for i, offset in enumerate(offsets):
            if offset in done:
                continue
            done[offset] = self.train_seed(trial, choice, offset, first=i == 0, replicate=len(offsets) > 1)["row"]
            rows = TrialRecord.attrs(seed_results=[done[o] for o in offsets if o in done])["seed_results"]
            trial.set_user_attr("seed_results", rows)  # a retry of this trial skips the seeds already done
        rows = [done[o] for o in offsets]
        results = combine(rows) if len(rows) > 1 else dict(rows[0]["attrs"])
        results["seed_results"] = rows
        for key, value in TrialRecord.attrs(**results).items():
            trial.set_user_attr(key, value)
        first_dir = Path(rows[0]["attrs"]["checkpoint"])
        return self.objective_values(trial, first_dir, results["val_nll"], results)

    def duplicate_of(self, trial: optuna.Trial, choice: Choice, offsets: list[int]) -> FrozenTrial | None:
        """A finished trial of this study that trained exactly this configuration with these seeds
        (samplers, TPE above all, propose a point again once it looks best; with deterministic
        training a rerun would only repeat it). Arms grids and confirmation runs are never reused."""
        if self.spec.space.arms or trial.user_attrs.get(CONFIRM_OF_ATTR) is not None:
            return None
        mine = _config_key(trial_config(self.spec, trial.number, choice))
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            a = other.user_attrs
            if other.number == trial.number or a.get(CONFIRM_OF_ATTR) is not None or "config" not in a:
                continue
            if [int(r["seed_offset"]) for r in a.get("seed_results", [])] != offsets:
                continue
            try:
                theirs = _config_key(TrialConfig.model_validate(a["config"]))
            except ValidationError:
                continue
            if theirs == mine:
                return other
        return None

    def reuse(self, trial: optuna.Trial, source: FrozenTrial) -> float | tuple[float, ...]:
        """Record ``source``'s result as this trial's without training: nothing is spent
        (train_flops 0); ``duplicate_of`` names it, and the leaderboard lists the configuration once."""
        keep = {k: v for k, v in source.user_attrs.items()
                if not k.startswith("loopsearch.") and k not in ("worker", "flops_lost", "resumed_from_flops")}
        keep.update(train_flops=0.0, duplicate_of=source.number)
        for key, value in keep.items():
            trial.set_user_attr(key, value)
        return tuple(source.values) if len(source.values) > 1 else source.values[0]

    def train_seed(self, trial: optuna.Trial, choice: Choice, offset: int, first: bool,
                   replicate: bool) -> dict[str, Any]:
        """Build and train one seed of the trial's configuration; save its checkpoint. Only the
        first seed reports to the pruner (the others would repeat its steps)."""
        choice = dataclasses.replace(choice, seed_offset=offset)
        config = trial_config(self.spec, trial.number, choice)
        if self.overrides:
            config = config.model_copy(update={"train": config.train.model_copy(update=self.overrides)})
        data = self.data()
        torch.manual_seed(config.seed)
        try:
            check_memory(meta_model(config, data.vocab_size), config.train)  # before allocating anything
            model = checkpoint.build_model(config, data.vocab_size)
        except (ValidationError, SpecError) as exc:  # a combination a plugin rejects: this trial only
            reason = f"invalid configuration: {str(exc).splitlines()[0][:300]}"
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned(reason) from None
        except LoopsearchError as exc:  # cannot fit in memory: this trial only
            trial.set_user_attr("rejected", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        if first:
            chosen = {"config": config.model_dump(mode="json"), **describe_choice(model, config, choice)}
            if choice.arm is not None:  # the no-loop arm at any budget and seed: what the others pair with
                chosen["baseline_arm"] = self.spec.space.arms[choice.arm].is_baseline
            for key, value in TrialRecord.attrs(**chosen).items():
                trial.set_user_attr(key, value)
            self.reject_if_unaffordable(trial, model, config)
        suffix = f"-seed{offset}" if replicate and not first else ""
        ckpt = self.checkpointer(trial, config, suffix)
        if self.share is not None:
            self.share({"trial": trial.number, "config": config.model_dump(mode="json"), "state": str(ckpt.dir)})

        reported: set[int] = set()

        def report(gflops: int, nll: float) -> None:
            if self.spec.objective.metrics != ["val_nll"]:
                return  # pruners compare the objective's intermediate values: only val NLL has them
            prune = False
            if first and gflops not in reported:  # tiny budgets: two checkpoints can round to one GFLOP
                reported.add(gflops)
                trial.report(nll, gflops)
                # a confirmation re-measures a chosen configuration to the end, whatever the pruner (confirm
                # runs with Optuna's default MedianPruner, which pruned them once a study had 5 finished trials)
                prune = trial.user_attrs.get(CONFIRM_OF_ATTR) is None and trial.should_prune()
            if self.share is not None:  # data-parallel followers wait for a decision at every report
                self.share({"prune": prune})
            if prune:
                reason = f"pruned by {self.spec.pruner} pruner at {gflops} GFLOPs (val NLL {nll:.4f})"
                trial.set_user_attr("pruned_val_nll", nll)
                stopped(trial, ckpt, "rejected", reason)
                raise optuna.TrialPruned(reason)

        try:
            result = train(model, data, config.train, config.budget, config.seed, report=report,
                           progress=self.progress,
                           description=f"trial {trial.number} {label(config)}"
                                       + (f" seed +{offset}" if replicate else ""),
                           checkpointer=ckpt, eval_seed=config.mask_seed)
        except FloatingPointError as exc:
            stopped(trial, ckpt, "rejected", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        except interrupt.Interrupted:
            # the trainer saved its state: the reason is stored, and the next `study run` retries the
            # trial first, resuming from that checkpoint (workers.requeue_interrupted)
            saved = ckpt.saved_spent()
            where = (f"training state saved at {format_flops(saved)} of {format_flops(config.budget)}; "
                     if saved is not None else "no training state saved; ")
            trial.set_user_attr("failed", f"interrupted (Ctrl-C or SIGTERM); {where}the next `study run` "
                                          f"retries it first")
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            trial.set_user_attr("train_flops", max(0.0, ckpt.spent - (saved or 0.0)))  # the retry counts the rest
            raise
        except torch.cuda.OutOfMemoryError:
            model = None  # noqa: F841 - free its GPU memory now: the exception keeps this frame alive
            torch.cuda.empty_cache()
            reason = (f"CUDA out of memory after {format_flops(ckpt.spent)} of training; lower batch_size "
                      f"({config.train.batch_size}), the model size or seq_len ({config.train.seq_len})")
            stopped(trial, ckpt, "failed", reason)
            raise TrialFailed(reason) from None
        out_dir = inside(artifacts_root(self.spec) / f"trial-{trial.number:04d}{suffix}", artifacts_root(self.spec))
        results = result_attrs(model, config, result, data.fingerprint)
        checkpoint.save(out_dir, model, config, data.tokenizer_json, results)
        ckpt.clear()
        results["checkpoint"] = str(out_dir.resolve())
        row = {"seed_offset": offset, "seed": config.seed, "val_nll": result.val_nll, "val_nll_se": result.val_se,
               "train_flops": result.train_flops, "steps": result.steps, "checkpoint": results["checkpoint"]}
        return {"row": {**row, "attrs": results}}

    def shares_state(self, trial: optuna.Trial) -> bool:
        """Whether another running or waiting trial is an attempt of the same first trial (and so
        uses the same training-state directory)."""
        mine = first_attempt(trial.study._storage.get_trial(trial._trial_id))
        return any(first_attempt(t) == mine for t in trial.study.get_trials(deepcopy=False,
                                                                    states=(TrialState.RUNNING, TrialState.WAITING))
                   if t.number != trial.number)

    def state_dir(self, trial: optuna.Trial, suffix: str = "") -> Path:
        """The training-state directory of a trial's seed: its first attempt's (a retry inherits it)."""
        # derived here from the study's name and the first attempt's number (Optuna's retry history),
        # never read from storage: a path written into the database must not choose what gets deleted
        first = first_attempt(trial.study._storage.get_trial(trial._trial_id))
        root = artifacts_root(self.spec)
        return inside(root / f"trial-{first:04d}{suffix}" / "state", root)

    def checkpointer(self, trial: optuna.Trial, config: TrialConfig, suffix: str = "") -> Checkpointer:
        """The trial's training-state directory: its own, or (a retry of a trial whose worker died)
        the one it inherited, whose newest checkpoint training resumes from. ``suffix``: a further
        seed of the trial (``-seedK``), beside the first seed's directory."""
        directory = str(self.state_dir(trial, suffix))
        if not suffix:
            trial.set_user_attr(RESUME_ATTR, directory)  # for people and the dashboard; never read back
        ckpt = Checkpointer(directory, config.train.checkpoint_every, writer=distributed()[0] == 0)
        store, trial_id = trial.study._storage, trial._trial_id
        ckpt.still_mine = lambda: store.get_trial(trial_id).state == TrialState.RUNNING
        saved = ckpt.saved_spent()
        if saved is not None:
            reached = (ckpt.progress() or {}).get("spent", saved)
            trial.set_user_attr("loopsearch.resume_from", str(ckpt.latest()))
            trial.set_user_attr("resumed_from_flops", saved)
            trial.set_user_attr("flops_lost", max(0.0, reached - saved))  # run by the dead attempt, then lost
        return ckpt

    def objective_values(self, trial: optuna.Trial, directory: Path, val_nll: float,
                         results: dict[str, Any] | None = None) -> float | tuple[float, ...]:
        """The study's objectives for a trained trial; metrics beyond val NLL are measured on
        the checkpoint (loopsearch/eval/metrics.py) and stored with the trial. ``inference_flops``
        is what the final validation executed, per token."""
        obj = self.spec.objective
        values = []
        for metric in obj.metrics:
            if metric == "val_nll":
                values.append(val_nll)
                continue
            if metric == "inference_flops":
                values.append((results or trial.user_attrs)["inference_flops_per_token"])
                continue
            row = metrics.objective_metric(metric, directory, self.spec)
            for key, value in row.items():
                trial.set_user_attr(key, value)
            values.append(row[metric])
        return values[0] if len(values) == 1 else tuple(values)

    def reject_if_unaffordable(self, trial: optuna.Trial, model, config: TrialConfig) -> None:
        try:
            steps = plan_steps(model, config.train, config.budget)
        except BudgetError as exc:
            steps, reason = 0, str(exc)
        else:
            reason = (f"budget {format_flops(config.budget)} buys only {steps} steps of {label(config)} "
                      f"(min_steps = {config.train.min_steps})")
        if steps < config.train.min_steps:
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned(reason)


def first_attempt(t: FrozenTrial) -> int:
    """The number of a trial's first attempt (a retry's, from Optuna's retry history)."""
    return int((t.system_attrs.get("retry_history") or [t.number])[0])


class TrialFailed(RuntimeError):
    """A trial that cannot finish (e.g. out of memory): Optuna marks it failed, the study goes on."""


def stopped(trial: optuna.Trial, ckpt: Checkpointer, key: str, reason: str) -> None:
    """Record why a trial stopped early and the training FLOPs it used (its saved state is dropped)."""
    trial.set_user_attr(key, reason)
    trial.set_user_attr("train_flops", ckpt.spent)
    ckpt.clear()


def label(config: TrialConfig) -> str:
    if config.strategy.name == "none":
        return f"none ({config.backbone.params.get('n_layer', '?')} layers)"
    p = config.strategy.params
    n = p.get("n_loops", p.get("max_loops", ""))
    return f"{config.strategy.name} [{config.loop_start},{config.loop_end})x{n}"


def describe_choice(model, config: TrialConfig, choice: Choice) -> dict[str, Any]:
    seq = config.train.seq_len
    return {
        **({"arm": choice.arm, "budget_scale": choice.budget_scale, "seed_offset": choice.seed_offset}
           if choice.arm is not None else {}),
        "strategy": config.strategy.name,
        "loop_start": config.loop_start,
        "loop_end": config.loop_end,
        "n_loops": int(model.strategy.eval_loops()) if model.strategy.loops_block else 1,
        "n_layer": model.backbone.n_layer,
        "strategy_params": config.strategy.params,
        "n_params": sum(p.numel() for p in model.parameters()),
        "inference_flops_per_token": model.inference_flops_per_token(seq),
        "budget": config.budget,
    }


def eval_key(config: TrialConfig, fingerprint: str) -> str:
    """What makes two validations comparable window by window and mask by mask: the corpus, the
    tokeniser, the windows and the mask key. Paired differences need equal keys."""
    t = config.train
    return f"{fingerprint}:v{config.vocab_size}:T{t.seq_len}:W{t.eval_sequences}:R{t.eval_draws}:s{config.mask_seed}"


def result_attrs(model, config: TrialConfig, r: TrainResult, fingerprint: str = "") -> dict[str, Any]:
    return {
        "train_flops": r.train_flops, "steps": r.steps, "planned_steps": r.planned_steps, "tokens": r.tokens,
        "val_nll": r.val_nll, "val_nll_se": r.val_se, "perplexity": math.exp(min(r.val_nll, 700)),
        "final_loss": r.final_loss,
        # per-(window, draw) values of the final validation: paired differences with other trials
        "val_windows": r.validation.flat() if r.validation is not None else None,
        "val_draws": r.validation.draws if r.validation is not None else None,
        "eval_key": eval_key(config, fingerprint),
        "wall_s": r.wall_s, "eval_s": r.eval_s, "tokens_per_s": r.tokens_per_s, "flops_per_s": r.flops_per_s,
        "mean_train_loops": r.mean_train_loops, "history": [list(h) for h in r.history],
        # executed by the final validation (the model's own inference mode; halting stops early)
        "inference_flops_per_token": model.inference_flops_per_token(
            config.train.seq_len, r.eval_applications if model.strategy.loops_block else None, r.eval_extra_flops),
        "eval_loops_run": r.eval_applications, "mean_token_loops": r.eval_token_loops, "train_stats": r.train_stats,
        "speed": r.speed,  # precision / compile chosen, and the probe's measurements (loopsearch/probe.py)
    }


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line on a finished trial: state, arm or placement, val NLL or why it stopped."""
    a = trial.user_attrs
    if "val_nll" in a:
        se = f" ± {a['val_nll_se']:.4f}" if a.get("val_nll_se") is not None else ""
        seeds = f" (mean of {a['seeds']} seeds)" if (a.get("seeds") or 1) > 1 else ""
        nll = f"val NLL {a['val_nll']:.4f}{se}{seeds}"
    else:
        nll = a.get("rejected", a.get("failed", trial.system_attrs.get("fail_reason", "")))
    resumed = f" (resumed at {a['resumed_from_flops']:.3g} FLOPs)" if "resumed_from_flops" in a else ""
    if a.get("duplicate_of") is not None:
        resumed += f" (the configuration of trial {a['duplicate_of']} again: its result reused, nothing trained)"
    speed = a.get("speed") or {}
    if speed.get("precision"):
        resumed += f" [{speed['precision']}{' + compile' if speed.get('compile') else ''}]"
    if a.get("strategy") == "none":
        what = f"no loop ({a.get('n_layer', '?')} layers)"
    else:
        what = (f"{a.get('strategy', '?')}: layers [{a.get('loop_start')},{a.get('loop_end')}) "
                f"x {a.get('n_loops')} loops")
    if a.get("arm"):
        what = f"arm {a['arm']} ({what}) at {float(a.get('budget', 0)):.3g} FLOPs" + (
            f", seed +{a['seed_offset']}" if a.get("seed_offset") else "")
    return f"trial {trial.number} {trial.state.name.lower()}: {what} {nll}{resumed}"


DEFAULT_RECIPE = "quickstart"  # what `study create --space NAME` trains without --recipe


def spec_from_options(name: str, space: str | None, recipe: str | None, budget: str | None,
                      corpus: dict | None, seed: int | None, sampler: str | None, n_trials: int | None,
                      pruner: str | None = None, seeds: int | None = None) -> StudySpec:
    """Merge a recipe with command-line overrides and resolve it. Without ``--recipe`` the model,
    corpus, budget and training settings are the ``quickstart`` recipe's (a 6-layer d_model 48 model,
    vocabulary 260, that visibly learns within 1 TFLOP); ``--space`` then picks the search space."""
    if recipe:
        base = load_recipe(recipe)
    else:
        try:
            base = load_recipe(DEFAULT_RECIPE)
        except SpecError:  # the builtin recipes are not installed: fall back to the bare defaults
            base = StudyRecipe()
    data = base.model_dump()
    if not recipe:
        data["description"] = ""
    for key, value in (("budget", budget), ("corpus", corpus), ("seed", seed), ("optuna_sampler", sampler),
                       ("n_trials", n_trials), ("pruner", pruner), ("seeds", seeds)):
        if value is not None:
            data[key] = value
    merged = validate(StudyRecipe, data, "command-line options")
    if space is None and recipe is None:
        raise SpecError("give --space NAME|PATH (e.g. --space early_middle) or --recipe NAME|PATH")
    return make_spec(merged, name, space)


def estimate_trial_seconds(spec: StudySpec, steps: int = 4, threads: int | None = None) -> tuple[float, float]:
    """(seconds per trial, FLOP/s): a short probe of the study's baseline model on this machine:
    ``steps`` fp32 training steps on random tokens (the first is a warm-up and not timed), with
    ``threads`` torch threads (pass what ``study run`` would use). Every trial spends the same training FLOPs, so a
    trial takes about budget / FLOP/s, plus its validations (not included)."""
    from ..diffusion import diffusion_loss
    from ..train import make_optimizer
    config = trial_config(spec, 0, BASELINE)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        torch.manual_seed(0)
        model = checkpoint.build_model(config, spec.vocab_size).train()
        opt = make_optimizer(model, config.train)
        gen = torch.Generator().manual_seed(0)
        cfg = config.train
        step_flops = model.train_step_flops(cfg.seq_len, cfg.batch_size, 0.0)
        elapsed = 0.0
        for k in range(max(2, steps)):
            x0 = torch.randint(0, model.backbone.mask_id, (cfg.batch_size, cfg.seq_len), generator=gen)
            start = time.perf_counter()
            loss, _ = diffusion_loss(model, x0, model.backbone.mask_id, gen, 1, cfg.antithetic)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if k:
                elapsed += time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    rate = step_flops * (max(2, steps) - 1) / max(elapsed, 1e-9)
    return spec.budget / rate, rate
