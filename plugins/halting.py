"""The ``halting`` looping strategy: learned per-token halting, ACT family (Graves 2016).

A halting head (one ``nn.Linear(d_model, 1)`` on the parameter-free RMS-normalised output of the
loop block) gives every token a halting probability after every loop,
``p_k = sigmoid(head(rms_norm(h_k)))``, for at most ``n_loops`` loops. The head is a submodule
of the strategy, so it is part of ``model.parameters()``, trained with the model and saved in
its checkpoints.

Which family, and why: ACT (Adaptive Computation Time, Graves 2016; as in the Universal
Transformer, Dehghani et al. 2018), not PonderNet (Banino et al. 2021).

- ACT reads out once. The loop block's output is the ACT mean ``h = sum_k w_k h_k`` and the
  coda and LM head run on it once, so a training step costs ``n_loops`` block applications
  plus ``n_loops - 1`` tiny halting heads (2 * d_model FLOPs per token each). PonderNet's loss
  is ``sum_k p(halt at k) * loss(readout(h_k))``: it needs a readout (coda + vocabulary head) per
  loop, i.e. ``n_loops`` codas and LM heads per step, which a FLOP budget pays for in fewer
  steps.
- ACT halts deterministically, and training uses the same rule as inference (below), so the
  network trained is exactly the network evaluated. PonderNet trains an expectation over
  sampled halting steps and infers with a sampled or thresholded step.
- PonderNet's KL to a geometric prior moves halting mass towards the first loops and
  under-trains the deep ones (the pitfall Ouro avoids with an entropy-regularised exit gate
  under a uniform prior). ACT has a related bias, since its ponder cost rewards halting early,
  but only as strong as ``ponder_cost`` (tau), which the search space searches on a log scale
  down to 1e-3. ``init_bias`` sets the first halting probabilities: at the default -1.0 every
  token starts with p = 0.27 per loop and halts at loop 4, so the first loops all get weight
  from the start. With tau near 0 it is plain ACT mixing with no pressure to stop early.

The ACT rule, per token (threshold = 1 - epsilon, ``threshold``). N is the first loop k with
``p_1 + ... + p_k >= threshold``, or ``n_loops`` (the cap) if none comes first. The weights
are ``w_k = p_k`` for k < N, the remainder ``R = 1 - (p_1 + ... + p_{N-1})`` at N, and 0 after
N, so they are non-negative and sum to 1. The ponder cost is ``N + R``; R carries the
gradient. ``aux_loss = ponder_cost * mean over MASKED positions of (N + R)``.
The head does not run on the cap loop (halting is forced there whatever p says), and it does
not run when ``n_loops`` is 1.

Halted tokens are frozen: once a token has halted, its state stops changing (``h_{k+1} = h_k``
for that row) and it gets no more weight. Its row still goes through the block with the
others (masking, not skipping): attention mixes tokens, so a still-running token attends to
the halted token's frozen state. This is the Universal Transformer's treatment, and training
and inference both apply it.

Only masked positions loop. Under SUBS an unmasked token is copied to the output, so its
prediction is never used. Unmasked positions halt after the first loop with weight 1. Every
position needs one loop because the masked tokens attend to the block output at unmasked
positions. After that loop their state is frozen, they are left out of the ponder cost, and
their halting probability on loop 1 is ignored. With ``ctx.masked`` unknown (None), every
position is treated as masked.

Training (``ctx.training``) runs all ``n_loops`` loops on every token, halted or not. That
needs no host sync and no data-dependent control flow (``torch.compile``-friendly), and the
step's FLOPs are known before it runs. Since halted tokens are frozen and get no more weight,
the training-mode output equals the inference-mode output exactly; only the number of loops
executed differs. ``train_loops``, ``max_train_loops``, ``expected_train_loops`` and
``eval_loops`` are all ``n_loops``.

Inference (not training) stops the loop for the whole batch once every token of the batch has
halted (all unmasked tokens halt at loop 1), or at the cap. The cap is ``n_loops`` as passed
to the model (``n_loops`` by default). Tokens that halted earlier are still computed until
then (masking).

FLOP accounting, of what is actually executed: halted tokens are still computed (masking,
not skipping). Every loop that runs is charged for every token of every sequence in the
batch, whether or not the token had halted. ``LoopResult.applications`` is the number of loops
executed for the batch (``stats["loops_run"]``), NOT the mean number of loops the tokens used
(``stats["mean_token_loops"]``, over masked tokens; informative only, never used for FLOPs).
``extra_flops`` is the halting head's forward cost per sequence,
``2 * seq_len * d_model`` per loop in which the head ran: every executed loop except the cap
loop, which halts every running token anyway. ``extra_flops_bound(n, T)`` is
``2 * T * d_model * (n - 1)``: exactly what a training step with n loops executes, and an upper
bound at inference. The RMS norm, sigmoid and weighted sums are elementwise, so by flops.py's
convention (and torch.utils.flop_counter's) they cost 0 FLOPs.

With an exit criterion (``ctx.exit``, see loopsearch/exits.py) the halting head is not used:
the strategy runs ``run_with_exit`` exactly like ``fixed`` (the block output after the last
loop, stopped by the criterion). That is not the ACT mean the model was trained to read out, so
it is a comparison, not the strategy's own inference mode.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from loopsearch import hookimpl
from loopsearch.looping import (BlockFn, EveryStepRunsAllLoops, LoopContext, LoopResult, LoopStrategy, renamed_params,
                                run_with_exit)


class HaltingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old_names: ClassVar[dict[str, str]] = {"max_loops": "n_loops"}  # accepted, with a deprecation line

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        return renamed_params(data, cls.old_names, "halting strategy")
    n_loops: int = Field(4, ge=1, le=64, description="most loop-block applications (loops) a token can use; "
                                                       "every training step runs this many")
    threshold: float = Field(0.99, gt=0.0, le=1.0, description="a token halts once its cumulative halting "
                                                               "probability reaches this (ACT's 1 - epsilon)")
    ponder_cost: float = Field(0.01, ge=0.0, description="tau: weight of the ACT ponder cost (N + R, mean over "
                                                         "masked tokens) added to the training loss")
    init_bias: float = Field(-1.0, ge=-20.0, le=20.0, description="initial bias of the halting head (its weight "
                                                                  "starts at 0): p = sigmoid(init_bias) per loop "
                                                                  "at first; negative means more loops early on")


def act_step(cum: torch.Tensor, running: torch.Tensor, p: torch.Tensor, threshold: float,
             force: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ACT step for every token. ``cum``: sum of the token's earlier weights; ``running``:
    bool, not yet halted; ``p``: halting probability of this loop, in [0, 1]; ``force``: bool,
    halt these running tokens now whatever p says (the cap loop, unmasked positions).
    Returns (w, halt_now): this loop's weight (p, the remainder 1 - cum when halting, 0 when
    already halted) and which tokens halt at this loop."""
    reached = cum + p >= threshold
    halt_now = running & (reached if force is None else reached | force)
    w = torch.where(halt_now, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))
    return w, halt_now


def act_weights(p: torch.Tensor, threshold: float, first_halt: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ACT weights for halting probabilities ``p`` of shape (K, ...) (loop k = p[k - 1]).
    ``first_halt``: bool of shape p.shape[1:], tokens forced to halt at loop 1 (unmasked ones).
    Returns (w (K, ...), n (...) the loop each token halted at (1..K), r (...) its remainder).
    The same ``act_step`` rule as ``Halting.run``; p[K - 1] is never read (the cap is forced)."""
    K = p.shape[0]
    cum = torch.zeros_like(p[0])
    running = torch.ones(p.shape[1:], dtype=torch.bool, device=p.device)
    n, r, ws = torch.zeros_like(p[0]), torch.zeros_like(p[0]), []
    for k in range(K):
        force = running if k == K - 1 else (first_halt if k == 0 else None)
        w, halt_now = act_step(cum, running, p[k], threshold, force)
        ws.append(w)
        n = torch.where(halt_now, torch.full_like(n, k + 1), n)
        r = torch.where(halt_now, w, r)
        cum, running = cum + w, running & ~halt_now
    return torch.stack(ws), n, r


class Halting(EveryStepRunsAllLoops, LoopStrategy):
    """Per-token ACT halting over up to ``n_loops`` loops (see the module docstring)."""

    name = "halting"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    Params = HaltingParams

    def __init__(self, params: HaltingParams, d_model: int):
        super().__init__(params, d_model)
        self.head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.head.weight)  # p = sigmoid(init_bias) for every token at first
        nn.init.constant_(self.head.bias, params.init_bias)

    # loop counts (EveryStepRunsAllLoops): training always runs every loop (halted tokens are masked)

    def extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        return self.head_flops(seq_len) * max(n_loops - 1, 0)

    def head_flops(self, seq_len: int) -> float:
        """Forward FLOPs per sequence of one halting-head application: 2 * T * d_model."""
        return 2.0 * seq_len * self.d_model

    def halting_prob(self, h: torch.Tensor) -> torch.Tensor:
        """p = sigmoid(head(rms_norm(h))), float32 of shape h.shape[:-1], in [0, 1]."""
        z = F.rms_norm(h, (h.shape[-1],))
        return torch.sigmoid(self.head(z).squeeze(-1).float())

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        if ctx.exit is not None:
            return run_with_exit(h, block, n_loops, ctx)
        if n_loops <= 0:
            return LoopResult(h, 0.0, stats={"mean_token_loops": 0.0, "loops_run": 0.0})
        B, T = h.shape[:2]
        masked = (torch.ones(B, T, dtype=torch.bool, device=h.device) if ctx.masked is None
                  else ctx.masked.to(h.device).bool())
        threshold = self.params.threshold
        running = torch.ones(B, T, dtype=torch.bool, device=h.device)
        cum = torch.zeros(B, T, dtype=torch.float32, device=h.device)
        steps, remainder = torch.zeros_like(cum), torch.zeros_like(cum)
        acc = torch.zeros_like(h)
        s, loops, heads = h, 0, 0
        for k in range(n_loops):
            new = block(s)
            loops += 1
            s = new if k == 0 else torch.where(running[..., None], new, s)  # halted rows frozen
            if k == n_loops - 1:  # the cap: every running token halts, p is not needed
                p, force = torch.zeros_like(cum), running
            else:
                p, heads = self.halting_prob(s), heads + 1
                force = ~masked if k == 0 else None  # unmasked positions halt after one loop
            w, halt_now = act_step(cum, running, p, threshold, force)
            acc = acc + w.to(s.dtype)[..., None] * s
            steps = torch.where(halt_now, torch.full_like(steps, k + 1), steps)
            remainder = torch.where(halt_now, w, remainder)
            cum, running = cum + w, running & ~halt_now
            if not ctx.training and not bool(running.any()):
                break
        sel = masked if bool(masked.any()) else torch.ones_like(masked)
        stats = {"mean_token_loops": float(steps.detach()[sel].mean()), "loops_run": float(loops)}
        aux = None
        if ctx.training:
            ponder = ((steps + remainder) * masked).sum() / masked.sum().clamp(min=1)
            aux = self.params.ponder_cost * ponder
            stats["ponder"] = float(ponder.detach())
        return LoopResult(acc, float(loops), extra_flops=self.head_flops(T) * heads, aux_loss=aux, stats=stats)


@hookimpl
def register_loop_strategies():
    return [Halting]
