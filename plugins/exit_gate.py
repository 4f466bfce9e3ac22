"""The ``exit_gate`` looping strategy: a learned exit gate in the style of Ouro / LoopLM (arXiv 2510.25741).

After every loop k of the block (up to ``n_loops`` = K) a gate gives every token an exit
probability ``lambda_k = sigmoid(gate(rms_norm(h_k)))``. The exit distribution over loops is
``p_k = lambda_k * prod_{j<k} (1 - lambda_j)`` for k < K and the rest, ``prod_{j<K} (1 - lambda_j)``,
at the cap K (no gate runs there), so it sums to 1 for every token.

**Training** runs all K loops and trains the model and the gate on Ouro's objective, the expected
loss over exits minus an entropy bonus:

    L = sum_k p_k * L_k  -  beta * H(p),      H(p) = -sum_k p_k log p_k  (per masked token; averaged
                                                                     over all B x T positions, as the ELBO)

where ``L_k`` is the trainer's own MDLM loss (SUBS, nll / t at masked positions) of a readout at loop
k: the coda and the output head run on ``h_k`` (``ctx.readout``). The strategy computes the terms of
loops 1..K-1 itself (it needs the clean tokens: ``uses_targets``) and returns them with the entropy
bonus as ``aux_loss``; the cap loop's term is the trainer's own loss on the model's output, weighted
per token by ``p_K`` (``LoopResult.loss_weight``), so no readout runs twice. The entropy bonus keeps
the gate from collapsing onto the first loops (Ouro's fix for PonderNet's geometric prior); ``beta``
sets its weight. The gate starts with weight 0 and bias ``init_bias`` (lambda = sigmoid(init_bias)).

**Inference** (validation, sampling) exits each masked token at the first loop whose cumulative exit
probability reaches ``threshold`` (Ouro's CDF rule, q), or at the cap. An exited token's state is
frozen (masking, not skipping: it still goes through the block with the batch, as in ``halting``);
unmasked positions are context and keep looping with the batch. The batch stops when every masked
token has exited. This differs from training, where every token sees every loop: the same
train/inference gap Ouro has.

**FLOPs, of what runs.** A training step executes K block applications, K - 1 gates
(``2 T d_model`` forward FLOPs per sequence each) and K - 1 readouts (``ctx.readout_flops``: the coda
and the head on all T positions); gates and readouts are ``extra_flops``, charged 3x in training like
everything that is differentiated. Inference executes the loops it ran and one gate per loop before
the cap; no readouts. ``extra_flops_bound(n, T)`` is the training cost, ``inference_extra_flops_bound``
the inference one (gates only). Each readout keeps a (B, T, V) log-softmax for backward: memory grows
with ``n_loops`` times the vocabulary, the price of Ouro's objective.
Sigmoids, logs and products are elementwise: 0 FLOPs by flops.py's convention.

With an inference-time exit criterion (``ctx.exit``) the gate is not used and the loop stops by the
criterion (``run_with_exit``): a post-hoc readout baseline against the learned gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from loopsearch import hookimpl
from loopsearch.diffusion import subs_log_probs
from loopsearch.errors import SpecError
from loopsearch.looping import BlockFn, EveryStepRunsAllLoops, LoopContext, LoopResult, LoopStrategy, run_with_exit

EPS = 1e-9  # inside the log of the entropy bonus


class ExitGateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_loops: int = Field(4, ge=1, le=64, description="most loops (K): every training step runs all of them; "
                                                       "inference stops earlier where the gate says so")
    beta: float = Field(0.05, ge=0.0, le=10.0, description="weight of the entropy bonus on the exit distribution "
                                                          "(Ouro's regulariser; 0: the plain expected loss)")
    threshold: float = Field(0.5, gt=0.0, le=1.0, description="inference: a token exits at the first loop whose "
                                                              "cumulative exit probability reaches this (Ouro's q)")
    init_bias: float = Field(-1.0, ge=-20.0, le=20.0, description="initial bias of the gate (its weight starts at "
                                                                  "0): exit probability sigmoid(init_bias) per loop")


class ExitGate(EveryStepRunsAllLoops, LoopStrategy):
    """Ouro-style learned exit gate (see the module docstring)."""

    name = "exit_gate"
    draws_in_run = False  # nothing random inside run(): no generator needed (compile-friendly)
    Params = ExitGateParams
    uses_targets = True

    def __init__(self, params: ExitGateParams, d_model: int):
        super().__init__(params, d_model)
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, params.init_bias)
        self._readout_flops = None  # set by attach: seq_len -> FLOPs of one readout

    def attach(self, model) -> None:
        self._readout_flops = model.readout_flops

    # ---- FLOPs ----------------------------------------------------------------------------------
    def gate_flops(self, seq_len: int) -> float:
        """Forward FLOPs per sequence of one gate: 2 * T * d_model."""
        return 2.0 * seq_len * self.d_model

    def readout_cost(self, seq_len: int) -> float:
        if self._readout_flops is None:
            raise SpecError("exit_gate: the strategy is not attached to a model (LoopedMDM attaches it)")
        return float(self._readout_flops(seq_len))

    def extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        """A training step's gates and readouts (one each per loop before the cap)."""
        return max(n_loops - 1, 0) * (self.gate_flops(seq_len) + self.readout_cost(seq_len))

    def inference_extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        """Inference runs the gates only (no readouts)."""
        return max(n_loops - 1, 0) * self.gate_flops(seq_len)

    # ---- the loop -------------------------------------------------------------------------------
    def exit_prob(self, h: torch.Tensor) -> torch.Tensor:
        """lambda = sigmoid(gate(rms_norm(h))), float32 of shape h.shape[:-1]."""
        return torch.sigmoid(self.gate(F.rms_norm(h, (h.shape[-1],))).squeeze(-1).float())

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        if ctx.exit is not None:
            return run_with_exit(h, block, n_loops, ctx)
        if n_loops <= 1:
            for _ in range(n_loops):
                h = block(h)
            return LoopResult(h, float(n_loops), stats={"mean_token_loops": float(n_loops)})
        if ctx.training:
            return self._train(h, block, n_loops, ctx)
        return self._infer(h, block, n_loops, ctx)

    def _train(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        if ctx.targets is None or ctx.t is None or ctx.masked is None or ctx.readout is None:
            raise SpecError("exit_gate trains on the loss of every exit: the trainer must pass the clean tokens "
                            "(diffusion_loss(..., targets=True)), the mask rates and a readout")
        B, T = h.shape[:2]
        masked = ctx.masked.to(h.device)
        t = ctx.t.to(h.device).float()[:, None]
        survive = torch.ones(B, T, dtype=torch.float32, device=h.device)
        expected = torch.zeros((), dtype=torch.float32, device=h.device)
        entropy = torch.zeros(B, T, dtype=torch.float32, device=h.device)
        weights = []
        for k in range(n_loops):
            h = block(h)
            if k == n_loops - 1:  # the cap: the rest of the mass; its loss is the trainer's (loss_weight)
                p = survive
            else:
                lam = self.exit_prob(h)
                p, survive = survive * lam, survive * (1.0 - lam)
                # (B, T), 0 where unmasked; dense (no data-dependent shapes: torch.compile-friendly)
                lp = subs_log_probs(ctx.readout(h), ctx.mask_id)
                nll = -lp.gather(-1, ctx.targets[..., None]).squeeze(-1) * masked
                expected = expected + (p * nll / t).mean()  # the trainer's ELBO units: mean over (B, T) of nll / t
            entropy = entropy - p * torch.log(p + EPS)
            weights.append(p.detach())
        n_masked = masked.sum().clamp(min=1)
        # a mean over all (B, T) positions (unmasked ones add 0), like the ELBO: additive over DDP shards
        bonus = (entropy * masked).mean()
        w = torch.stack(weights)  # (K, B, T)
        k_mean = (w * torch.arange(1, n_loops + 1, device=h.device, dtype=w.dtype)[:, None, None]).sum(0)
        stats = {"mean_exit_loop": float((k_mean * masked).sum() / n_masked),
                 "exit_entropy": float((entropy.detach() * masked).sum() / n_masked)}
        extra = (n_loops - 1) * (self.gate_flops(T) + float(ctx.readout_flops))
        return LoopResult(h, float(n_loops), extra_flops=extra, aux_loss=expected - self.params.beta * bonus,
                          stats=stats, loss_weight=p)

    def _infer(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        B, T = h.shape[:2]
        masked = (torch.ones(B, T, dtype=torch.bool, device=h.device) if ctx.masked is None
                  else ctx.masked.to(h.device).bool())
        running = masked.clone()  # masked tokens that have not exited; the others are context
        cdf = torch.zeros(B, T, dtype=torch.float32, device=h.device)
        survive = torch.ones_like(cdf)
        exit_loop = torch.full_like(cdf, float(n_loops))
        loops = gates = 0
        for k in range(n_loops):
            new = block(h)
            loops += 1
            h = new if k == 0 else torch.where(running[..., None] | ~masked[..., None], new, h)  # exited: frozen
            if k == n_loops - 1 or not bool(running.any()):
                break
            lam = self.exit_prob(h)
            gates += 1
            p, survive = survive * lam, survive * (1.0 - lam)
            cdf = cdf + p
            now = running & (cdf >= self.params.threshold)
            exit_loop = torch.where(now, torch.full_like(exit_loop, float(k + 1)), exit_loop)
            running = running & ~now
            if not bool(running.any()):
                break
        exit_loop = torch.where(running | ~masked, torch.full_like(exit_loop, float(loops)), exit_loop)
        sel = masked if bool(masked.any()) else torch.ones_like(masked)
        stats = {"mean_token_loops": float(exit_loop[sel].mean()), "loops_run": float(loops)}
        return LoopResult(h, float(loops), extra_flops=gates * self.gate_flops(T), stats=stats)


@hookimpl
def register_loop_strategies():
    return [ExitGate]
