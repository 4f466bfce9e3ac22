"""The ``router`` looping strategy: token-level recursion depth in the style of Mixture-of-Recursions
(MoR, arXiv 2507.10524), expert-choice routing.

Loop 1 runs the block on every token. Before each later loop r (r = 2..n_loops) a router scores the
tokens still active, ``g = sigmoid(router(rms_norm(h)))``, and the top ``k_r`` of them in each
sequence continue (hierarchical: a token that stopped never comes back); the others keep their state.
A continuing token's update is scaled by its score, ``h <- h + g * (block(h) - h)``, which is how the
router learns (MoR's gating); the block's residual is inside ``block``.

**Dense batches.** Capacity is per sequence, not per batch: every sequence sends exactly ``k_r``
tokens through loop r, so the continuing tokens are gathered into a dense (B, k_r, d_model) tensor,
run through the block with their own rotary positions (``run_block(i, h, index=...)``: the backbone
must say ``supports_token_index``) and scattered back. They attend only to one another, as in MoR's
recursion-wise attention. Expert choice looks at the whole sequence, which is causal trouble for an
autoregressive model but legal for a bidirectional MDM, so training and inference route the same way.

**Capacity schedule.** ``capacity = "linear"`` (MoR's): loop r keeps ``ceil(T (n - r + 1) / n)`` tokens
(n = 3: all, 2/3, 1/3); ``"geometric"``: ``ceil(T keep^(r - 1))``. Both at least 1 token.

**FLOPs, of what runs.** Loop r costs the block's forward FLOPs at sequence length ``k_r``
(``flop_profile(k_r)``: the projections and MLP scale with k_r, attention with k_r^2), so tokens that
stopped are not charged. ``LoopResult.applications`` is the FLOP-equivalent count, the sum over loops
of ``block FLOPs at k_r / block FLOPs at T`` (1 + 2/3 + ... : fewer than n_loops);
``stats["mean_token_loops"]`` is the mean number of loops a token ran. Each router call costs
``2 d_model`` FLOPs per scored token (``extra_flops``). Everything is differentiated: training charges
3x. Gathers, scatters, sigmoids and the score scaling cost 0 FLOPs by flops.py's convention.

With an inference-time exit criterion (``ctx.exit``) routing is off and the whole batch loops until
the criterion holds (``run_with_exit``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from loopsearch import hookimpl
from loopsearch.errors import SpecError
from loopsearch.looping import BlockFn, EveryStepRunsAllLoops, LoopContext, LoopResult, LoopStrategy, run_with_exit


class RouterParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(3, ge=1, le=64, description="loops (recursions): loop 1 runs every token, later loops "
                                                       "only the tokens the router keeps")
    capacity: Literal["linear", "geometric"] = Field(
        "linear", description="tokens kept per loop: linear ceil(T (n - r + 1) / n) (MoR), "
                              "geometric ceil(T keep^(r-1))")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="geometric capacity: share of the tokens kept per loop")


class Router(EveryStepRunsAllLoops, LoopStrategy):
    """Expert-choice token routing over recursions (see the module docstring)."""

    name = "router"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    Params = RouterParams

    def __init__(self, params: RouterParams, d_model: int):
        super().__init__(params, d_model)
        self.router = nn.Linear(d_model, 1)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)  # g = 0.5 at first: every kept token's update is halved
        self._block_flops = None  # set by attach: tokens -> forward FLOPs of the loop block per sequence
        self._seq_len = 64

    def attach(self, model) -> None:
        if not getattr(model.backbone, "supports_token_index", False):
            raise SpecError(f"strategy 'router' runs a subset of each sequence's tokens, which backbone "
                            f"{getattr(model.backbone, 'name', type(model.backbone).__name__)!r} does not support "
                            f"(it needs run_block(i, h, index=) and supports_token_index = True); use 'transformer'")
        start, end = model.loop_start, model.loop_end
        self._block_flops = lambda n: float(sum(model.flop_profile(n).layers[start:end]))
        self._seq_len = int(getattr(model.backbone, "seq_len", 0) or 64)

    def capacities(self, seq_len: int, n_loops: int) -> list[int]:
        """Tokens per sequence that run loop r, r = 1..n_loops (non-increasing, >= 1, the first all)."""
        p = self.params
        out = []
        for r in range(1, n_loops + 1):
            share = (n_loops - r + 1) / n_loops if p.capacity == "linear" else p.keep ** (r - 1)
            out.append(max(1, min(seq_len, math.ceil(seq_len * share - 1e-9))))
        return out

    def equivalent_applications(self, seq_len: int, n_loops: int) -> float:
        """Sum over loops of the block's FLOPs at k_r tokens over its FLOPs at all T."""
        if self._block_flops is None:
            raise SpecError("router: the strategy is not attached to a model (LoopedMDM attaches it)")
        full = self._block_flops(seq_len)
        return sum(self._block_flops(k) for k in self.capacities(seq_len, n_loops)) / full

    def router_flops(self, seq_len: int, n_loops: int) -> float:
        """Forward FLOPs per sequence of the router calls: 2 d_model per token scored (before loops 2..n)."""
        caps = self.capacities(seq_len, n_loops)
        return 2.0 * self.d_model * sum(caps[:-1]) if n_loops > 1 else 0.0

    # ---- loop counts: n_loops every step, like MoR (EveryStepRunsAllLoops) ---------------------------
    def expected_train_loops(self) -> float:
        """FLOP-equivalent block applications (what planning charges), at the backbone's length."""
        return self.equivalent_applications(self._seq_len, self.params.n_loops)

    def extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        return self.router_flops(seq_len, n_loops)

    def inference_applications(self, n_loops: int, seq_len: int) -> float:
        return self.equivalent_applications(seq_len, n_loops)

    def expected_extra_flops(self, seq_len: int) -> float:
        return self.router_flops(seq_len, self.params.n_loops)

    # ---- the loop -------------------------------------------------------------------------------
    def score(self, h: torch.Tensor) -> torch.Tensor:
        # float32: bf16 scores tie often (25 distinct of 32 tokens seen), and top-k then picks arbitrarily
        return torch.sigmoid(self.router(F.rms_norm(h, (h.shape[-1],))).squeeze(-1).float())

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        if ctx.exit is not None:
            return run_with_exit(h, block, n_loops, ctx)
        if n_loops <= 0:
            return LoopResult(h, 0.0)
        B, T, C = h.shape
        caps = self.capacities(T, n_loops)
        h = block(h)  # loop 1: every token
        active = torch.arange(T, device=h.device).expand(B, T)  # (B, k) positions still routed, ascending
        for k in caps[1:]:
            sub = h.gather(1, active[..., None].expand(-1, -1, C))
            g = self.score(sub)  # (B, k_prev)
            top = g.topk(k, dim=1).indices.sort(dim=1).values  # keep position order
            active = active.gather(1, top)
            sub, g = sub.gather(1, top[..., None].expand(-1, -1, C)), g.gather(1, top)
            new = sub + g[..., None].to(sub.dtype) * (block(sub, index=active) - sub)
            new = new.to(h.dtype)
            h = h.scatter(1, active[..., None].expand(-1, -1, C), new)
        stats = {"mean_token_loops": float(sum(caps)) / T, "loops_run": float(n_loops)}
        return LoopResult(h, self.equivalent_applications(T, n_loops), extra_flops=self.router_flops(T, n_loops),
                          stats=stats)


@hookimpl
def register_loop_strategies():
    return [Router]
