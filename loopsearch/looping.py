"""Where the loop is executed.

A looped model is: prelude layers [0, loop_start) -> loop block [loop_start, loop_end) run
n_loops times with shared weights -> coda layers [loop_end, L) -> head (LoopMDM, arXiv 2605.26106).
``LoopedMDM`` owns the block (which layers); a ``LoopStrategy`` owns only how to loop: how many
times the block runs (per training step and at inference) and how. The model counts the block
applications it executed so FLOPs follow what really ran.

One name for the loop count across strategies: ``n_loops``, the count the model runs at inference
by default (``eval_loops()``) and the most any training step or token uses. Old spellings of it in
a strategy's parameters (``max_loops``) are accepted with a deprecation line (``renamed_params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .backbone import Backbone
from .errors import SpecError
from .flops import TRAIN_MULTIPLIER, FlopProfile, inference_flops_per_token, train_step_flops

BlockFn = Callable[..., torch.Tensor]  # block(h) -> h; block(h, index=idx) on a token subset (router)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def renamed_params(data: Any, renames: dict[str, str], owner: str) -> Any:
    """For a ``Params`` before-validator: accept old parameter names (``renames``: old -> new)
    with a deprecation line, so old spaces, recipes and stored trials keep working. Declare them
    as ``old_names: ClassVar[dict[str, str]]`` on the Params too: space checks accept those keys."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for old, new in renames.items():
        if old in out:
            if new in out:
                raise ValueError(f"{owner}: give {new!r} only ({old!r} is its old name)")
            warnings.warn(f"{owner}: parameter {old!r} is now {new!r}; the old name still works but is deprecated",
                          FutureWarning, stacklevel=2)
            out[new] = out.pop(old)
    return out


@dataclass
class LoopContext:
    """What a strategy may look at while it runs the loop block."""

    t: torch.Tensor | None = None  # (B,) mask rate of each sequence (None when unknown)
    masked: torch.Tensor | None = None  # (B, T) bool: positions that are MASK in the input
    training: bool = False
    exit: Any = None  # an inference-time exit criterion (loopsearch/exits.py), or None
    readout: Callable[[torch.Tensor], torch.Tensor] | None = None  # block output -> logits (coda + head)
    # randomness a strategy draws inside run() (noise-initialised states, per-token counts): seeded by
    # the trainer's loop stream in training and by a fixed key in validation, so runs are reproducible;
    # never draw from torch's global generator
    generator: torch.Generator | None = None
    readout_flops: float = 0.0  # forward FLOPs per sequence of one ``readout`` at this batch's length
    # training only, for strategies with ``uses_targets`` (a loss over exits): the clean tokens x0 (B, T)
    # and the MASK id, so the strategy can score a readout with the same per-token loss as the trainer
    targets: torch.Tensor | None = None
    mask_id: int | None = None


@dataclass
class LoopResult:
    """What a strategy returns. FLOPs are charged for ``applications`` block applications per
    sequence (a mean over the batch if sequences loop different counts) plus ``extra_flops``
    forward FLOPs per sequence (halting heads, readouts for exit criteria). Of the applications,
    ``forward_only`` ran without a backward pass (under ``torch.no_grad``: truncated backprop
    through the loops); training charges them 1x, the others 3x (forward + backward)."""

    h: torch.Tensor
    applications: float
    extra_flops: float = 0.0
    forward_only: float = 0.0
    aux_loss: torch.Tensor | None = None  # added to the training loss (e.g. a ponder cost)
    stats: dict[str, float] = field(default_factory=dict)  # e.g. mean loops per token
    # (B, T) weight of each token's loss on the model's own output (None: 1): a strategy that trains an
    # expectation over exits puts the other exits' terms in aux_loss and the last exit's share here
    loss_weight: torch.Tensor | None = None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, n_tokens), or (N, n_tokens) at the positions asked for
    applications: float  # loop-block applications executed per sequence (forward_only included)
    extra_flops: float = 0.0  # other forward FLOPs per sequence beyond the profile's layers and head
    aux_loss: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    head_share: float | torch.Tensor = 1.0  # share of the positions the head ran on (forward(..., positions=));
    # a 0-dim tensor when computed (no host sync inside a compiled forward): float() it outside
    forward_only: float = 0.0  # of the applications, those run without backward (charged 1x in training)
    loss_weight: torch.Tensor | None = None  # (B, T) weight of each token's loss (LoopResult.loss_weight)


class LoopStrategy(nn.Module):
    """Base class of looping strategies (register subclasses with ``register_loop_strategies``).

    ``loops_block``: False for strategies that never loop (``none``); the plan then has no block.
    Subclasses override ``train_loops`` / ``eval_loops`` and, for anything beyond "run the block
    n times", ``run``. A strategy does not know which layers it loops: ``LoopedMDM`` owns the
    block and hands ``run`` a function that applies it. ``d_model`` is there for strategies with
    modules of their own (a halting head).
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    loops_block: ClassVar[bool] = True
    # True: training passes the clean tokens (``ctx.targets``, ``ctx.mask_id``) so ``run`` can score
    # readouts of intermediate loops with the trainer's loss (a loss over exits, as Ouro's gate)
    uses_targets: ClassVar[bool] = False
    # True: ``run`` may draw from ``ctx.generator``, so a call without a stream gets a fixed one. False
    # (strategies that draw nothing inside the loop) leaves it None: creating a generator inside a
    # torch.compile'd forward breaks the graph
    draws_in_run: ClassVar[bool] = True

    def __init__(self, params: BaseModel, d_model: int):
        super().__init__()
        self.params, self.d_model = params, d_model

    def train_loops(self, generator: torch.Generator) -> int:
        """Loop count for one training step (drawn with ``generator`` if random)."""
        return 1

    def max_train_loops(self) -> int:
        """Upper bound of ``train_loops``: used to check a budget can pay for enough steps."""
        return 1

    def expected_train_loops(self) -> float:
        """Mean of ``train_loops``: used to plan the number of steps a budget buys."""
        return 1.0

    def eval_loops(self) -> int:
        """Loop count used for validation and, by default, inference."""
        return 1

    def attach(self, model: "LoopedMDM") -> None:
        """Called once by the model that runs this strategy: a strategy whose draws depend on what
        a loop costs (``fixed`` with ``flop_proportional`` counts) reads it here with
        ``model.forward_flops(n)``. The default does nothing."""

    def expected_forward_only(self) -> float:
        """Mean of ``LoopResult.forward_only`` per training step (loops run without backward, e.g.
        truncated backprop): planning charges them 1x, so the planned step count is right."""
        return 0.0

    def expected_extra_flops(self, seq_len: int) -> float:
        """Mean of ``LoopResult.extra_flops`` per sequence over training steps: planning uses it to
        buy the right number of steps. Default: the bound at the expected loop count."""
        return self.extra_flops_bound(int(round(self.expected_train_loops())), seq_len)

    def extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        """Upper bound of ``LoopResult.extra_flops`` per sequence for a step run with n_loops."""
        return 0.0

    def inference_extra_flops_bound(self, n_loops: int, seq_len: int) -> float:
        """Upper bound of ``extra_flops`` per sequence of an inference call at n_loops (what a sampler's
        cost plans with). Default: ``extra_flops_bound``; lower it when training runs more (readouts)."""
        return self.extra_flops_bound(n_loops, seq_len)

    def inference_applications(self, n_loops: int, seq_len: int) -> float:
        """Full-block applications an inference call at n_loops costs. Default: n_loops; less for a
        strategy that runs later loops on fewer tokens (``router``)."""
        return float(n_loops)

    def reinjects(self) -> bool:
        """True when ``run`` adds the block's input to the hidden state before every loop after
        the first (what a plain repetition of the block would miss: the attention analysis,
        loopsearch/eval/attention.py, reproduces it)."""
        return False

    def run(self, h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext) -> LoopResult:
        """Run the loop block ``n_loops`` times (or fewer, if ``ctx.exit`` says stop)."""
        if ctx.exit is not None:
            return run_with_exit(h, block, n_loops, ctx)
        for _ in range(n_loops):
            h = block(h)
        return LoopResult(h, float(n_loops))


class EveryStepRunsAllLoops:
    """Mixin for strategies whose every training step runs ``params.n_loops`` loops, which is also
    the inference count (halting, exit_gate, router): the four loop-count methods in one place."""

    def train_loops(self, generator: torch.Generator) -> int:
        return self.params.n_loops

    def max_train_loops(self) -> int:
        return self.params.n_loops

    def expected_train_loops(self) -> float:
        return float(self.params.n_loops)

    def eval_loops(self) -> int:
        return self.params.n_loops


def run_with_exit(h: torch.Tensor, block: BlockFn, n_loops: int, ctx: LoopContext,
                  step: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> LoopResult:
    """Loop up to ``n_loops`` times and stop the whole batch once the exit criterion holds for
    every sequence (loops are counted for the batch: that is what ran). ``step(h, k)`` computes
    loop k's output; by default ``block(h)``."""
    crit = ctx.exit
    if crit is None:  # no exit criterion: simply loop (strategies need no branch of their own)
        for k in range(n_loops):
            h = step(h, k) if step is not None else block(h)
        return LoopResult(h, float(n_loops))
    state = crit.init(h)
    extra = 0.0
    done = 0
    for k in range(n_loops):
        new = step(h, k) if step is not None else block(h)
        done += 1
        if k == n_loops - 1:  # the cap: no check (a readout-based check would cost FLOPs for nothing)
            h = new
            break
        stop, state, flops = crit.check(h, new, state, ctx)
        h, extra = new, extra + flops
        if bool(stop.all()):
            break
    return LoopResult(h, float(done), extra_flops=extra, stats={"loops_run": float(done)})


class LoopedMDM(nn.Module):
    """A backbone whose layers [loop_start, loop_end) (the loop block, owned here) are looped by a
    strategy. A strategy that never loops (``none``) takes the empty block, (0, 0)."""

    def __init__(self, backbone: Backbone, strategy: LoopStrategy, loop_start: int = 0, loop_end: int = 0):
        super().__init__()
        check_block(loop_start, loop_end, backbone.n_layer, strategy.loops_block)
        self.backbone, self.strategy = backbone, strategy
        self.loop_start, self.loop_end = loop_start, loop_end
        strategy.attach(self)

    def run_range(self, h: torch.Tensor, start: int, end: int, index: torch.Tensor | None = None) -> torch.Tensor:
        for i in range(start, end):
            h = self.backbone.run_block(i, h) if index is None else self.backbone.run_block(i, h, index=index)
        return h

    def _block(self, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The loop block. ``index`` (B, T') long: ``h`` holds only these positions of each sequence
        (token-level routing); the backbone must say ``supports_token_index``."""
        return self.run_range(h, self.loop_start, self.loop_end, index)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the loop block's output (runs the coda and the head)."""
        return self.backbone.head(self.run_range(h, self.loop_end, self.backbone.n_layer))

    def readout_flops(self, seq_len: int) -> float:
        """Forward FLOPs per sequence of one ``readout``."""
        p = self.flop_profile(seq_len)
        return sum(p.layers[self.loop_end:]) + p.head

    supports_positions = True  # forward(..., positions=) (loopsearch/diffusion.py: validation_elbo)

    def forward(self, x: torch.Tensor, n_loops: int | None = None, t: torch.Tensor | None = None,
                exit=None, positions: torch.Tensor | None = None,
                generator: torch.Generator | None = None, targets: torch.Tensor | None = None) -> ModelOutput:
        """x: (B, T) token ids; t: (B,) mask rates if known; exit: an inference-time exit
        criterion. Returns logits (B, T, n_tokens) and what the loop block executed; with
        ``positions`` (a (B, T) bool mask) the head runs only there and logits are (N, n_tokens),
        in row-major order of the True positions (the validation loss needs only masked ones).
        ``targets``: the clean tokens, in training, for strategies with ``uses_targets``."""
        b = self.backbone
        n = self.strategy.eval_loops() if n_loops is None else n_loops
        h = b.embed(x)
        h = self.run_range(h, 0, self.loop_start)
        result = LoopResult(h, 0.0)
        if self.loop_end > self.loop_start:
            if generator is None and self.strategy.draws_in_run:  # no stream of its own: a fixed one, reproducible
                generator = torch.Generator().manual_seed(0)
            ctx = LoopContext(t=t, masked=x == b.mask_id, training=self.training, exit=exit, readout=self.readout,
                              generator=generator, mask_id=b.mask_id,
                              readout_flops=self.readout_flops(x.shape[1]) if self.strategy.uses_targets else 0.0,
                              targets=targets if self.strategy.uses_targets else None)
            result = self.strategy.run(h, self._block, n, ctx)
        h = self.run_range(result.h, self.loop_end, b.n_layer)
        if positions is None:
            return ModelOutput(b.head(h), result.applications, result.extra_flops, result.aux_loss, result.stats,
                               forward_only=result.forward_only, loss_weight=result.loss_weight)
        # a 0-dim tensor, not float(...): a host sync here broke the torch.compile graph and, as a Python
        # constant that changes every step, recompiled the model until dynamo's limit (then ran eager)
        share = positions.float().mean() if positions.numel() else torch.ones(())
        return ModelOutput(b.head(h[positions][None])[0], result.applications, result.extra_flops, result.aux_loss,
                           result.stats, head_share=share, forward_only=result.forward_only,
                           loss_weight=result.loss_weight)

    # ---- FLOPs of what runs (see flops.py) ---------------------------------------------------
    def forward_flops(self, n_loops: float, seq_len: int | None = None) -> float:
        """Forward FLOPs of one sequence with the block run ``n_loops`` times (at the backbone's
        ``seq_len`` if it has one, else 64 tokens)."""
        seq_len = seq_len or int(getattr(self.backbone, "seq_len", 0) or 64)
        return self.flop_profile(seq_len).forward(self.loop_start, self.loop_end, n_loops)

    def flop_profile(self, seq_len: int) -> FlopProfile:
        return self.backbone.flop_profile(seq_len)

    def train_step_flops(self, seq_len: int, batch_size: int, applications: float, extra_flops: float = 0.0,
                         head_share: float = 1.0, forward_only: float = 0.0) -> float:
        """Forward + backward FLOPs of one step; ``extra_flops`` are forward FLOPs per sequence;
        the head ran on ``head_share`` of the positions (1: all of them, the bound); ``forward_only``
        of the ``applications`` ran without backward (charged their forward FLOPs once)."""
        profile = self.flop_profile(seq_len)
        base = train_step_flops(profile, batch_size, self.loop_start, self.loop_end, applications - forward_only,
                                float(head_share))
        block = sum(profile.layers[self.loop_start:self.loop_end])
        return base + batch_size * forward_only * block + TRAIN_MULTIPLIER * batch_size * extra_flops

    def inference_flops_per_token(self, seq_len: int, applications: float | None = None,
                                  extra_flops: float | None = None) -> float:
        """Forward FLOPs per token of one network call. Defaults: the strategy's inference loop
        count and the upper bound of its extra FLOPs at that count (what a call may cost)."""
        st = self.strategy
        n = st.eval_loops()
        a = (st.inference_applications(n, seq_len) if st.loops_block else float(n)) if applications is None \
            else applications
        if extra_flops is None:
            extra_flops = st.inference_extra_flops_bound(n, seq_len) if st.loops_block else 0.0
        profile = self.flop_profile(seq_len)
        return inference_flops_per_token(profile, self.loop_start, self.loop_end, a) + extra_flops / seq_len


def check_block(loop_start: int, loop_end: int, n_layer: int, loops_block: bool = True) -> None:
    """Raise SpecError unless [loop_start, loop_end) is a non-empty range of layers."""
    if not loops_block:
        if (loop_start, loop_end) != (0, 0):
            raise SpecError(f"this strategy does not loop; loop_start/loop_end must be 0/0, "
                            f"got {loop_start}/{loop_end}")
        return
    if not (0 <= loop_start < loop_end <= n_layer):
        raise SpecError(
            f"loop block [{loop_start}, {loop_end}) is outside the model's {n_layer} layers; "
            f"need 0 <= loop_start < loop_end <= {n_layer}"
        )


class ExecutionRecorder:
    """Calls the model and records what each forward pass executed (per-sequence loop-block
    applications and extra FLOPs, weighted by batch size)."""

    def __init__(self, model):
        self.model = model
        self.supports_positions = getattr(model, "supports_positions", False)
        self.reset()

    def reset(self) -> None:
        self.sequences = 0
        self.applications = 0.0
        self.extra_flops = 0.0
        self.token_loops = 0.0  # per-token loop counts, for strategies that report them (halting)
        self.token_sequences = 0

    def __call__(self, x, *args, **kwargs):
        out = self.model(x, *args, **kwargs)
        b = x.shape[0]
        self.sequences += b
        self.applications += b * float(out.applications)
        self.extra_flops += b * float(out.extra_flops)
        if "mean_token_loops" in out.stats:
            self.token_loops += b * float(out.stats["mean_token_loops"])
            self.token_sequences += b
        return out

    def means(self) -> tuple[float, float]:
        n = max(self.sequences, 1)
        return self.applications / n, self.extra_flops / n

    def mean_token_loops(self) -> float | None:
        return self.token_loops / self.token_sequences if self.token_sequences else None
