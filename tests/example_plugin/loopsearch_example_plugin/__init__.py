"""An example loopsearch plugin: the ``damped`` looping strategy and a search space using it.

Each loop moves the hidden state part of the way to the block's output,
h <- (1 - beta) * h + beta * block(h); with beta = 1 this is the builtin ``fixed`` strategy.
"""

from __future__ import annotations

from importlib import resources

import torch
from pydantic import BaseModel, ConfigDict, Field

import loopsearch
from loopsearch.looping import BlockFn, LoopContext, LoopResult, LoopStrategy


class DampedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(2, ge=1, le=64, description="block applications, in training and at inference")
    beta: float = Field(0.5, gt=0, le=1, description="step size: h <- (1 - beta) * h + beta * block(h)")


class Damped(LoopStrategy):
    name = "damped"
    Params = DampedParams

    def train_loops(self, generator: torch.Generator) -> int:
        return self.params.n_loops

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def expected_train_loops(self) -> float:
        return float(self.params.n_loops)

    def eval_loops(self) -> int:
        return self.params.n_loops

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        beta = self.params.beta
        for _ in range(n_loops):
            h = (1 - beta) * h + beta * block(h)
        return LoopResult(h, float(n_loops))  # every loop runs the whole block: FLOPs count n_loops applications


@loopsearch.hookimpl
def register_loop_strategies():
    return [Damped]


@loopsearch.hookimpl
def register_search_spaces():
    return [resources.files(__name__) / "damped_early.toml"]
