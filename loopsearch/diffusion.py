"""The MDLM objective (Sahoo et al. 2024): masking, SUBS parameterisation, continuous-time ELBO.

Schedule: log-linear, alpha_t = 1 - t, so a token is masked with probability t.
SUBS: the model never predicts MASK (its logit is -inf) and unmasked tokens are copied, so they
cost nothing; only masked positions enter the loss.
ELBO weight: -alpha'_t / (1 - alpha_t) = 1 / t.
Units: every loss here is in nats per token (summed over masked positions, divided by B*T).
Nothing in this module knows about Optuna, files or the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import interrupt
from .errors import LoopsearchError

T_EPS = 1e-3  # smallest mask rate sampled in training (avoids the 1/t blow-up at t -> 0)

# model(x_t, n_loops, t) -> an object with .logits (B, T, V) (loopsearch.looping.ModelOutput)
Model = Callable[..., Any]


def alpha(t: torch.Tensor) -> torch.Tensor:
    """Probability that a token is still clean at time t (log-linear schedule)."""
    return 1.0 - t


def sample_t(batch_size: int, generator: torch.Generator, antithetic: bool = True, eps: float = T_EPS) -> torch.Tensor:
    """Mask rates for a batch. Antithetic (low-discrepancy) sampling: one uniform offset u,
    t_i = (u + i / B) mod 1, which covers [0, 1) evenly and lowers the ELBO's variance."""
    if antithetic:
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(batch_size) / batch_size) % 1.0
    else:
        t = torch.rand(batch_size, generator=generator)
    return eps + (1.0 - eps) * t


EXPECTED_MASKED_SHARE = 0.5  # E[t] for t ~ U[eps, 1] (to 1e-3): the head's expected share in training


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, mask_id: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token of row i independently with probability t[i] (= 1 - alpha_t).
    Returns (x_t, masked) with masked a bool tensor of x0's shape."""
    u = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = u < t.to(x0.device)[:, None]
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Log-probabilities over the clean vocabulary: the MASK logit is removed (-inf)."""
    logits = logits.float()
    logits[..., mask_id] = -math.inf
    return F.log_softmax(logits, dim=-1)


def masked_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(x0) at masked positions (SUBS), zero elsewhere. Shape (B, T), float32."""
    out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    if masked.any():
        lp = subs_log_probs(logits[masked], mask_id)  # (N, V): only masked rows are normalised
        out[masked] = -lp.gather(-1, x0[masked][:, None]).squeeze(-1)
    return out


def positions_nll(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Like ``masked_nll`` for logits computed only at the masked positions ((N, V), row-major order
    of ``masked``, as ``LoopedMDM.forward(..., positions=masked)`` returns them). Shape (B, T)."""
    nll = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    nll[masked] = -subs_log_probs(logits, mask_id).gather(-1, x0[masked][:, None]).squeeze(-1)
    return nll


def elbo(nll: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Continuous-time ELBO estimate in nats/token: mean over (B, T) of nll / t."""
    return (nll / t.to(nll.device)[:, None]).mean()


def diffusion_loss(model: Model, x0: torch.Tensor, mask_id: int, generator: torch.Generator,
                   n_loops: int | None = None, antithetic: bool = True,
                   shard: tuple[int, int] | None = None, positions: bool | None = None,
                   loop_generator: torch.Generator | None = None,
                   targets: bool | None = None) -> tuple[torch.Tensor, Any]:
    """One MDLM training loss (nats/token, plus the strategy's auxiliary loss if any) and the
    model's output (what the loop block executed).

    ``positions``: run the output head only at the masked positions (SUBS gives the others zero
    loss), the model's ``forward(..., positions=)``; default: when the model says it supports it
    (a wrapper such as DDP hides the attribute: the trainer passes it). The loss is the same.
    ``loop_generator``: the stream a strategy draws from inside the loop (``LoopContext.generator``).
    ``targets``: pass the clean tokens to the model (strategies with ``uses_targets`` score readouts of
    intermediate loops); default: when the model's strategy asks (a wrapper hides it: the trainer passes it).
    A per-token ``loss_weight`` in the model's output scales its tokens' losses (a loss over exits).

    ``shard=(rank, world)`` (data parallel): mask rates and masks are drawn for the whole batch,
    as in one process, and only rows [rank*B/world, (rank+1)*B/world) run through the model; the
    mean of the shards' losses is the whole batch's loss."""
    t = sample_t(x0.shape[0], generator, antithetic)
    xt, masked = mask_tokens(x0, t, mask_id, generator)
    if shard is not None:
        rank, world = shard
        rows = slice(rank * x0.shape[0] // world, (rank + 1) * x0.shape[0] // world)
        x0, xt, masked, t = x0[rows], xt[rows], masked[rows], t[rows]
    if positions is None:
        positions = getattr(model, "supports_positions", False)
    extra = {} if loop_generator is None else {"generator": loop_generator}
    if targets is None:
        targets = bool(getattr(getattr(model, "strategy", None), "uses_targets", False))
    if targets:
        extra["targets"] = x0
    if positions:
        out = model(xt, n_loops, t.to(x0.device), positions=masked, **extra)
        nll = positions_nll(out.logits, x0, masked, mask_id)
    else:
        out = model(xt, n_loops, t.to(x0.device), **extra)
        nll = masked_nll(out.logits, x0, masked, mask_id)
    weight = getattr(out, "loss_weight", None)
    if weight is not None:
        nll = nll * weight.to(nll.dtype)
    loss = elbo(nll, t)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + out.aux_loss
    return loss, out


# ---- validation: the ELBO with a known error -------------------------------------------------------
# For the log-linear schedule the continuous-time ELBO of a window of T tokens has an exact
# discrete form (integrate the 1/t weight over t given the number k of masked tokens):
#     ELBO / T = E_{k ~ U{1..T}} E_{M: random k-subset} E_{t ~ Beta(k, T-k+1)} [ mean_{i in M} nll_i(x_M, t) ]
# because the integral of (1/t) C(T,k) t^k (1-t)^(T-k) over t is 1/k and t given k has density
# proportional to t^(k-1) (1-t)^(T-k). Every draw is a mean of per-token losses, bounded, where
# the 1/t-weighted form has a heavy tail at small t (3x the standard deviation at equal cost,
# measured on the quickstart models). t is passed to the model (strategies may use it).

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


def keyed_generator(seed: int, index: int) -> torch.Generator:
    """A generator keyed by (seed, index): distinct keys give unrelated streams."""
    key = (seed * _MIX[0] + (index + 1) * _MIX[1]) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(key)


def window_generator(seed: int, window: int) -> torch.Generator:
    """The random stream of one validation window: keyed by (seed, window index in the split),
    so a window's masks do not depend on the batch size, the window count or the other windows.
    Draw r of a window uses the r-th chunk of its stream (independent of how many draws follow)."""
    return keyed_generator(seed, window)


def validation_masks(x0: torch.Tensor, keys: list[int], draws: int, seed: int, mask_id: int):
    """(x_t, masked, t, k) for ``draws`` independent draws of every window (rows window-major:
    row w * draws + r). k ~ U{1..T} masked tokens, a uniformly random k-subset, t ~ Beta(k, T-k+1)
    (the k-th order statistic of T uniforms)."""
    n, length = x0.shape
    u = torch.stack([torch.rand(draws, 1 + 2 * length, generator=window_generator(seed, key))
                     for key in keys])  # (W, R, 1+2T)
    u = u.view(n * draws, 1 + 2 * length)
    k = (u[:, 0] * length).long().clamp(0, length - 1) + 1
    ranks = u[:, 1:1 + length].argsort(-1).argsort(-1)
    masked = ranks < k[:, None]
    t = u[:, 1 + length:].sort(-1).values.gather(-1, (k - 1)[:, None]).squeeze(-1)
    x = x0.repeat_interleave(draws, dim=0)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked, t, k


@dataclass
class Validation:
    """A validation estimate: ``nll`` (nats/token), its Monte-Carlo standard error ``se`` given the
    windows, and the per-(window, draw) values (W, draws) that paired differences need."""

    nll: float
    se: float
    values: torch.Tensor  # (W, draws) float64, on the CPU
    keys: list[int]  # the windows' indices in the split

    @property
    def draws(self) -> int:
        return int(self.values.shape[1])

    def flat(self, digits: int = 6) -> list[float]:
        """Window-major values, rounded (what a trial stores for paired comparisons)."""
        return [round(float(v), digits) for v in self.values.reshape(-1)]


@torch.no_grad()
def validation_elbo(model: Model, windows: torch.Tensor, keys: list[int], mask_id: int, draws: int = 2,
                    seed: int = 0, batch_size: int = 64, n_loops: int | None = None, **model_kwargs) -> Validation:
    """The ELBO on held-out windows (W, T) in nats/token with its standard error: ``draws``
    independent (k, mask, t) draws per window (see above), keyed by (seed, window), so two models,
    or one model at two loop counts, are scored on identical inputs and their difference is paired.
    The standard error is the masks' noise given the windows (loopsearch/stats.py: window_interval)."""
    from .stats import window_interval

    if draws < 2:
        raise LoopsearchError(f"validation needs >= 2 mask draws per window for a standard error, got {draws}")
    xt, masked, t, k = validation_masks(windows.cpu(), keys, draws, seed, mask_id)
    device = windows.device
    x = windows.cpu().repeat_interleave(draws, dim=0)
    values = []
    for i in range(0, x.shape[0], batch_size):
        interrupt.check()
        rows = slice(i, i + batch_size)
        x0, m = x[rows].to(device), masked[rows].to(device)
        if getattr(model, "supports_positions", False):  # the head only where the loss is
            out = model(xt[rows].to(device), n_loops, t[rows].to(device), positions=m, **model_kwargs)
            nll = positions_nll(out.logits, x0, m, mask_id)
        else:
            out = model(xt[rows].to(device), n_loops, t[rows].to(device), **model_kwargs)
            nll = masked_nll(out.logits, x0, m, mask_id)
        values.append(nll.sum(-1).double().cpu() / k[rows])
    vals = torch.cat(values).view(len(keys), draws)
    ci = window_interval(vals.reshape(-1).tolist(), draws)
    return Validation(ci.mean, ci.se, vals, list(keys))
