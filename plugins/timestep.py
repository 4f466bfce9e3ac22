"""The ``timestep`` looping strategy: the loop count is a function of the mask rate t.

A masked-diffusion model is called at every mask rate t in (0, 1]; not every t needs the same
depth. The model-scheduling paper (arXiv 2604.02340) found the middle of the denoising
trajectory the most sensitive and its ends tolerant of a smaller model. This strategy runs the
loop block ``loops_for_t(t)`` times for a sequence at mask rate t, with a searchable schedule:

- ``constant``: always ``n_loops`` (``min_loops`` is unused): the ``fixed`` strategy's count;
- ``linear``:   ``min_loops`` at one end of [0, 1], ``n_loops`` at the other (``increasing``:
  more loops at high t, i.e. at heavily masked inputs); every count in between gets an equal
  share of the t axis;
- ``step``:     ``n_loops`` where t > ``threshold``, else ``min_loops`` (reversed when
  ``increasing`` is false);
- ``middle``:   a tent centred at t = 0.5 spanning ``width`` of the t axis: ``n_loops`` at
  t = 0.5 falling to ``min_loops`` at |t - 0.5| >= width / 2.

Training samples t per sequence, so one batch holds sequences that need different loop counts.
``run`` groups the sequences by loop count and runs each group's rows through the block that many
times (sequences of a batch do not interact inside the block, so this equals running every
sequence alone), then puts the rows back in their original order. Only what runs is computed,
and the FLOPs charged are the mean loop count over the sequences, which is exact because a
block application costs the same for every sequence.

``min_loops > n_loops`` (which an Optuna space with overlapping ranges can sample) is not an
error: the two are swapped when the parameters are validated, so a trial is always valid and
``Params`` always holds ``min_loops <= n_loops``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loopsearch import hookimpl
from loopsearch.looping import BlockFn, LoopContext, LoopResult, LoopStrategy, renamed_params, run_with_exit

EXPECTATION_GRID = 10_000  # midpoints of the t axis used for E_t[loops_for_t(t)]


class TimestepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old_names: ClassVar[dict[str, str]] = {"max_loops": "n_loops"}  # accepted, with a deprecation line

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        return renamed_params(data, cls.old_names, "timestep strategy")
    schedule: Literal["constant", "linear", "step", "middle"] = Field(
        "middle", description="loop count as a function of the mask rate t: constant (n_loops), linear, "
                              "step (at threshold) or middle (a tent peaking at t = 0.5)")
    min_loops: int = Field(1, ge=1, le=64, description="fewest block applications (loops) any t gets; "
                                                       "swapped with n_loops if larger")
    n_loops: int = Field(4, ge=1, le=64, description="most block applications (loops) any t gets; also the "
                                                       "inference loop count and the training-budget bound")
    increasing: bool = Field(True, description="linear/step: more loops at high t (heavily masked inputs); "
                                               "false: more loops at low t")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="step: mask rate (fraction in [0, 1]) above which "
                                                              "a sequence gets n_loops")
    width: float = Field(0.6, gt=0.0, le=1.0, description="middle: width of the tent around t = 0.5, as a fraction "
                                                          "of the t axis [0, 1]; min_loops outside it")

    @model_validator(mode="after")
    def _ordered(self):
        # an Optuna space may sample min_loops > n_loops: normalise instead of failing the trial
        if self.min_loops > self.n_loops:
            self.min_loops, self.n_loops = self.n_loops, self.min_loops
        return self


def _levels(frac: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Map a fraction in [0, 1] to an integer in [lo, hi], every integer getting an equal share
    of [0, 1): lo + floor(frac * (hi - lo + 1)), with frac = 1 mapped to hi."""
    k = torch.floor(frac * (hi - lo + 1)).long()
    return (lo + k).clamp(lo, hi)


def loops_for_t(t: torch.Tensor, params: TimestepParams) -> torch.Tensor:
    """Loop count (LongTensor of t's shape, in [min_loops, n_loops]) for mask rates t.

    Pure: depends only on t (clamped to [0, 1]) and the parameters. Monotone in t for ``linear``
    and ``step``; non-decreasing on [0, 0.5] and non-increasing on [0.5, 1] for ``middle``."""
    p = params
    lo, hi = min(p.min_loops, p.n_loops), max(p.min_loops, p.n_loops)
    t = torch.as_tensor(t).detach().to(torch.float64).clamp(0.0, 1.0)
    if p.schedule == "constant":
        return torch.full(t.shape, hi, dtype=torch.long, device=t.device)
    if p.schedule == "linear":
        return _levels(t if p.increasing else 1.0 - t, lo, hi)
    if p.schedule == "step":
        above = t > p.threshold
        high = above if p.increasing else ~above
        return torch.where(high, torch.full_like(t, hi), torch.full_like(t, lo)).long()
    if p.schedule == "middle":
        bump = (1.0 - (t - 0.5).abs() / (p.width / 2)).clamp(0.0, 1.0)
        return _levels(bump, lo, hi)
    raise ValueError(f"unknown schedule {p.schedule!r}")


class TimestepLoops(LoopStrategy):
    """Per-sequence loop counts from the mask rate t (see the module docstring)."""

    name = "timestep"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    Params = TimestepParams

    def train_loops(self, generator: torch.Generator) -> int:
        # the cap passed to run(); per-sequence counts come from t, so this is the step's upper bound
        return self.params.n_loops

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def expected_train_loops(self) -> float:
        grid = (torch.arange(EXPECTATION_GRID, dtype=torch.float64) + 0.5) / EXPECTATION_GRID
        return float(loops_for_t(grid, self.params).double().mean())

    def eval_loops(self) -> int:
        return self.params.n_loops

    def sequence_loops(self, h: torch.Tensor, n_loops: int, ctx: LoopContext) -> torch.Tensor:
        """Loop count of every sequence (LongTensor (B,), on the CPU), capped at ``n_loops``.
        t comes from ``ctx.t``, else it is estimated as the share of masked positions; with
        neither, every sequence gets ``n_loops``."""
        b = h.shape[0]
        if ctx.t is not None:
            t = torch.as_tensor(ctx.t).detach().float().cpu().reshape(-1)
            t = t.expand(b) if t.numel() == 1 else t
        elif ctx.masked is not None:
            t = ctx.masked.detach().float().mean(1).cpu()
        else:
            return torch.full((b,), max(0, n_loops), dtype=torch.long)
        if t.shape != (b,):
            raise ValueError(f"timestep strategy: t has shape {tuple(t.shape)}, expected ({b},)")
        return loops_for_t(t, self.params).clamp(max=max(0, n_loops))

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        counts = self.sequence_loops(h, n_loops, ctx)
        top = int(counts.max()) if counts.numel() else 0
        stats = {"mean_loops": float(counts.float().mean()) if counts.numel() else 0.0, "max_loops": float(top)}
        if ctx.exit is not None:  # an exit criterion stops the whole batch: loop up to the batch's largest count
            result = run_with_exit(h, block, top, ctx)
            result.stats = {**stats, **result.stats}
            return result
        values = sorted(set(counts.tolist()))
        if len(values) == 1:  # one count for the whole batch: no regrouping
            for _ in range(values[0]):
                h = block(h)
            return LoopResult(h, float(values[0]), stats=stats)
        pieces, order = [], []
        for k in values:  # every group runs its own count; rows never interact inside the block
            idx = (counts == k).nonzero().squeeze(1)
            g = h[idx.to(h.device)]
            for _ in range(k):
                g = block(g)
            pieces.append(g)
            order.append(idx)
        inverse = torch.argsort(torch.cat(order)).to(h.device)
        out = torch.cat(pieces)[inverse]
        return LoopResult(out, float(counts.double().mean()), stats=stats)


@hookimpl
def register_loop_strategies():
    return [TimestepLoops]
