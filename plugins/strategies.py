"""Builtin looping strategies: ``none`` (the plain model) and ``fixed`` (LoopMDM).

``fixed`` runs the loop block a fixed number of times at inference. In training it runs it
either that same number of times (``train_loops = "constant"``) or a count drawn per step from
U{1..n_loops} (``"uniform"``, LoopMDM's recipe, which lets the count change at inference).
The loss is taken after the last loop only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from loopsearch import hookimpl
from loopsearch.looping import BlockFn, LoopContext, LoopResult, LoopStrategy, run_with_exit


class NoLoop(LoopStrategy):
    """The non-looped model: every layer runs once."""

    name = "none"
    loops_block = False


class FixedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(2, ge=1, le=64, description="loop count at inference (and the training maximum)")
    train_loops: Literal["constant", "uniform"] = Field(
        "constant", description="constant: always n_loops; uniform: S ~ U{1..n_loops} per step (LoopMDM)"
    )
    reinject: bool = Field(False, description="add the block's input to its output before every loop after the first")


class FixedLoops(LoopStrategy):
    name = "fixed"
    Params = FixedParams

    def train_loops(self, generator: torch.Generator) -> int:
        p = self.params
        if p.train_loops == "uniform":
            return int(torch.randint(1, p.n_loops + 1, (1,), generator=generator).item())
        return p.n_loops

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def expected_train_loops(self) -> float:
        n = self.params.n_loops
        return (n + 1) / 2 if self.params.train_loops == "uniform" else float(n)

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
