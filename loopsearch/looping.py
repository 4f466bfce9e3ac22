"""Where the loop is executed.

A looped model is: prelude layers [0, loop_start) -> loop block [loop_start, loop_end) run
n_loops times with shared weights -> coda layers [loop_end, L) -> head (LoopMDM, arXiv 2605.26106).
A LoopStrategy decides how many times the block runs (per training step and at inference) and
runs it; the model counts the block applications it executed so FLOPs follow what really ran.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .backbone import Backbone
from .errors import SpecError
from .flops import FlopProfile, inference_flops_per_token, train_step_flops

BlockFn = Callable[[torch.Tensor], torch.Tensor]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoopStrategy(nn.Module):
    """Base class of looping strategies (register subclasses with ``register_loop_strategies``).

    ``loops_block``: False for strategies that never loop (``none``); the plan then has no block.
    Subclasses override ``train_loops`` / ``eval_loops`` and, for anything beyond "run the block
    n times", ``run``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    loops_block: ClassVar[bool] = True

    def __init__(self, params: BaseModel, loop_start: int, loop_end: int, d_model: int):
        super().__init__()
        self.params = params
        self.loop_start, self.loop_end, self.d_model = loop_start, loop_end, d_model

    def train_loops(self, generator: torch.Generator) -> int:
        """Loop count for one training step (drawn with ``generator`` if random)."""
        return 1

    def max_train_loops(self) -> int:
        """Upper bound of ``train_loops``: used to check a budget can pay for enough steps."""
        return 1

    def expected_train_loops(self) -> float:
        """Mean of ``train_loops``: used to plan the number of steps a budget buys."""
        return 1.0

    def eval_loops(self) -> int:
        """Loop count used for validation and, by default, inference."""
        return 1

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int) -> tuple[torch.Tensor, float]:
        """Run the loop block; return the new hidden state and the number of block applications
        executed (averaged over tokens if a strategy stops tokens early)."""
        for _ in range(n_loops):
            h = block(h)
        return h, float(n_loops)


class LoopedMDM(nn.Module):
    """A backbone whose layers [loop_start, loop_end) are looped by a strategy."""

    def __init__(self, backbone: Backbone, strategy: LoopStrategy):
        super().__init__()
        s, e = strategy.loop_start, strategy.loop_end
        check_block(s, e, backbone.n_layer, strategy.loops_block)
        self.backbone, self.strategy = backbone, strategy
        self.loop_start, self.loop_end = s, e

    def run_range(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i in range(start, end):
            h = self.backbone.run_block(i, h)
        return h

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        return self.run_range(h, self.loop_start, self.loop_end)

    def forward(self, x: torch.Tensor, n_loops: int | None = None) -> tuple[torch.Tensor, float]:
        """x: (B, T) token ids -> logits (B, T, n_tokens) and block applications executed."""
        b = self.backbone
        n = self.strategy.eval_loops() if n_loops is None else n_loops
        h = b.embed(x)
        h = self.run_range(h, 0, self.loop_start)
        applications = 0.0
        if self.loop_end > self.loop_start:
            h, applications = self.strategy.run(h, self._block, n)
        h = self.run_range(h, self.loop_end, b.n_layer)
        return b.head(h), applications

    # ---- FLOPs of what runs (see flops.py) ---------------------------------------------------
    def flop_profile(self, seq_len: int) -> FlopProfile:
        return self.backbone.flop_profile(seq_len)

    def train_step_flops(self, seq_len: int, batch_size: int, applications: float) -> float:
        return train_step_flops(self.flop_profile(seq_len), batch_size, self.loop_start, self.loop_end, applications)

    def inference_flops_per_token(self, seq_len: int, applications: float | None = None) -> float:
        a = float(self.strategy.eval_loops()) if applications is None else applications
        return inference_flops_per_token(self.flop_profile(seq_len), self.loop_start, self.loop_end, a)


def check_block(loop_start: int, loop_end: int, n_layer: int, loops_block: bool = True) -> None:
    """Raise SpecError unless [loop_start, loop_end) is a non-empty range of layers."""
    if not loops_block:
        if (loop_start, loop_end) != (0, 0):
            raise SpecError(f"this strategy does not loop; loop_start/loop_end must be 0/0, got {loop_start}/{loop_end}")
        return
    if not (0 <= loop_start < loop_end <= n_layer):
        raise SpecError(
            f"loop block [{loop_start}, {loop_end}) is outside the model's {n_layer} layers; "
            f"need 0 <= loop_start < loop_end <= {n_layer}"
        )
