"""Search spaces: find them by name or path, check them against a model, and turn an Optuna
trial into a concrete choice (strategy, its parameters, the loop block, backbone overrides).

Optuna parameter names: ``strategy``, ``block_length``, ``loop_start``, ``<strategy>.<param>``,
``backbone.<param>``, ``train.<param>``. Strategy parameters are conditional on the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecError
from ..looping import check_block
from ..registry import Registry, get_registry
from ..spec import Dist, FloatRange, IntRange, SearchSpace, StudyRecipe, TrainConfig, load_toml, validate

BASELINE_ATTR = "loopsearch.baseline"


@dataclass
class Choice:
    strategy: str
    strategy_params: dict[str, Any] = field(default_factory=dict)
    loop_start: int = 0
    loop_end: int = 0
    backbone: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    arm: str | None = None  # the arm's name, in a space of fixed arms
    budget_scale: float = 1.0  # this trial's budget is the study's budget times this
    seed_offset: int = 0  # added to the study's seed (data order, initialisation)


BASELINE = Choice(strategy="none")


def _find(kind: str, name_or_path: str, what: str, registry: Registry) -> Any:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise SpecError(f"{what} file not found: {path}; pass an existing .toml file or one of: "
                            f"{', '.join(sorted(registry.items(kind)))}")
        return path
    items = registry.items(kind)
    if name_or_path not in items:
        raise SpecError(f"unknown {what} {name_or_path!r}; available: {', '.join(sorted(items)) or 'none'} "
                        f"(or pass the path of a .toml file)")
    return items[name_or_path].obj


def load_space(name_or_path: str, registry: Registry | None = None) -> SearchSpace:
    src = _find("search_space", name_or_path, "search space", registry or get_registry())
    return load_toml(src, SearchSpace)


def load_recipe(name_or_path: str, registry: Registry | None = None) -> StudyRecipe:
    src = _find("study_recipe", name_or_path, "study recipe", registry or get_registry())
    return load_toml(src, StudyRecipe)


# ---- checks -----------------------------------------------------------------------------------
def _dist_values(dist: Dist) -> list[Any]:
    """Representative values of a distribution (the ends of a range, every choice)."""
    if isinstance(dist, (IntRange, FloatRange)):
        return [dist.low, dist.high]
    return list(dist) if isinstance(dist, list) else [dist]


def _check_params(model, dists: dict[str, Dist], where: str, base: dict | None = None) -> None:
    allowed = sorted(model.model_fields)
    old_names = getattr(model, "old_names", {})  # deprecated spellings a Params still accepts
    for key, dist in dists.items():
        if key not in model.model_fields and key not in old_names:
            raise SpecError(f"{where}: unknown parameter {key!r}; allowed: {', '.join(allowed) or 'none'}")
        for value in _dist_values(dist):
            validate(model, {**(base or {}), key: value}, f"{where}.{key}")


def check_space(space: SearchSpace, backbone_name: str, backbone_params: dict, source: str,
                registry: Registry | None = None) -> None:
    """Reject a space that cannot produce a valid trial for this backbone, before any training."""
    reg = registry or get_registry()
    if space.arms:
        return _check_arms(space, backbone_name, backbone_params, source, reg)
    for name in space.strategies:
        strategy = reg.get("loop_strategy", name)
        _check_params(strategy.Params, space.strategy.get(name, {}), f"{source}: [strategy.{name}]")
    backbone = reg.get("backbone", backbone_name)
    _check_params(backbone.Params, space.backbone, f"{source}: [backbone]", backbone_params)
    _check_params(TrainConfig, space.train, f"{source}: [train]")
    if space.block is None:
        return
    layer_counts = sorted({int(v) for v in _dist_values(space.backbone["n_layer"])}) if "n_layer" in space.backbone \
        else [int(backbone.Params.model_validate(backbone_params).n_layer)]
    for n_layer in layer_counts:
        lo, hi = space.block.bounds(n_layer)
        if hi > n_layer:
            raise SpecError(
                f"{source}: loop block region layers [{lo}, {hi}) is outside the model's {n_layer} layers; "
                f"use layers within [0, {n_layer}) or region = [lo_frac, hi_frac]")
        if space.block.length[0] > hi - lo:
            raise SpecError(
                f"{source}: block length {space.block.length[0]} does not fit in layers [{lo}, {hi}) of a "
                f"{n_layer}-layer model; lower block.length or widen the region")


def _check_arms(space: SearchSpace, backbone_name: str, backbone_params: dict, source: str, reg: Registry) -> None:
    backbone = reg.get("backbone", backbone_name)
    for name, arm in space.arms.items():
        where = f"{source}: [arms.{name}]"
        strategy = reg.get("loop_strategy", arm.strategy)
        validate(strategy.Params, arm.params, f"{where} params")
        merged = validate(backbone.Params, {**backbone_params, **arm.backbone}, f"{where} backbone")
        validate(TrainConfig, arm.train, f"{where} train")
        if arm.block is not None:
            try:
                check_block(arm.block[0], arm.block[1], int(merged.n_layer))
            except SpecError as exc:
                raise SpecError(f"{where}: {exc}") from None


# ---- suggestion -------------------------------------------------------------------------------
def suggest_value(trial, name: str, dist: Dist) -> Any:
    if isinstance(dist, IntRange):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatRange):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, list):
        return trial.suggest_categorical(name, dist)
    return dist  # a fixed value


def suggest_arm(trial, space: SearchSpace) -> Choice:
    name = trial.suggest_categorical("arm", list(space.arms))
    scale = trial.suggest_categorical("budget_scale", space.budget_scales) if len(space.budget_scales) > 1 \
        else space.budget_scales[0]
    seed = trial.suggest_int("seed_offset", 0, space.seeds - 1) if space.seeds > 1 else 0
    arm = space.arms[name]
    start, end = arm.block or (0, 0)
    return Choice(arm.strategy, dict(arm.params), start, end, backbone=dict(arm.backbone), train=dict(arm.train),
                  arm=name, budget_scale=float(scale), seed_offset=int(seed))


def suggest(trial, space: SearchSpace, backbone_params: dict) -> Choice:
    """Draw one configuration from the space (define-by-run: the block range depends on depth).
    In a space of arms the trial's arm, budget scale and seed were enqueued (``grid``)."""
    if space.arms:
        return suggest_arm(trial, space)
    backbone = {k: suggest_value(trial, f"backbone.{k}", d) for k, d in space.backbone.items()}
    train = {k: suggest_value(trial, f"train.{k}", d) for k, d in space.train.items()}
    strategy = suggest_value(trial, "strategy", space.strategies)
    params = {k: suggest_value(trial, f"{strategy}.{k}", d) for k, d in space.strategy.get(strategy, {}).items()}
    choice = Choice(strategy, params, backbone=backbone, train=train)
    if strategy != "none" and space.block is not None:
        n_layer = int({**backbone_params, **backbone}.get("n_layer"))
        lo, hi = space.block.bounds(n_layer)
        length = trial.suggest_int("block_length", space.block.length[0], min(space.block.length[1], hi - lo))
        choice.loop_start = trial.suggest_int("loop_start", lo, hi - length)
        choice.loop_end = choice.loop_start + length
        check_block(choice.loop_start, choice.loop_end, n_layer)
    return choice
