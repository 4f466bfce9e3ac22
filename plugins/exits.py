"""The builtin exit criteria: ``hidden_delta``, ``kl`` and ``argmax``.

The interface (``ExitCriterion``, ``make_exit``, ``parse_exit``) is in loopsearch/exits.py.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from loopsearch import hookimpl
from loopsearch.exits import ExitCriterion, ExitParams, reduce_masked

class HiddenDeltaParams(ExitParams):
    tol: float = Field(0.01, gt=0, description="stop when the relative hidden-state change is below this")
    reduce: Literal["max", "mean"] = Field("max", description="how tokens' changes combine over a sequence's "
                                                              "masked positions")


class HiddenDelta(ExitCriterion):
    """Stop when ||h_new - h_prev|| / ||h_prev|| (per token, over masked positions) < tol."""

    name = "hidden_delta"
    Params = HiddenDeltaParams

    def converged(self, h_prev, h_new, state, ctx):
        diff = (h_new - h_prev).float().norm(dim=-1)
        rel = diff / h_prev.float().norm(dim=-1).clamp_min(1e-12)
        return reduce_masked(rel, ctx.masked, self.params.reduce) < self.params.tol, state, 0.0


class KLParams(ExitParams):
    tol: float = Field(5e-4, gt=0, description="stop when KL(p_k || p_k-1) in nats is below this")
    reduce: Literal["max", "mean"] = Field("max", description="how tokens' KLs combine over a sequence's "
                                                              "masked positions")


class KLExit(ExitCriterion):
    """Stop when the KL between successive predictive distributions (per masked token) < tol."""

    name = "kl"
    Params = KLParams

    def converged(self, h_prev, h_new, state, ctx):
        lp = self.log_probs(ctx, h_new)
        prev = state.get("log_probs")
        if prev is None:
            now = torch.zeros(h_new.shape[0], dtype=torch.bool, device=h_new.device)
        else:
            kl = (lp.exp() * (lp - prev)).sum(dim=-1)  # (B, T)
            now = reduce_masked(kl, ctx.masked, self.params.reduce) < self.params.tol
        state["log_probs"] = lp
        return now, state, self.readout_cost(h_new)


class ArgmaxParams(ExitParams):
    patience: int = Field(2, ge=1, description="stop after the predictions were unchanged for this many "
                                               "consecutive loops")


class ArgmaxExit(ExitCriterion):
    """Stop when the argmax prediction at every masked position has not changed for
    ``patience`` consecutive loops."""

    name = "argmax"
    Params = ArgmaxParams

    def converged(self, h_prev, h_new, state, ctx):
        pred = self.log_probs(ctx, h_new).argmax(dim=-1)  # (B, T)
        prev = state.get("pred")
        streak = state.get("streak", torch.zeros(h_new.shape[0], dtype=torch.long, device=h_new.device))
        if prev is not None:
            changed = pred != prev
            if ctx.masked is not None:
                changed = changed & ctx.masked.to(changed.device)
            streak = torch.where(changed.any(dim=-1), torch.zeros_like(streak), streak + 1)
        state["pred"], state["streak"] = pred, streak
        return streak >= self.params.patience, state, self.readout_cost(h_new)


@hookimpl
def register_exit_criteria():
    return [HiddenDelta, KLExit, ArgmaxExit]
