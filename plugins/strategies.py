"""Builtin looping strategies: ``none`` (the plain model) and ``fixed`` (LoopMDM).

``fixed`` runs the loop block a fixed number of times at inference. In training it runs it
either that same number of times (``train_loops = "constant"``) or a count S drawn per step:

- ``uniform``: S ~ U{1..n_loops} (LoopMDM's recipe, which lets the count change at inference);
- ``flop_proportional``: p(S) proportional to 1 / FLOPs(S), the forward FLOPs of the model with S
  loops (a looped-UDLM reproduction's choice: each count gets an equal share of the compute);
- ``lognormal_poisson``: S = min(1 + Poisson(lambda), n_loops) with lambda ~ LogNormal, mean
  ``mean_loops`` - 1 and log-standard-deviation ``sigma`` (Huginn's draw, capped).
The loss is taken after the last loop only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from loopsearch import hookimpl
from loopsearch.looping import BlockFn, LoopContext, LoopResult, LoopStrategy, run_with_exit


def lognormal_poisson(mean_loops: float, sigma: float, cap: int, generator: torch.Generator,
                      n: int = 1) -> torch.Tensor:
    """``n`` draws of min(1 + Poisson(lambda), cap), lambda ~ LogNormal with mean ``mean_loops - 1``
    and log-standard-deviation ``sigma`` (Huginn's loop-count draw, capped)."""
    mean = max(mean_loops - 1.0, 1e-6)  # E[lambda]; LogNormal(mu, sigma) has mean exp(mu + sigma^2 / 2)
    mu = math.log(mean) - sigma ** 2 / 2
    lam = torch.exp(mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64))
    return (1 + torch.poisson(lam, generator=generator)).clamp(max=cap).long()


class NoLoop(LoopStrategy):
    """The non-looped model: every layer runs once."""

    name = "none"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    loops_block = False


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(2, ge=1, le=64, description="loop count at inference (and the training maximum)")
    train_loops: Literal["constant", "uniform", "flop_proportional", "lognormal_poisson"] = Field(
        "constant", description="constant: always n_loops; uniform: S ~ U{1..n_loops} per step (LoopMDM); "
                                "flop_proportional: p(S) ~ 1/FLOPs(S); lognormal_poisson: 1 + Poisson(lambda), "
                                "lambda log-normal (Huginn), capped at n_loops")
    mean_loops: float = Field(2.0, ge=1.0, le=64.0, description="lognormal_poisson: mean of 1 + lambda (before "
                                                                 "the cap)")
    sigma: float = Field(0.5, ge=0.0, le=3.0, description="lognormal_poisson: standard deviation of log lambda")
    reinject: bool = Field(False, description="add the block's input to its output before every loop after the first")


class FixedLoops(LoopStrategy):
    name = "fixed"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    Params = FixedParams

    _cost: list[float] | None = None  # forward FLOPs at S = 1..n_loops (flop_proportional), from attach()

    def attach(self, model) -> None:
        self._cost = [model.forward_flops(s) for s in range(1, self.params.n_loops + 1)]

    def probabilities(self) -> torch.Tensor | None:
        """p(S) for S = 1..n_loops of the flop_proportional draw (1/S before the model is known)."""
        cost = self._cost or [float(s) for s in range(1, self.params.n_loops + 1)]
        w = torch.tensor([1.0 / c for c in cost], dtype=torch.float64)
        return w / w.sum()

    def _lognormal_poisson(self, generator: torch.Generator, n: int = 1) -> torch.Tensor:
        p = self.params
        return lognormal_poisson(p.mean_loops, p.sigma, p.n_loops, generator, n)

    def train_loops(self, generator: torch.Generator) -> int:
        p = self.params
        if p.train_loops == "uniform":
            return int(torch.randint(1, p.n_loops + 1, (1,), generator=generator).item())
        if p.train_loops == "flop_proportional":
            return int(torch.multinomial(self.probabilities(), 1, generator=generator).item()) + 1
        if p.train_loops == "lognormal_poisson":
            return int(self._lognormal_poisson(generator).item())
        return p.n_loops

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def expected_train_loops(self) -> float:
        n, kind = self.params.n_loops, self.params.train_loops
        if kind == "uniform":
            return (n + 1) / 2
        if kind == "flop_proportional":
            return float((self.probabilities() * torch.arange(1, n + 1, dtype=torch.float64)).sum())
        if kind == "lognormal_poisson":  # Monte Carlo with a fixed seed: 2e5 draws, standard error < 0.01
            return float(self._lognormal_poisson(torch.Generator().manual_seed(0), 200_000).double().mean())
        return float(n)

    def eval_loops(self) -> int:
        return self.params.n_loops

    def reinjects(self) -> bool:
        return self.params.reinject

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        if not self.params.reinject:
            return super().run(h, block, n_loops, ctx)
        e = h  # the block's input, re-injected before every loop after the first

        def step(h: torch.Tensor, k: int) -> torch.Tensor:
            return block(h if k == 0 else h + e)

        if ctx.exit is not None:
            return run_with_exit(h, block, n_loops, ctx, step)
        for k in range(n_loops):
            h = step(h, k)
        return LoopResult(h, float(n_loops))


@hookimpl
def register_loop_strategies():
    return [NoLoop, FixedLoops]
