"""Pydantic models at every boundary: search spaces, study recipes/specs, trial configs.

One place turns a TOML file into a validated object (``load_toml``); errors name the file, the
key and the allowed values. Unknown keys are rejected everywhere (``extra="forbid"``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BudgetError, SpecError
from .units import parse_flops


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- search-space distributions --------------------------------------------------------------
class IntRange(Strict):
    low: int = Field(description="smallest value")
    high: int = Field(description="largest value (included)")
    step: int = Field(1, ge=1, description="spacing of the values (>= 1)")
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _order(self):
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        return self


class FloatRange(Strict):
    low: float = Field(description="smallest value")
    high: float = Field(description="largest value")
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _order(self):
        if self.low > self.high:
            raise ValueError(f"low={self.low} is above high={self.high}")
        return self


Scalar = Union[bool, int, float, str]
# A value in a space: a fixed scalar, a list (categorical choice), or a {low, high} range.
Dist = Union[Scalar, Annotated[list[Scalar], Field(min_length=1)], IntRange, FloatRange]


class BlockSpace(Strict):
    """Where the loop block may sit. Give ``region`` (fractions of the depth) or ``layers``
    (absolute layer indices [lo, hi)); the block [loop_start, loop_end) lies inside it."""

    region: tuple[float, float] | None = Field(None, description="[lo, hi): fractions of the depth")
    layers: tuple[int, int] | None = Field(None, description="[lo, hi): absolute layer indices")
    length: tuple[int, int] = Field((1, 3), description="block length in layers: (min, max)")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.region is None) == (self.layers is None):
            raise ValueError("give exactly one of region = [lo_frac, hi_frac] or layers = [lo, hi]")
        if self.region is not None and not (0 <= self.region[0] < self.region[1] <= 1):
            raise ValueError(f"region {list(self.region)} must satisfy 0 <= lo < hi <= 1")
        if self.layers is not None and not (0 <= self.layers[0] < self.layers[1]):
            raise ValueError(f"layers {list(self.layers)} must satisfy 0 <= lo < hi")
        if not (1 <= self.length[0] <= self.length[1]):
            raise ValueError(f"length {list(self.length)} must satisfy 1 <= min <= max")
        return self

    def bounds(self, n_layer: int) -> tuple[int, int]:
        """The layer range [lo, hi) the block must lie in, for a model of n_layer layers."""
        if self.layers is not None:
            return self.layers
        lo, hi = self.region
        return int(lo * n_layer), max(int(lo * n_layer) + 1, round(hi * n_layer))


class Arm(Strict):
    """One fixed configuration in a study of named arms (a paper's table, a budget sweep)."""

    description: str = Field("", description="one line on what the arm stands for")
    role: Literal["baseline", "early_looped", "late_looped", "deeper"] | None = Field(
        None, description="what the arm stands for in the paper's experiment (loopsearch/results/claims.py reads it)")
    strategy: str = Field("none", description="loop strategy (none: a plain model)")
    params: dict[str, Scalar] = Field(default_factory=dict, description="the strategy's parameters")
    block: tuple[int, int] | None = Field(None, description="the looped layers [loop_start, loop_end)")
    backbone: dict[str, Scalar] = Field(default_factory=dict, description="backbone overrides (e.g. n_layer)")
    train: dict[str, Scalar] = Field(default_factory=dict, description="training overrides (e.g. lr)")

    @model_validator(mode="after")
    def _block(self):
        if self.strategy != "none" and self.block is None:
            raise ValueError(f"strategy {self.strategy!r} loops a block: give block = [loop_start, loop_end]")
        if self.strategy == "none" and self.block is not None:
            raise ValueError("strategy 'none' loops nothing: drop block or name a loop strategy")
        if self.block is not None and not (0 <= self.block[0] < self.block[1]):
            raise ValueError(f"block {list(self.block)} must satisfy 0 <= loop_start < loop_end")
        return self

    @property
    def is_baseline(self) -> bool:
        """The study's own no-loop model: no strategy, no backbone or training changes."""
        return self.strategy == "none" and not self.backbone and not self.train


class SearchSpace(Strict):
    """What a study searches: distributions over strategies, blocks and parameters, or a fixed
    list of named ``arms`` run as a grid over arms x budget_scales x seeds."""

    name: str = Field(description="the space's name")
    description: str = Field("", description="one line on what the space searches")
    strategies: list[str] = Field(default_factory=list, description="looping strategies to choose from "
                                                                    "(\"none\" = the plain model)")
    block: BlockSpace | None = Field(None, description="[block]: where the loop block may sit")
    strategy: dict[str, dict[str, Dist]] = Field(default_factory=dict,
                                                 description="per-strategy parameter distributions")
    backbone: dict[str, Dist] = Field(default_factory=dict, description="backbone parameters searched")
    train: dict[str, Dist] = Field(default_factory=dict, description="training parameters searched (e.g. lr)")
    arms: dict[str, Arm] = Field(default_factory=dict, description="named fixed configurations, instead of a search")
    budget_scales: list[float] = Field(default_factory=lambda: [1.0],
                                       description="with arms: each arm at each multiple of the study budget")
    seeds: int = Field(1, ge=1, description="training seeds per configuration (initialisation and data order): with "
                                            "arms, one trial per seed, paired across arms; in a search, every "
                                            "trial trains all of them and its value is their mean")

    @model_validator(mode="after")
    def _block_needed(self):
        if self.arms:
            searched = [k for k in ("strategies", "block", "strategy", "backbone", "train") if getattr(self, k)]
            if searched:
                raise ValueError(f"a space with [arms] fixes every trial; drop {', '.join(searched)} "
                                 f"(or put them inside the arms)")
            if not self.budget_scales or any(x <= 0 for x in self.budget_scales):
                raise ValueError(f"budget_scales {self.budget_scales} must be positive multiples of the budget")
            return self
        if not self.strategies:
            raise ValueError("give strategies = [...] to search over, or a table of [arms.NAME]")
        if self.budget_scales != [1.0]:
            raise ValueError("budget_scales applies to [arms] spaces; "
                             "a search trains every trial at the study's budget")
        loops = [s for s in self.strategies if s != "none"]
        if loops and self.block is None:
            raise ValueError(f"strategies {loops} loop a block: add a [block] table (region or layers, and length)")
        unknown = set(self.strategy) - set(self.strategies)
        if unknown:
            raise ValueError(f"[strategy.{sorted(unknown)[0]}] is not in strategies = {self.strategies}")
        return self

    def grid(self) -> list[dict[str, Any]]:
        """Every (arm, budget_scale, seed_offset) trial of an arms space, arms outermost."""
        return [{"arm": a, "budget_scale": x, "seed_offset": s}
                for x in self.budget_scales for s in range(self.seeds) for a in self.arms]

    def used_strategies(self) -> list[str]:
        return sorted({a.strategy for a in self.arms.values()}) if self.arms else self.strategies


# ---- studies -----------------------------------------------------------------------------------
class PluginRef(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step")
    seq_len: int = Field(64, ge=8, description="tokens per sequence")
    lr: float = Field(1e-2, gt=0, description="peak learning rate (tiny models train fastest near 1e-2)")
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak (cosine)")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="warmup length as a fraction of the FLOP budget")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where a probe of the trial's own model measures it faster (never "
                            "without bf16 units); fp32 or bf16 to fix it")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model; auto: when a probe says the compile time pays for itself "
                            "over the trial (probed only for trials of >= 5 min eager)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    min_steps: int = Field(20, ge=1, description="reject trials whose budget buys fewer optimizer steps")
    eval_points: int = Field(4, ge=1, description="validations at equal FLOP fractions of the budget")
    eval_sequences: int = Field(1024, ge=1, description="validation windows of seq_len tokens: the whole valid "
                                                        "split up to this many, evenly spaced")
    eval_draws: int = Field(2, ge=2, description="independent mask draws per validation window (>= 2: the "
                                                 "standard error comes from their spread)")
    eval_curve_sequences: int = Field(64, ge=1, description="windows of the cheaper validations at the learning "
                                                             "curve's checkpoints (the final one uses eval_sequences)")
    eval_batch_size: int = Field(64, ge=1, description="sequences per validation forward pass (speed only)")
    antithetic: bool = Field(True, description="low-discrepancy sampling of t")
    train_tokens: int | None = Field(None, ge=16, description="train on only the first this many tokens of the "
                                                              "training split (the data-limited regime: many passes); "
                                                              "None: all")
    checkpoint_every: float | None = Field(
        None, gt=0, description="save the training state (weights, optimizer, RNG, data position, FLOPs spent) every "
                                "this many training FLOPs, so a retried trial resumes instead of starting over")

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data):
        """Specs stored before the validation estimator had draws carry eval_t_points: ignored."""
        if isinstance(data, dict) and "eval_t_points" in data:
            data = {k: v for k, v in data.items() if k != "eval_t_points"}
        return data

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _parse_checkpoint_every(cls, v):
        return None if v is None else _budget(v)


METRICS = {  # study objectives and their directions
    "val_nll": "minimize",  # validation ELBO, nats/token (always measured)
    "gen_ppl": "minimize",  # generative perplexity of samples under the study's reference causal LM
    "zeroshot_bpb": "minimize",  # ELBO on a held-out text file (e.g. WikiText-2), bits per byte
    "task_accuracy": "maximize",  # exact match on a reasoning task by conditional sampling
    "inference_flops": "minimize",  # inference FLOPs per token the final validation executed
}

SAMPLERS = ("auto", "tpe", "random", "qmc", "gp", "cmaes", "nsga2")  # auto: tpe, or nsga2 when multi-objective
MULTI_OBJECTIVE_SAMPLERS = ("auto", "tpe", "random", "qmc", "gp", "nsga2")
PRUNERS = ("none", "median", "successive_halving", "hyperband")


class ObjectiveSpec(Strict):
    """What a study optimises: one metric, or several (a multi-objective study, Pareto front).
    The sampler settings apply to gen_ppl and task_accuracy."""

    metrics: list[Literal["val_nll", "gen_ppl", "zeroshot_bpb", "task_accuracy", "inference_flops"]] = Field(
        default_factory=lambda: ["val_nll"], min_length=1,
        description="objectives in order: val_nll, gen_ppl, zeroshot_bpb (bits/byte; old name zeroshot_nll), "
                    "task_accuracy, "
                    "inference_flops (per token)")
    sampler: PluginRef = Field(default_factory=lambda: PluginRef(name="confidence"),
                               description="sampler plugin (and params) for generation metrics")
    steps: int | None = Field(None, ge=1, description="sampler steps (default: one per generated token)")
    loops: str | None = Field(None, description="loop schedule while sampling (default: the trial's own count)")
    n_samples: int = Field(16, ge=1, description="gen_ppl: unconditional samples drawn")
    task: PluginRef = Field(default_factory=lambda: PluginRef(name="addition"),
                            description="task_accuracy: the task (addition or gsm8k) and its params")
    n_task: int = Field(64, ge=1, description="task_accuracy: problems evaluated (from the task's test split)")
    zeroshot: str | None = Field(None, description="zeroshot_bpb: path of the text file (WikiText-2, LAMBADA, PTB)")
    zeroshot_sequences: int = Field(64, ge=1, description="zeroshot_bpb: windows of seq_len tokens evaluated")
    reference: dict[str, Any] = Field(default_factory=dict,
                                      description="gen_ppl: parameters of the reference LM trained on first use")
    seed: int = Field(0, description="seed of the sampler's noise")

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics {self.metrics} lists one twice")
        if "zeroshot_bpb" in self.metrics and not self.zeroshot:
            raise ValueError("metric zeroshot_bpb needs zeroshot = PATH of a text file (e.g. wiki.test.raw)")
        return self

    @field_validator("metrics", mode="before")
    @classmethod
    def _old_metric_names(cls, v):
        """zeroshot_nll (which held bits/byte) is now zeroshot_bpb, the leaderboard column's name."""
        return [("zeroshot_bpb" if m == "zeroshot_nll" else m) for m in v] if isinstance(v, list) else v

    @property
    def directions(self) -> list[str]:
        return [METRICS[m] for m in self.metrics]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


def _budget(value: Any) -> float:
    try:
        return parse_flops(value)
    except BudgetError as exc:  # reported by pydantic with the key it belongs to
        raise ValueError(str(exc)) from None


class StudyRecipe(Strict):
    """A study recipe file (studies/*.toml): everything but the name may be given."""

    name: str | None = Field(None, description="the study's name (usually given by --name)")
    description: str = Field("", description="one line on what the recipe is for")
    space: str = Field("early_middle", description="the search space: a name or a .toml path (--space overrides)")
    budget: float = Field(1e12, description="training FLOPs per trial")
    n_trials: int = Field(5, ge=1, description="trials `study run` completes by default")
    corpus: PluginRef = Field(PluginRef(name="shakespeare"), description="[corpus]: name and params of a corpus plugin")
    vocab_size: int = Field(1024, ge=260, description="BPE vocabulary size (>= 256 bytes + merges)")
    backbone: PluginRef = Field(PluginRef(name="transformer"),
                                description="[backbone]: name and params of a backbone plugin")
    train: TrainConfig = Field(TrainConfig(), description="[train]: see its table")
    seed: int = Field(0, description="the study's seed: first training seed of every trial, validation masks, "
                                     "Optuna sampler")
    seeds: int | None = Field(None, ge=1, description="training seeds per configuration (replicates); "
                                                      "None: the space's seeds (default 1)")
    optuna_sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        "auto", description="Optuna sampler; auto = tpe, or nsga2 for a multi-objective study (the old key "
                            "`sampler` is read as this one; `sampler` means the diffusion sampler elsewhere)")
    pruner: Literal[PRUNERS] = Field(  # type: ignore[valid-type]
        "none", description="prune on val NLL at equal training FLOPs: none, median, successive_halving, hyperband")
    artifacts_dir: str = Field("loopsearch_runs", description="where trial checkpoints are written (a relative "
                               "path is resolved where the study is created and stored absolute)")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="what the study optimises")

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, v):
        return _budget(v)

    @model_validator(mode="before")
    @classmethod
    def _old_sampler_key(cls, data):
        """Recipes and stored studies from before the rename: `sampler` is the Optuna sampler."""
        if isinstance(data, dict) and "sampler" in data:
            data = dict(data)
            old = data.pop("sampler")
            data.setdefault("optuna_sampler", old)
        return data


class StudySpec(StudyRecipe):
    """What is stored in the Optuna study: the recipe with the space resolved and versions."""

    name: str
    space: SearchSpace  # type: ignore[assignment]
    versions: dict[str, str] = Field(default_factory=dict)


class TrialConfig(Strict):
    """Everything needed to build and train one model (saved beside its weights)."""

    study: str
    trial: int
    backbone: PluginRef
    strategy: PluginRef
    loop_start: int = 0
    loop_end: int = 0
    corpus: PluginRef
    vocab_size: int
    train: TrainConfig
    budget: float
    seed: int  # initialisation, data order, training masks and loop counts
    eval_seed: int | None = None  # validation masks (the study's seed: every trial scored on the same masks)

    @property
    def mask_seed(self) -> int:
        """The key of the validation masks (older configs: the trial's seed)."""
        return self.seed if self.eval_seed is None else self.eval_seed


# ---- loading ------------------------------------------------------------------------------------
def load_toml(path: str | Path, model: type[BaseModel], text: str | None = None) -> Any:
    """Read a TOML file into ``model``; every error is a one-line SpecError naming the file."""
    path = Path(str(path))
    try:
        raw = tomllib.loads(text if text is not None else path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; give a .toml file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file (binary?); give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: malformed TOML: {exc}; fix the syntax at that line") from None
    return validate(model, raw, str(path))


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: {describe_error(exc, model)}") from None


def describe_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first validation error as 'key: problem (allowed: ...)', plus a count of the rest."""
    errors = exc.errors()
    # in a union (a value may be a scalar, a list or a range) the first error is usually "not a bool":
    # report the branch that matched the value's shape, i.e. the first error that is not a type mismatch
    err = next((e for e in errors if not e["type"].endswith(("_type", "_parsing"))), errors[0])
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    loc = [p for p in loc
           if p not in {"IntRange", "FloatRange", "list[union[bool,int,float,str]]", "bool", "int", "float", "str"}]
    key = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        msg = f"unknown key {key!r}" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
    elif err["type"] == "missing":
        msg = f"missing required key {key!r}"
    else:
        msg = f"key {key!r}: {err['msg']} (got {err.get('input')!r})"
    more = len(errors) - 1
    return msg + (f" [and {more} more error{'s' if more > 1 else ''}]" if more else "")


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        args = getattr(current, "__args__", ())
        current = next((a for a in args if hasattr(a, "model_fields")), current)
    return sorted(getattr(current, "model_fields", {}))
