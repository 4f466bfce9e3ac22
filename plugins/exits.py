"""The builtin exit criteria: ``hidden_delta``, ``cosine``, ``kl``, ``min_p_kl``, ``entropy``, ``argmax``
and ``max_prob``.

The first six are the training-free exit tests of recurrent depth (Geiping et al. 2025, arXiv
2502.05171: latent change, cosine, KL, min-p KL, entropy change, argmax stability); ``max_prob`` is the
post-hoc confidence readout that a learned exit gate (Ouro, arXiv 2510.25741) is measured against.

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


class CosineParams(ExitParams):
    tol: float = Field(1e-3, gt=0, description="stop when 1 - cos(h_new, h_prev) is below this")
    reduce: Literal["max", "mean"] = Field("max", description="how tokens' values combine over a sequence's "
                                                              "masked positions")


class CosineExit(ExitCriterion):
    """Stop when the block's output points where its input did: 1 - cos(h_new, h_prev) per masked
    token < tol. Free (no readout); it can stop after the first loop, like ``hidden_delta``, but
    ignores a change of scale."""

    name = "cosine"
    Params = CosineParams

    def converged(self, h_prev, h_new, state, ctx):
        dist = 1.0 - torch.nn.functional.cosine_similarity(h_new.float(), h_prev.float(), dim=-1, eps=1e-12)
        return reduce_masked(dist, ctx.masked, self.params.reduce) < self.params.tol, state, 0.0


class MinPKLParams(ExitParams):
    tol: float = Field(1e-6, gt=0, description="stop when the KL between successive min-p-floored "
                                                "distributions (nats) is below this")
    min_p: float = Field(0.1, gt=0, lt=1, description="tokens below min_p x the top probability are floored to "
                                                      "1/V before the comparison")
    reduce: Literal["max", "mean"] = Field("max", description="how tokens' KLs combine over a sequence's "
                                                              "masked positions")


class MinPKLExit(ExitCriterion):
    """Huginn's min-p KL: floor every probability below ``min_p`` x the largest to 1/V, renormalise,
    and stop when KL(p_k-1 || p_k) of these distributions (per masked token) < tol. The floor
    makes the test blind to the tail, which moves long after the plausible tokens have settled.
    One readout per check; it can stop at loop 2 at the earliest."""

    name = "min_p_kl"
    Params = MinPKLParams

    def converged(self, h_prev, h_new, state, ctx):
        p = self.log_probs(ctx, h_new).exp()
        floor = p < self.params.min_p * p.amax(dim=-1, keepdim=True)
        p = torch.where(floor, torch.full_like(p, 1.0 / p.shape[-1]), p)
        lp = (p / p.sum(dim=-1, keepdim=True)).log()
        prev = state.get("log_probs")
        if prev is None:
            now = torch.zeros(h_new.shape[0], dtype=torch.bool, device=h_new.device)
        else:
            kl = (prev.exp() * (prev - lp)).sum(dim=-1)  # (B, T)
            now = reduce_masked(kl, ctx.masked, self.params.reduce) < self.params.tol
        state["log_probs"] = lp
        return now, state, self.readout_cost(h_new)


class EntropyParams(ExitParams):
    tol: float = Field(1e-3, gt=0, description="stop when the predictive entropy (nats) changed by less than "
                                                "this since the previous loop")
    reduce: Literal["max", "mean"] = Field("max", description="how tokens' changes combine over a sequence's "
                                                              "masked positions")


class EntropyExit(ExitCriterion):
    """Stop when |H(p_k) - H(p_k-1)|, the change of the predictive entropy per masked token, < tol.
    One readout per check; it can stop at loop 2 at the earliest."""

    name = "entropy"
    Params = EntropyParams

    def converged(self, h_prev, h_new, state, ctx):
        lp = self.log_probs(ctx, h_new)
        ent = -(lp.exp() * lp).sum(dim=-1)  # (B, T)
        prev = state.get("entropy")
        if prev is None:
            now = torch.zeros(h_new.shape[0], dtype=torch.bool, device=h_new.device)
        else:
            now = reduce_masked((ent - prev).abs(), ctx.masked, self.params.reduce) < self.params.tol
        state["entropy"] = ent
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


class MaxProbParams(ExitParams):
    threshold: float = Field(0.9, ge=0, le=1, description="stop when the most probable token's probability "
                                                          "reaches this")
    reduce: Literal["max", "mean"] = Field("max", description="max: every masked position must be that sure; "
                                                              "mean: on average")


class MaxProbExit(ExitCriterion):
    """A confidence readout: stop when the largest predictive probability at the sequence's masked
    positions reaches ``threshold`` (every position with ``reduce = max``, on average with ``mean``).
    One readout per check; it can stop after the first loop."""

    name = "max_prob"
    Params = MaxProbParams

    def converged(self, h_prev, h_new, state, ctx):
        doubt = 1.0 - self.log_probs(ctx, h_new).amax(dim=-1).exp()  # (B, T)
        return reduce_masked(doubt, ctx.masked, self.params.reduce) <= 1.0 - self.params.threshold, state, \
            self.readout_cost(h_new)


@hookimpl
def register_exit_criteria():
    return [HiddenDelta, CosineExit, KLExit, MinPKLExit, EntropyExit, ArgmaxExit, MaxProbExit]
