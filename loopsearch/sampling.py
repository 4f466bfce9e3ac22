"""Where samples are generated: the sampler interface, loop schedules and the cost of a sample.

A sampler turns a sequence with MASK at the positions to generate (``make_init``: a prefix, a
suffix for infilling, or nothing) into one without MASK, by calling the denoising network a
number of times. With a looped model, network calls are not cost: a call at 8 loops costs more
than one at 2. So every call goes through a ``Denoiser``, which

- picks the model for the step (a *model schedule*: another trial's model for a range of steps,
  as in the model-scheduling paper, arXiv 2604.02340),
- picks the loop count for the step (a *loop schedule*: constant, decreasing, increasing or
  middle-heavy in the step index or the current mask rate; LoopMDM's "adaptive looping during
  sampling"), optionally capped by an inference-time exit criterion (loopsearch/exits.py),
- drops the MASK logit (SUBS: the model never predicts MASK) and returns float64 log-probs,
- and charges what ran to a ``SampleCost``: network calls, loop-block applications and FLOPs
  from the one FLOP accounting (``LoopedMDM.inference_flops_per_token`` with the applications
  and extra FLOPs the forward pass reports), plus wall time.

Samplers are plugins (``register_samplers``; builtins in plugins/samplers.py): a class with a
``name``, a pydantic ``Params`` and ``sample(x, denoiser, steps, generator) -> x``. Every random
draw comes from ``generator`` (a CPU ``torch.Generator`` seeded by ``generate``) in float64 —
Gumbel noise in lower precision distorts samples and their perplexity (Zheng et al. 2024) —
so a seed gives the same samples on any device.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import LoopsearchError, SpecError
from .exits import check_exits, make_exit
from .looping import NoParams
from .registry import get_registry


# ---- loop schedules --------------------------------------------------------------------------------
class LoopSchedule(BaseModel):
    """Loops per network call as a function of progress through sampling.

    ``by = "step"``: progress x = step / (steps - 1); ``by = "mask_rate"``: x = 1 - the current
    share of masked positions among those to generate (0 at the start, 1 at the end).
    ``constant`` runs ``max_loops``; ``decreasing`` goes from ``max_loops`` (x = 0, heavily
    masked) to ``min_loops`` (x = 1); ``increasing`` the reverse; ``middle`` is a tent with
    ``max_loops`` at x = 0.5 and ``min_loops`` at both ends (where LoopMDM found looping helps
    most: intermediate denoising steps). ``max_loops = None``: the model's own inference count.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["constant", "decreasing", "increasing", "middle"] = "constant"
    min_loops: int = Field(1, ge=1, le=256, description="fewest loops a call gets")
    max_loops: int | None = Field(None, ge=1, le=256, description="most loops a call gets (None: the model's own)")
    by: Literal["step", "mask_rate"] = Field("step", description="progress measured in steps or in mask rate")

    @model_validator(mode="after")
    def _ordered(self):
        if self.max_loops is not None and self.min_loops > self.max_loops:
            raise ValueError(f"min_loops={self.min_loops} is above max_loops={self.max_loops}")
        return self

    def loops_at(self, progress: float, default: int) -> int:
        """Loop count at progress x in [0, 1]; ``default`` stands in for max_loops = None."""
        hi = self.max_loops if self.max_loops is not None else default
        lo = min(self.min_loops, hi)
        x = min(max(progress, 0.0), 1.0)
        weight = {"constant": 1.0, "decreasing": 1.0 - x, "increasing": x,
                  "middle": 1.0 - abs(2.0 * x - 1.0)}[self.kind]
        return lo + int(math.floor(weight * (hi - lo) + 0.5))

    def label(self) -> str:
        top = "model" if self.max_loops is None else str(self.max_loops)
        if self.kind == "constant":
            return f"constant:{top}"
        return f"{self.kind}:{self.min_loops}-{top}" + ("@mask_rate" if self.by == "mask_rate" else "")


SCHEDULE_HELP = ("N, constant:N, decreasing:LO-HI, increasing:LO-HI or middle:LO-HI, "
                 "optionally @mask_rate (progress in mask rate instead of steps), e.g. middle:2-8")


def parse_loop_schedule(text: str | int | LoopSchedule | None) -> LoopSchedule:
    """'4', 'constant:4', 'decreasing:1-8', 'middle:2-8@mask_rate' -> LoopSchedule; None -> the
    model's own loop count at every step."""
    if text is None:
        return LoopSchedule()
    if isinstance(text, LoopSchedule):
        return text
    raw = str(text).strip()
    body, _, by = raw.partition("@")
    kind, _, counts = body.partition(":")
    if not counts and kind.isdigit():
        kind, counts = "constant", kind
    lo, _, hi = counts.partition("-")
    try:
        data: dict[str, Any] = {"kind": kind, "by": by or "step"}
        if kind == "constant":
            if hi or not lo:
                raise ValueError("constant takes one count")
            data["max_loops"] = int(lo)
        else:
            data.update(min_loops=int(lo), max_loops=int(hi))
        return LoopSchedule.model_validate(data)
    except (ValueError, ValidationError) as exc:
        msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise SpecError(f"cannot read loop schedule {raw!r} ({msg}); write {SCHEDULE_HELP}") from None


# ---- cost --------------------------------------------------------------------------------------------
@dataclass
class SampleCost:
    """What generating a batch cost. FLOPs are forward FLOPs summed over every sequence of every
    network call (the one accounting in flops.py, with the loop-block applications and extra
    FLOPs — exit-criterion readouts, halting heads — that each call reported)."""

    sequences: int = 0
    generated_tokens: int = 0  # MASK positions at the start, over all sequences
    network_calls: int = 0  # denoiser calls
    sequence_calls: int = 0  # sequences run through the network, summed over calls
    cached_calls: int = 0  # steps that made no call: every sequence reused its cached output
    loop_iterations: float = 0.0  # loop-block applications per sequence, summed over calls
    flops: float = 0.0
    wall_s: float = 0.0
    loops_per_call: list[float] = field(default_factory=list)

    @property
    def flops_per_token(self) -> float:
        """FLOPs per generated token."""
        return self.flops / max(self.generated_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def mean_loops(self) -> float:
        return self.loop_iterations / max(self.network_calls, 1)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "loops_per_call"}
        out.update(flops_per_token=self.flops_per_token, tokens_per_s=self.tokens_per_s, mean_loops=self.mean_loops)
        return out


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, T) no MASK left; the positions that were not MASK are unchanged
    cost: SampleCost
    init: torch.Tensor  # (B, T) what sampling started from


# ---- the denoiser: models, loops, exits, cost ----------------------------------------------------
ModelRange = tuple[float, float, Any]  # (start, end) fractions of the steps, model


class Denoiser:
    """Calls the network for a sampler: picks the model and loop count of a step, applies the
    exit criterion, returns SUBS log-probs in float64 and charges the call to ``cost``."""

    def __init__(self, model, loops: LoopSchedule | None = None, exit: tuple[str, dict] | None = None,
                 models: list[ModelRange] | None = None, generate_mask: torch.Tensor | None = None):
        self.model = model
        self.schedule = loops or LoopSchedule()
        self.exit_spec = exit
        self.models = list(models or [])
        for _, _, m in self.models:
            check_compatible(model, m)
        self.generate_mask = generate_mask  # (B, T) bool: positions MASK at the start
        self.cost = SampleCost()
        self._exits: dict[int, Any] = {}

    @property
    def mask_id(self) -> int:
        return self.model.backbone.mask_id

    def model_at(self, step: int, steps: int):
        x = step / max(steps, 1)
        for start, end, m in self.models:
            if start <= x < end:
                return m
        return self.model

    def progress(self, x: torch.Tensor, step: int, steps: int) -> float:
        if self.schedule.by == "step":
            return step / max(steps - 1, 1)
        gen = self.generate_mask if self.generate_mask is not None else torch.ones_like(x, dtype=torch.bool)
        masked = ((x == self.mask_id) & gen).sum().item()
        return 1.0 - masked / max(gen.sum().item(), 1)

    def plan(self, x: torch.Tensor, step: int, steps: int) -> tuple[Any, int]:
        """(model, loop count) the call at ``step`` would use: samplers that cache compare plans."""
        model = self.model_at(step, steps)
        own = int(model.strategy.eval_loops()) if model.strategy.loops_block else 1
        return model, self.schedule.loops_at(self.progress(x, step, steps), own)

    def _exit_for(self, model):
        if self.exit_spec is None or not model.strategy.loops_block:
            return None
        if id(model) not in self._exits:
            self._exits[id(model)] = make_exit(self.exit_spec[0], self.exit_spec[1], model)
        return self._exits[id(model)]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, step: int, steps: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs (B, T, V) float64 over the clean vocabulary (MASK at -inf) for input x.
        ``rows`` (bool (B,)): run only these sequences (the others are not charged); the model
        and loop count are still those of the whole batch's step."""
        model, n_loops = self.plan(x, step, steps)
        if rows is not None:
            x = x[rows]
        B, T = x.shape
        t = (x == self.mask_id).float().mean(dim=1)  # each sequence's mask rate, as in training
        crit = self._exit_for(model)
        out = model(x, n_loops, t, **({"exit": crit} if crit is not None else {}))
        apps = float(out.applications) if model.strategy.loops_block else 1.0
        flops_tok = model.inference_flops_per_token(T, apps if model.strategy.loops_block else None,
                                                     float(out.extra_flops))
        c = self.cost
        c.network_calls += 1
        c.sequence_calls += B
        c.loop_iterations += apps
        c.loops_per_call.append(apps)
        c.flops += flops_tok * T * B
        logits = out.logits.double()
        logits[..., self.mask_id] = -math.inf
        return torch.log_softmax(logits, dim=-1)


def check_compatible(a, b) -> None:
    """Models in one schedule must share the vocabulary and MASK id."""
    ka = (a.backbone.n_tokens, a.backbone.mask_id)
    kb = (b.backbone.n_tokens, b.backbone.mask_id)
    if ka != kb:
        raise LoopsearchError(f"model schedule mixes vocabularies (n_tokens, mask_id) {ka} and {kb}; "
                              f"schedule only trials trained on the same corpus and vocab_size")


# ---- samplers ------------------------------------------------------------------------------------
class Sampler:
    """Base class of sampler plugins (register subclasses with ``register_samplers``).

    ``sample`` changes only positions that are MASK, never a committed token (none of the
    builtins remask), and must leave no MASK when it returns.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel):
        self.params = params

    def sample(self, x: torch.Tensor, denoiser: Denoiser, steps: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def gumbel(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard Gumbel noise in float64, drawn on the CPU generator (same on every device)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    e = (-torch.log(u.clamp_min(1e-300))).clamp_min(1e-300)  # Exp(1) noise, never exactly 0
    return (-torch.log(e)).to(device)


def uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


# ---- entry points ----------------------------------------------------------------------------------
def make_init(n: int, seq_len: int, mask_id: int, prefix: list[int] | None = None,
              suffix: list[int] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """(n, seq_len) token ids: ``prefix`` at the start, ``suffix`` at the end (infilling), MASK
    in between: the positions to generate."""
    prefix, suffix = list(prefix or []), list(suffix or [])
    if len(prefix) + len(suffix) >= seq_len:
        raise LoopsearchError(f"prompt of {len(prefix) + len(suffix)} tokens leaves nothing to generate in "
                              f"seq_len={seq_len}; shorten the prompt or raise --seq-len")
    x = torch.full((n, seq_len), mask_id, dtype=torch.long)
    if prefix:
        x[:, : len(prefix)] = torch.tensor(prefix)
    if suffix:
        x[:, seq_len - len(suffix):] = torch.tensor(suffix)
    return x.to(device)


def get_sampler(name: str, params: dict | None = None) -> Sampler:
    """A sampler plugin by name with validated parameters (one-line errors)."""
    return get_registry().build("sampler", name, params)


@torch.no_grad()
def generate(model, init: torch.Tensor, *, sampler: str | Sampler = "ancestral", steps: int = 64, seed: int = 0,
             params: dict | None = None, loops: LoopSchedule | str | int | None = None,
             exit: tuple[str, dict] | None = None, models: list[ModelRange] | None = None) -> SampleResult:
    """Fill the MASK positions of ``init`` (B, T) with ``model`` (a LoopedMDM in eval mode).

    sampler: a plugin name (``loopsearch plugins list``) or instance; steps: the sampler's step
    count (for ``threshold`` an upper bound on network calls); loops: a loop schedule
    (``parse_loop_schedule``); exit: (name, params) of an exit criterion, the scheduled count
    its cap; models: [(start, end, model)] fractions of the steps that use another model.
    """
    if steps < 1:
        raise LoopsearchError(f"steps must be >= 1, got {steps}")
    smp = sampler if isinstance(sampler, Sampler) else get_sampler(sampler, params)
    schedule = parse_loop_schedule(loops)
    if exit is not None:
        check_exits([exit])
    was_training = model.training
    model.eval()
    for _, _, m in models or []:
        m.eval()
    device = next(model.parameters()).device
    x = init.to(device).clone()
    gen_mask = x == model.backbone.mask_id
    den = Denoiser(model, schedule, exit, models, gen_mask)
    den.cost.sequences, den.cost.generated_tokens = x.shape[0], int(gen_mask.sum())
    generator = torch.Generator().manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    out = smp.sample(x, den, steps, generator)
    _sync(device)
    den.cost.wall_s = time.perf_counter() - start
    model.train(was_training)
    if (out == model.backbone.mask_id).any():
        raise RuntimeError(f"sampler {smp.name!r} left MASK tokens: a sampler bug")
    return SampleResult(out, den.cost, init)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- helpers the builtin samplers share (plugins may use them too) ----------------------------------
def predict(logp: torch.Tensor, temperature: float, generator: torch.Generator,
            confidence: str = "low_confidence") -> tuple[torch.Tensor, torch.Tensor]:
    """A token per position and its confidence. With temperature > 0 the token is drawn by the
    Gumbel-max trick, argmax(log p + temperature * g) (LLaDA's ``add_gumbel_noise``; temperature
    1 samples from p); 0 is greedy. Confidence: p(token) (``low_confidence``: the least
    confident positions stay masked) or a uniform draw (``random``)."""
    scores = logp
    if temperature > 0:
        scores = logp + temperature * gumbel(logp.shape, generator, logp.device)
    token = scores.argmax(dim=-1)
    if confidence == "random":
        conf = uniform(token.shape, generator, logp.device)
    else:
        conf = logp.gather(-1, token[..., None]).squeeze(-1).exp()
    return token, conf


def commit_top_k(x: torch.Tensor, token: torch.Tensor, conf: torch.Tensor, allowed: torch.Tensor,
                 k: torch.Tensor) -> torch.Tensor:
    """Commit, in each row b, the k[b] most confident ``allowed`` positions (ties: lower index)."""
    B, T = x.shape
    conf = conf.masked_fill(~allowed, -math.inf)
    order = conf.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=x.device).expand(B, T))
    take = (ranks < k.to(x.device)[:, None]) & allowed
    return torch.where(take, token, x)


def block_ranges(seq_len: int, block_length: int | None) -> list[tuple[int, int]]:
    """[start, end) position ranges of semi-autoregressive blocks (one block if None)."""
    size = block_length or seq_len
    return [(a, min(a + size, seq_len)) for a in range(0, seq_len, size)]


def split_steps(steps: int, n_blocks: int) -> list[int]:
    """Spread ``steps`` over blocks as evenly as possible, at least one each."""
    base, rem = divmod(steps, n_blocks)
    return [max(1, base + (i < rem)) for i in range(n_blocks)]


def transfer_counts(remaining: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to commit per row and step: ``remaining`` split evenly, the remainder
    going to the first steps (LLaDA's ``get_num_transfer_tokens``)."""
    base = remaining[:, None] // steps
    rem = remaining[:, None] % steps
    return base + (torch.arange(steps, device=remaining.device)[None, :] < rem).long()
