"""The trial record: what the objective stores with every Optuna trial, as one typed model.

It is the contract between the search (which writes it: loopsearch/search/study.py) and the
results and evaluations (which read it: leaderboard, claims, sweep analysis, confirmation).
Optuna keeps it as plain-JSON user attributes, one key per field, so optuna-dashboard and older
readers still see ordinary values; ``TrialRecord.of(trial)`` reads them back validated, and
``TrialRecord.attrs(**values)`` checks what a writer is about to store. Every field is optional
because a trial is written in stages (its choice, then its results) and may stop early (pruned,
rejected, failed). Keys not named here (metrics of plugins, ``loopsearch.*`` bookkeeping) are
kept as extra fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SeedResult(BaseModel):
    """One training seed of a trial (a trial trains ``seeds`` of them; see ``seed_results``)."""

    model_config = ConfigDict(extra="allow")

    seed_offset: int
    seed: int | None = None
    val_nll: float
    val_nll_se: float | None = None
    train_flops: float | None = None
    steps: int | None = None
    checkpoint: str | None = None
    attrs: dict[str, Any] = {}  # the seed's full result attributes (val_windows, history, ...)


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    # what was chosen (written before training)
    config: dict[str, Any] | None = None  # the TrialConfig, as JSON
    strategy: str | None = None
    strategy_params: dict[str, Any] | None = None
    loop_start: int | None = None
    loop_end: int | None = None
    n_loops: int | None = None  # the loop count at inference (1 for the plain model)
    n_layer: int | None = None
    n_params: int | None = None
    budget: float | None = None  # training FLOPs of one seed
    inference_flops_per_token: float | None = None  # planned; replaced by what the final validation ran
    arm: str | None = None  # arms spaces: the arm, its budget scale and seed, and whether it is the no-loop arm
    budget_scale: float | None = None
    seed_offset: int | None = None
    baseline_arm: bool | None = None
    # what training measured (mean over seeds when the trial trained several)
    train_flops: float | None = None  # all seeds together (what the trial cost)
    steps: int | None = None
    planned_steps: int | None = None
    tokens: int | None = None
    val_nll: float | None = None  # nats/token
    val_nll_se: float | None = None  # Monte-Carlo standard error of the validation
    perplexity: float | None = None
    final_loss: float | None = None
    val_windows: list[float] | None = None  # per-(window, draw) validation values: paired differences
    val_draws: int | None = None
    eval_key: str | None = None  # equal keys: same windows and masks
    history: list[list[float]] | None = None  # (training FLOPs, val NLL[, its SE]) at each validation
    wall_s: float | None = None
    eval_s: float | None = None
    tokens_per_s: float | None = None
    flops_per_s: float | None = None
    mean_train_loops: float | None = None
    eval_loops_run: float | None = None
    mean_token_loops: float | None = None
    train_stats: dict[str, float] | None = None
    speed: dict[str, Any] | None = None  # precision / compile chosen and why (loopsearch/probe.py)
    checkpoint: str | None = None  # the first seed's checkpoint directory
    seeds: int | None = None
    seed_se: float | None = None  # over seeds (t, n - 1 degrees of freedom)
    seed_lo: float | None = None
    seed_hi: float | None = None
    seed_results: list[SeedResult] | None = None
    # why a trial stopped or how it resumed
    rejected: str | None = None
    failed: str | None = None
    pruned_val_nll: float | None = None
    resumed_from_flops: float | None = None
    flops_lost: float | None = None
    worker: str | None = None
    duplicate_of: int | None = None  # the sampler proposed a configuration already trained: its result, reused

    @classmethod
    def of(cls, trial) -> "TrialRecord":
        """The record of an Optuna trial (FrozenTrial or Trial), validated."""
        return cls.model_validate(trial.user_attrs)

    @classmethod
    def attrs(cls, **values: Any) -> dict[str, Any]:
        """``values`` checked against the record's types, as the plain-JSON attributes to store."""
        record = cls.model_validate(values)
        return {k: v for k, v in record.model_dump(mode="json").items() if k in values}
