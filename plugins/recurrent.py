"""The ``recurrent`` looping strategy: recurrent depth in the style of Huginn (arXiv 2502.05171).

The loop block is a recurrent cell. The prelude's output ``e`` (the layers before the block) is
the input; the state starts from noise, ``s_0 ~ N(0, init_std^2)`` (drawn from ``ctx.generator``,
never torch's global generator), and every loop injects the input again:

- ``injection = "adapter"``: ``s_k = block(A [s_{k-1}; e])`` with ``A`` a learned
  ``nn.Linear(2 d_model, d_model, bias=False)`` (Huginn's adapter), initialised to ``[I, I]``
  so that it starts as the additive injection;
- ``injection = "add"``: ``s_k = block(s_{k-1} + e)``.

With ``init_std = 0`` and ``injection = "add"``, one loop is exactly the plain model.

**Training loop count.** ``train_loops = "lognormal_poisson"`` (the default) draws
``S = min(1 + Poisson(lambda), n_loops)`` per step with ``lambda`` log-normal, mean
``mean_loops - 1`` and log-standard-deviation ``sigma`` (Huginn's draw, capped at ``n_loops``);
``"constant"`` always runs ``n_loops``. Inference runs ``n_loops``.

**Truncated backprop.** In training only the last ``backprop_loops`` loops (Huginn: k = 8) are
differentiated; the loops before them run under ``torch.no_grad``. Those are reported as
``LoopResult.forward_only`` and charged their forward FLOPs once, not three times; planning knows
their mean in advance (``expected_forward_only``), so the step count a budget buys is right.
The gradient reaches the prelude through ``e`` in the differentiated loops.

**FLOPs.** Each loop costs one block application plus, with the adapter, ``4 T d_model^2``
forward FLOPs per sequence (a ``2d -> d`` matmul on T positions), returned as ``extra_flops``.
Training charges ``extra_flops`` 3x (forward + backward); an adapter call inside a no-grad loop
runs forward only, so it is reported as a third of its forward FLOPs, and the total charged is
exactly what ran (checked against FlopCounterMode by the conformance suite). The noise draw and
the additions are elementwise: 0 FLOPs by flops.py's convention.

With an inference-time exit criterion (``ctx.exit``) the loop stops when the criterion holds for
the whole batch (``run_with_exit``), which is how Huginn's exit tests are meant to be used.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from loopsearch import hookimpl
from loopsearch.looping import BlockFn, LoopContext, LoopResult, LoopStrategy, run_with_exit
from loopsearch_builtins.strategies import lognormal_poisson

MC_DRAWS = 200_000  # Monte Carlo draws behind expected_train_loops / expected_forward_only (SE < 0.01)


class RecurrentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(4, ge=1, le=64, description="loop count at inference (and the training maximum)")
    train_loops: Literal["lognormal_poisson", "constant"] = Field(
        "lognormal_poisson", description="lognormal_poisson: 1 + Poisson(lambda), lambda log-normal (Huginn), "
                                         "capped at n_loops; constant: always n_loops")
    mean_loops: float = Field(3.0, ge=1.0, le=64.0, description="lognormal_poisson: mean of 1 + lambda (before "
                                                                 "the cap)")
    sigma: float = Field(0.5, ge=0.0, le=3.0, description="lognormal_poisson: standard deviation of log lambda")
    backprop_loops: int = Field(8, ge=1, le=64, description="truncated backprop: only the last k loops of a "
                                                             "training step are differentiated (Huginn: 8)")
    injection: Literal["adapter", "add"] = Field("adapter", description="adapter: s = block(A[s; e]) with a "
                                                 "learned 2d -> d matrix; add: s = block(s + e)")
    init_std: float = Field(1.0, ge=0.0, le=10.0, description="standard deviation of the noise the state "
                                                               "starts from (0: zeros)")


class RecurrentDepth(LoopStrategy):
    name = "recurrent"
    Params = RecurrentParams

    def __init__(self, params: RecurrentParams, d_model: int):
        super().__init__(params, d_model)
        self.adapter = None
        if params.injection == "adapter":
            self.adapter = nn.Linear(2 * d_model, d_model, bias=False)
            with torch.no_grad():  # [I, I]: starts as the additive injection
                eye = torch.eye(d_model)
                self.adapter.weight.copy_(torch.cat([eye, eye], dim=1))
        self._moments: tuple[float, float] | None = None

    # ---- loop counts -----------------------------------------------------------------------------
    def train_loops(self, generator: torch.Generator) -> int:
        p = self.params
        if p.train_loops == "constant":
            return p.n_loops
        return int(lognormal_poisson(p.mean_loops, p.sigma, p.n_loops, generator).item())

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def eval_loops(self) -> int:
        return self.params.n_loops

    def _expected(self) -> tuple[float, float]:
        """(E[S], E[max(S - k, 0)]) of the training draw: exact for constant, Monte Carlo otherwise."""
        if self._moments is None:
            p = self.params
            if p.train_loops == "constant":
                s = torch.tensor([float(p.n_loops)], dtype=torch.float64)
            else:
                s = lognormal_poisson(p.mean_loops, p.sigma, p.n_loops, torch.Generator().manual_seed(0),
                                      MC_DRAWS).double()
            self._moments = (float(s.mean()), float((s - p.backprop_loops).clamp(min=0).mean()))
        return self._moments

    def expected_train_loops(self) -> float:
        return self._expected()[0]

    def expected_forward_only(self) -> float:
        return self._expected()[1]

    # ---- FLOPs -----------------------------------------------------------------------------------
    def adapter_flops(self, seq_len: int) -> float:
        """Forward FLOPs per sequence of one adapter call (0 with additive injection)."""
        return 0.0 if self.adapter is None else 2.0 * seq_len * (2 * self.d_model) * self.d_model

    def expected_extra_flops(self, seq_len: int) -> float:
        """Training: E[S - D + D / 3] adapter calls' worth (D: the no-grad loops, charged 1x of 3x)."""
        loops, detached = self._expected()
        return self.adapter_flops(seq_len) * (loops - 2.0 * detached / 3.0)

    def extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        return n_loops * self.adapter_flops(seq_len)

    # ---- the loop --------------------------------------------------------------------------------
    def _inject(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return s + e
        # back to the state's dtype: under bf16 autocast the matmul returns bf16, which would make the
        # residual stream bf16 from here on (precision lost, and RMSNorm's fused kernel refused)
        return self.adapter(torch.cat([s, e], dim=-1)).to(s.dtype)

    def _noise(self, e: torch.Tensor, ctx: LoopContext) -> torch.Tensor:
        std = self.params.init_std
        if std == 0:
            return torch.zeros_like(e)
        gen = ctx.generator if ctx.generator is not None else torch.Generator().manual_seed(0)
        noise = torch.randn(e.shape, generator=gen, dtype=torch.float32, device=gen.device)
        return (std * noise).to(device=e.device, dtype=e.dtype)

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        e, s = h, self._noise(h, ctx)
        per_call = self.adapter_flops(h.shape[1])

        def step(s: torch.Tensor, k: int) -> torch.Tensor:
            return block(self._inject(s, e))

        if ctx.exit is not None and not ctx.training:
            res = run_with_exit(s, block, n_loops, ctx, step)
            res.extra_flops += res.applications * per_call
            return res
        training = ctx.training  # truncation is a property of training steps, whatever the grad mode
        detached = max(n_loops - self.params.backprop_loops, 0) if training else 0
        if detached:
            with torch.no_grad():
                for k in range(detached):
                    s = step(s, k)
        for k in range(detached, n_loops):
            s = step(s, k)
        # training charges extra_flops 3x: an adapter call in a no-grad loop ran forward only (1x)
        extra = per_call * ((n_loops - detached) + detached / 3.0) if training else per_call * n_loops
        return LoopResult(s, float(n_loops), extra_flops=extra, forward_only=float(detached),
                          stats={"forward_only_loops": float(detached)})


@hookimpl
def register_loop_strategies():
    return [RecurrentDepth]
