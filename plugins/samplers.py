"""The builtin samplers. Each fills the MASK positions through ``loopsearch.sampling.Denoiser``
(which picks the model and loop count, applies exit criteria and counts the cost) and never
changes a committed token.

- ``ancestral``: the MDLM reverse process for the log-linear schedule (alpha_t = 1 - t). From t
  to s < t on the grid t_i = 1 - i / steps, a masked token is revealed with probability
  (t - s) / t, as a draw from the model's p(x_0), and stays masked with probability s / t; the
  last step (s = 0) reveals every remaining token. One network call per step that still has a
  masked token.
- ``cached``: ancestral that reuses a sequence's last network output while none of its tokens has
  changed (MDLM's ``ddpm_cache``, per sequence rather than per batch: with 32 sequences some
  token of the batch changes at almost every step): the network has no time input, so the same
  input gives the same output. Only the sequences that changed are run (and charged); a step
  where none changed makes no call. The cache is dropped when the loop count or the scheduled
  model changes between steps. Same seed, same samples as ``ancestral``, at a fraction of the
  FLOPs.
- ``confidence``: LLaDA's low-confidence remasking (Nie et al. 2025): every step predicts all
  masked positions and commits a fixed number, the most confident; optional semi-autoregressive
  blocks (``block_length``) are filled left to right, each with an equal share of the steps.
- ``threshold``: Fast-dLLM's parallel decoding (Wu et al. 2025): commit every masked position
  whose confidence exceeds ``threshold``, and at least one per step. ``steps`` is an upper bound
  on calls per generation: a step commits at least remaining / steps-left positions, so with
  steps >= the number of masked positions this is exactly Fast-dLLM.

Randomness is Gumbel noise in float64 (see loopsearch/sampling.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from loopsearch import hookimpl
from loopsearch.sampling import (Denoiser, Sampler, block_ranges, commit_top_k, gumbel, predict, split_steps,
                                 transfer_counts)


class Ancestral(Sampler):
    name = "ancestral"

    def sample(self, x: torch.Tensor, den: Denoiser, steps: int, generator: torch.Generator) -> torch.Tensor:
        for i in range(steps):
            if not (x == den.mask_id).any():
                break
            x = reverse_step(x, den(x, i, steps), i, steps, den.mask_id, generator)
        return x


class Cached(Sampler):
    name = "cached"

    def sample(self, x: torch.Tensor, den: Denoiser, steps: int, generator: torch.Generator) -> torch.Tensor:
        logp, plan = None, None
        stale = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # rows whose cache is invalid
        for i in range(steps):
            if not (x == den.mask_id).any():
                break
            now = den.plan(x, i, steps)
            if logp is None or now[0] is not plan[0] or now[1] != plan[1]:
                logp, plan = den(x, i, steps), now  # first call, or the loop count / model changed
            elif bool(stale.any()):
                logp[stale] = den(x, i, steps, rows=stale)  # only the sequences that changed
            else:
                den.cost.cached_calls += 1
            new = reverse_step(x, logp, i, steps, den.mask_id, generator)
            stale = (new != x).any(dim=1)
            x = new
        return x


def reverse_step(x: torch.Tensor, logp: torch.Tensor, i: int, steps: int, mask_id: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One MDLM reverse step t -> s for the log-linear schedule, on MASK positions only.
    logp: (B, T, V) float64 log p(x_0) with MASK at -inf."""
    t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
    logq = logp + math.log(t - s)  # reveal as token v: p(v) (t - s) / t   (the 1/t cancels)
    logq[..., mask_id] = math.log(s) if s > 0 else -math.inf  # stay masked: s / t
    drawn = (logq + gumbel(logq.shape, generator, logq.device)).argmax(dim=-1)
    return torch.where(x == mask_id, drawn, x)


class ConfidenceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block size in tokens "
                                                              "(None: the whole sequence is one block)")
    temperature: float = Field(0.0, ge=0, description="Gumbel temperature of the token draw; 0 (the default, as "
                                                       "LLaDA and Fast-dLLM decode): greedy argmax")
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence", description="which predictions stay masked: the least confident, or random ones")


class Confidence(Sampler):
    name = "confidence"
    Params = ConfidenceParams

    def sample(self, x: torch.Tensor, den: Denoiser, steps: int, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        B, T = x.shape
        blocks = block_ranges(T, p.block_length)
        step = 0
        for (a, b), n in zip(blocks, split_steps(steps, len(blocks))):
            allowed = torch.zeros_like(x, dtype=torch.bool)
            allowed[:, a:b] = True
            remaining = ((x == den.mask_id) & allowed).sum(dim=1)
            n = min(n, int(remaining.max()))
            if n == 0:
                continue
            counts = transfer_counts(remaining, n)
            for j in range(n):
                token, conf = predict(den(x, step, steps), p.temperature, generator, p.remasking)
                x = commit_top_k(x, token, conf, allowed & (x == den.mask_id), counts[:, j])
                step += 1
        return x


class ThresholdParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(0.9, gt=0, le=1, description="commit every masked position whose confidence "
                                                          "(probability of its predicted token) exceeds this")
    block_length: int | None = Field(None, ge=1, description="semi-autoregressive block size in tokens "
                                                              "(None: the whole sequence is one block)")
    temperature: float = Field(0.0, ge=0, description="Gumbel temperature of the token draw; 0 (the default, as "
                                                       "LLaDA and Fast-dLLM decode): greedy argmax")


class Threshold(Sampler):
    name = "threshold"
    Params = ThresholdParams

    def sample(self, x: torch.Tensor, den: Denoiser, steps: int, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        blocks = block_ranges(x.shape[1], p.block_length)
        step = 0
        for (a, b), n in zip(blocks, split_steps(steps, len(blocks))):
            allowed = torch.zeros_like(x, dtype=torch.bool)
            allowed[:, a:b] = True
            for j in range(n):
                open_ = allowed & (x == den.mask_id)
                remaining = open_.sum(dim=1)
                if not bool(remaining.any()):
                    break
                token, conf = predict(den(x, step, steps), p.temperature, generator)
                quota = -(-remaining // (n - j))  # ceil: the block ends within its steps
                sure = ((conf > p.threshold) & open_).sum(dim=1)
                x = commit_top_k(x, token, conf, open_, torch.maximum(quota, sure))
                step += 1
        return x


@hookimpl
def register_samplers():
    return [Ancestral, Cached, Confidence, Threshold]
