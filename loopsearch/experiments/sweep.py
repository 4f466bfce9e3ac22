"""``loopsearch sweep``: create a budget sweep, the same arms at a ladder of training-FLOP budgets.

A sweep is a study whose search space lists fixed ``[arms.NAME]`` and ``budget_scales`` (and
``seeds``): every arm trains at every budget and seed. ``make_spec`` builds it from a recipe (or
another space) and the command line's arms, scales and seeds; the curves, paired differences and
the crossover budget are read from storage by loopsearch/results/sweep.py.
"""

from __future__ import annotations

from ..errors import LoopsearchError
from ..search import study as studies
from ..search.space import load_recipe, load_space
from ..spec import StudyRecipe, validate


def parse_scales(text: str) -> list[float]:
    """'1,2,4,8' or 'x1,x2,x4,x8' -> [1.0, 2.0, 4.0, 8.0] (multiples of the recipe's budget)."""
    out = []
    for part in filter(None, (p.strip().lstrip("xX") for p in text.split(","))):
        try:
            out.append(float(part))
        except ValueError:
            raise LoopsearchError(f"--scales {text!r}: {part!r} is not a number; give e.g. 1,2,4,8") from None
    if not out or any(x <= 0 for x in out):
        raise LoopsearchError(f"--scales {text!r}: give positive multiples of the budget, e.g. 1,2,4,8")
    return sorted(set(out))


def make_spec(name: str, recipe: str, space: str | None = None, arms: list[str] | None = None,
              scales: list[float] | None = None, seeds: int = 1, budget: str | None = None,
              corpus: dict | None = None, train_tokens: int | None = None):
    """The spec of a sweep study: the recipe's (or ``space``'s) arms, restricted to ``arms``, at
    every budget scale and seed; ``train_tokens`` limits every arm's training data (the
    data-limited regime)."""
    base = load_recipe(recipe)
    resolved = load_space(space or base.space)
    if not resolved.arms:
        raise LoopsearchError(f"search space {resolved.name!r} has no [arms.NAME] tables; a sweep runs fixed arms "
                              f"(e.g. --space loopmdm_repro)")
    chosen = arms or list(resolved.arms)
    unknown = [a for a in chosen if a not in resolved.arms]
    if unknown:
        raise LoopsearchError(f"unknown arm(s) {unknown}; the space {resolved.name!r} has {list(resolved.arms)}")
    data = resolved.model_dump()
    data.update(arms={a: data["arms"][a] for a in chosen}, budget_scales=scales or [1.0], seeds=seeds)
    recipe_data = base.model_dump()
    for key, value in (("budget", budget), ("corpus", corpus)):
        if value is not None:
            recipe_data[key] = value
    if train_tokens is not None:
        recipe_data["train"]["train_tokens"] = train_tokens
    merged = validate(StudyRecipe, recipe_data, "sweep options")
    return studies.make_spec(merged, name, validate(type(resolved), data, f"sweep of space {resolved.name!r}"))
