"""Inference-time exit criteria for looped blocks: stop looping once another loop would not help.

One small interface, used by every strategy that runs its loop through
``loopsearch.looping.run_with_exit`` (and by any sampler that passes ``exit=`` to the model)::

    crit = Criterion(params, readout_flops, mask_id=None)
    state = crit.init(h)                      # h: the loop block's input (B, T, d)
    stop, state, extra = crit.check(h_prev, h_new, state, ctx)
        # stop: (B,) bool, one decision per sequence; the loop ends when every sequence says stop
        # extra: forward FLOPs per sequence this check cost beyond the loop block (readouts)

``readout_flops`` is the forward cost per sequence of one ``ctx.readout(h)`` (coda + head,
``LoopedMDM.readout_flops(seq_len)``): a float, or a callable of the sequence length.
``mask_id`` (the backbone's MASK token) lets criteria that read predictions drop the MASK
logit, as the SUBS parameterisation does (the model never predicts MASK).

Decisions are per sequence, taken over the sequence's MASKED positions (``ctx.masked``; all
positions if it is None): only those are predicted. A sequence with no masked position has
nothing left to decide and says stop. Stops are sticky: once a sequence has said stop it keeps
saying so (it would have exited there; the batch may run on for the others).

Builtins, in plugins/exits.py (the recurrent-depth criteria, Geiping et al. 2025; LoopMDM's adaptive looping is
``hidden_delta``):

- ``hidden_delta``: relative change ||h_new - h_prev|| / ||h_prev|| per token below ``tol``; free.
- ``kl``: KL(p_k || p_{k-1}) between successive predictive distributions below ``tol``; every
  check pays one readout (the first too: it is needed for the second), so ``extra`` is
  ``readout_flops`` per check. It can stop at loop 2 at the earliest.
- ``argmax``: the predicted token at every masked position unchanged for ``patience``
  consecutive loops; one readout per check, like ``kl``.
- ``cosine``: 1 - cos(h_new, h_prev) per token below ``tol``; free, blind to a change of scale.
- ``min_p_kl``: Huginn's min-p KL: probabilities below ``min_p`` x the largest floored to 1/V, then
  KL(p_{k-1} || p_k) below ``tol``; one readout per check.
- ``entropy``: the change of the predictive entropy |H_k - H_{k-1}| below ``tol``; one readout per check.
- ``max_prob``: a confidence readout: the largest predictive probability at every masked position
  (``reduce = max``) or on average (``mean``) at least ``threshold``; one readout per check, and it
  can stop after the first loop.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import SpecError
from .registry import get_registry

ReadoutFlops = float | Callable[[int], float]


class ExitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_loops: int = Field(1, ge=1, description="never stop before this many loops have run")


class ExitCriterion:
    """Base class of the builtin exit criteria (register classes with ``register_exit_criteria``).

    Subclasses set ``name`` and ``Params`` and implement ``converged``; this class keeps the
    loop count, applies ``min_loops`` and makes stops sticky. Any class with the same
    constructor, ``init`` and ``check`` works as a criterion: it need not subclass this one.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = ExitParams

    def __init__(self, params: BaseModel, readout_flops: ReadoutFlops = 0.0, mask_id: int | None = None):
        self.params = params
        self.readout_flops = readout_flops
        self.mask_id = mask_id

    def readout_cost(self, h: torch.Tensor) -> float:
        """Forward FLOPs per sequence of one ``ctx.readout(h)``."""
        r = self.readout_flops
        return float(r(h.shape[1]) if callable(r) else r)

    def init(self, h: torch.Tensor) -> dict[str, Any]:
        return {"k": 0, "done": torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)}

    @torch.no_grad()
    def check(self, h_prev: torch.Tensor, h_new: torch.Tensor, state: dict[str, Any],
              ctx) -> tuple[torch.Tensor, dict, float]:
        state = {**state, "k": state["k"] + 1}
        now, state, extra = self.converged(h_prev, h_new, state, ctx)
        if state["k"] >= self.params.min_loops:
            state["done"] = state["done"] | now
        return state["done"], state, extra

    def converged(self, h_prev: torch.Tensor, h_new: torch.Tensor, state: dict[str, Any],
                  ctx) -> tuple[torch.Tensor, dict, float]:
        """(B,) bool: has each sequence converged at this loop? Plus the state and the extra
        FLOPs per sequence the test cost. ``state["k"]`` is the number of loops run so far."""
        raise NotImplementedError

    # ---- helpers ------------------------------------------------------------------------------
    def log_probs(self, ctx, h: torch.Tensor) -> torch.Tensor:
        """Predictive log-probabilities (B, T, V) from the block output, MASK logit dropped."""
        if ctx.readout is None:
            raise SpecError(f"exit criterion {self.name!r} reads predictions, but this strategy gives no readout")
        logits = ctx.readout(h).float()
        m = self.mask_id
        if m is not None and 0 <= m < logits.shape[-1]:
            logits = torch.cat((logits[..., :m], logits[..., m + 1:]), dim=-1)
        return torch.log_softmax(logits, dim=-1)


def reduce_masked(values: torch.Tensor, masked: torch.Tensor | None, how: str) -> torch.Tensor:
    """Per-token values (B, T) -> (B,) max or mean over each sequence's masked positions
    (0 for a sequence without any, so that it says stop)."""
    m = torch.ones_like(values, dtype=torch.bool) if masked is None else masked.to(values.device)
    if how == "max":
        return values.masked_fill(~m, float("-inf")).amax(dim=-1).clamp_min(0.0)
    return (values * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1)


# ---- building criteria ----------------------------------------------------------------------------
def exit_params(name: str, params: dict | None = None) -> tuple[type, BaseModel]:
    """Look an exit criterion up and validate its parameters: one-line errors for an unknown
    name (listing the available ones) or bad parameters (naming the accepted ones)."""
    reg = get_registry()
    return reg.get("exit_criterion", name), reg.params("exit_criterion", name, params)


def make_exit(name: str, params: dict | None, model, seq_len: int | None = None):
    """An exit criterion for ``model`` (a LoopedMDM): the readout cost comes from the model, at
    ``seq_len`` if given, else at the length of whatever sequences it is run on."""
    readout = model.readout_flops(seq_len) if seq_len is not None else model.readout_flops
    return get_registry().build("exit_criterion", name, params, readout,
                                mask_id=getattr(model.backbone, "mask_id", None))


def parse_exit(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME' or 'NAME:key=value,key=value' -> (name, {key: value}); values stay strings
    (the criterion's Params convert them)."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"cannot read exit {spec!r}: {part!r} is not key=value; "
                            f"write NAME or NAME:key=value,key=value, e.g. hidden_delta:tol=0.01")
        params[key.strip()] = value.strip()
    if not name:
        raise SpecError(f"cannot read exit {spec!r}; write NAME or NAME:key=value, e.g. hidden_delta:tol=0.01")
    return name, params


ExitSpec = tuple[str, dict]


def check_exits(exits: list[ExitSpec] | None) -> list[tuple[str, str, dict]]:
    """Validate exit criteria before any work: [(label, name, params)] (one-line errors)."""
    out = []
    for name, params in exits or []:
        _, p = exit_params(name, params)
        out.append((exit_label(name, p), name, dict(params or {})))
    return out


def exit_label(name: str, params: BaseModel) -> str:
    """A canonical label of a criterion and the parameters set explicitly: 'kl:tol=0.001'."""
    given = params.model_dump(exclude_unset=True)
    return name + (":" + ",".join(f"{k}={v}" for k, v in sorted(given.items())) if given else "")
