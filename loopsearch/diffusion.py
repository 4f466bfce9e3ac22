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
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from . import interrupt

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


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


def elbo(nll: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Continuous-time ELBO estimate in nats/token: mean over (B, T) of nll / t."""
    return (nll / t.to(nll.device)[:, None]).mean()


def diffusion_loss(model: Model, x0: torch.Tensor, mask_id: int, generator: torch.Generator,
                   n_loops: int | None = None, antithetic: bool = True,
                   shard: tuple[int, int] | None = None) -> tuple[torch.Tensor, Any]:
    """One MDLM training loss (nats/token, plus the strategy's auxiliary loss if any) and the
    model's output (what the loop block executed).

    ``shard=(rank, world)`` (data parallel): mask rates and masks are drawn for the whole batch,
    as in one process, and only rows [rank*B/world, (rank+1)*B/world) run through the model; the
    mean of the shards' losses is the whole batch's loss."""
    t = sample_t(x0.shape[0], generator, antithetic)
    xt, masked = mask_tokens(x0, t, mask_id, generator)
    if shard is not None:
        rank, world = shard
        rows = slice(rank * x0.shape[0] // world, (rank + 1) * x0.shape[0] // world)
        x0, xt, masked, t = x0[rows], xt[rows], masked[rows], t[rows]
    out = model(xt, n_loops, t.to(x0.device))
    loss = elbo(masked_nll(out.logits, x0, masked, mask_id), t)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + out.aux_loss
    return loss, out


def t_grid(n_points: int) -> torch.Tensor:
    """Midpoints of n equal bins of (0, 1): the fixed t grid of the validation ELBO."""
    return (torch.arange(n_points, dtype=torch.float32) + 0.5) / n_points


@torch.no_grad()
def validation_nll(model: Model, batches: Iterable[torch.Tensor], mask_id: int, n_t: int = 8,
                   seed: int = 1234, n_loops: int | None = None, **model_kwargs) -> float:
    """The ELBO on held-out data, nats/token: for every batch and every t of a fixed grid,
    mask with a fixed seed and average nll / t (a midpoint rule for the integral over t).
    The same seed gives the same masks, so two models are compared on identical inputs."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for x0 in batches:
        interrupt.check()
        for t in t_grid(n_t):
            tt = t.expand(x0.shape[0])
            xt, masked = mask_tokens(x0, tt, mask_id, generator)
            out = model(xt, n_loops, tt.to(x0.device), **model_kwargs)
            total += elbo(masked_nll(out.logits, x0, masked, mask_id), tt).item() * x0.shape[0]
            count += x0.shape[0]
    return total / max(count, 1)
