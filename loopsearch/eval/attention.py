"""Where masked positions look: attention shares per layer and loop iteration.

The looping paper's evidence that looping promotes mask-to-mask interaction: at several mask
rates, on validation data, measure for every layer application (prelude layers once, each
iteration of the loop block, coda layers once) where the attention mass of masked query
positions goes: to *other* masked keys (mask->mask), to the query's own position (self,
reported apart: a masked query attending to itself is not mask-to-mask interaction) and to
unmasked keys; the three add up to 1. For reference, the share of the other keys that are
masked, (masked keys - 1) / (T - 1): what attention spread uniformly over the other positions
would put on masked ones.

The walk follows the model's forward: ``backbone.embed``, then ``backbone.run_block(i, h)`` in
the looped order, with ``backbone.attention_probs(i, h)`` read before each application. The loop
block is applied ``n_loops`` times as a plain repetition; a strategy that adds the block's input
before every loop after the first (``LoopStrategy.reinjects()``: the ``fixed`` strategy with
``reinject``) is reproduced, but other strategy-specific execution (e.g. the router's token subsets,
halting's and exit_gate's per-token freezing) is not: for such strategies the shares describe the
plainly repeated block.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from rich.table import Table

from ..diffusion import mask_tokens
from ..errors import LoopsearchError
from .loop_scaling import load_for_validation


def parse_rates(text: str) -> list[float]:
    """'0.15,0.5,0.85' -> mask rates, each in (0, 1) (one-line errors)."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LoopsearchError(f"cannot read --rates {text!r}; write mask rates like 0.15,0.5,0.85") from None
    if not rates:
        raise LoopsearchError(f"--rates {text!r} lists no mask rates; write e.g. 0.15,0.5,0.85")
    bad = [r for r in rates if not (0.0 < r < 1.0) or math.isnan(r)]
    if bad:
        raise LoopsearchError(f"--rates {text!r}: mask rates must lie strictly between 0 and 1, got {bad[0]:g}")
    return rates


def layer_schedule(model, n_loops: int | None = None) -> list[tuple[int, int]]:
    """[(layer, loop)] in the order the looped model applies its layers; loop is 1-based
    (1 for prelude and coda layers)."""
    n_layer = model.backbone.n_layer
    s, e = model.loop_start, model.loop_end
    if not model.strategy.loops_block or e <= s:
        return [(i, 1) for i in range(n_layer)]
    n = model.strategy.eval_loops() if n_loops is None else n_loops
    if n < 1:
        raise LoopsearchError(f"--loops must be >= 1, got {n}")
    return ([(i, 1) for i in range(s)] + [(i, k) for k in range(1, n + 1) for i in range(s, e)]
            + [(i, 1) for i in range(e, n_layer)])


def _shares(probs: torch.Tensor, masked: torch.Tensor) -> tuple[float, float, float, float, int]:
    """Sums over (batch, head, masked query) of the mass on other masked keys, on the query's own
    position, on unmasked keys, and of the uniform reference (masked keys - 1) / (T - 1); and the
    number of such (batch, head, query) triples."""
    m = masked.to(probs.dtype)  # (B, T)
    own = probs.diagonal(dim1=-2, dim2=-1)  # (B, H, T): mass of query i on key i
    on_masked = (probs * m[:, None, None, :]).sum(-1)  # (B, H, Tq), own position included
    on_unmasked = (probs * (1.0 - m)[:, None, None, :]).sum(-1)
    T = m.shape[-1]
    frac = (m.sum(-1) - 1.0) / max(T - 1, 1)  # (B,) share of the other keys that are masked (masked query)
    q = m[:, None, :].expand_as(on_masked)  # weight: masked queries only
    uniform = frac[:, None, None].expand_as(on_masked)
    return (float(((on_masked - own) * q).sum()), float((own * q).sum()), float((on_unmasked * q).sum()),
            float((uniform * q).sum()), int(q.sum()))


@torch.no_grad()
def attention_shares(model, batches: Iterable[torch.Tensor], mask_id: int,
                     rates: Sequence[float] = (0.15, 0.5, 0.85), seed: int = 0,
                     n_loops: int | None = None) -> list[dict]:
    """Rows {"t", "layer", "loop", "mask_to_mask", "self", "mask_to_unmasked", "masked_key_fraction"}:
    for each mask rate t and each layer application, the attention mass masked queries place on
    other masked keys, on their own position and on unmasked keys (means over batch, heads and
    masked queries; they add up to 1), and the uniform reference: the share of the other keys
    that are masked, (masked - 1) / (T - 1), weighted the same way."""
    b = model.backbone
    was_training = model.training
    model.eval()
    batches = list(batches)
    schedule = layer_schedule(model, n_loops)
    reinject = model.strategy.loops_block and model.strategy.reinjects()
    s = model.loop_start
    rows: list[dict] = []
    try:
        for t in rates:
            gen = torch.Generator().manual_seed(seed)
            acc = [[0.0, 0.0, 0.0, 0.0, 0] for _ in schedule]
            for x0 in batches:
                rate = torch.full((x0.shape[0],), float(t))
                xt, masked = mask_tokens(x0, rate, mask_id, gen)
                h = b.embed(xt)
                block_input = None
                for j, (i, k) in enumerate(schedule):
                    if i == s and model.loop_end > s and model.strategy.loops_block:
                        if k == 1:
                            block_input = h
                        elif reinject:
                            h = h + block_input
                    try:
                        probs = b.attention_probs(i, h)
                    except NotImplementedError as exc:
                        raise LoopsearchError(str(exc)) from None
                    for slot, value in enumerate(_shares(probs, masked)):
                        acc[j][slot] += value
                    h = b.run_block(i, h)
            for (i, k), (mm, own, unmasked, uni, n) in zip(schedule, acc):
                mean = (lambda v: v / n) if n else (lambda v: math.nan)  # noqa: E731
                rows.append({"t": float(t), "layer": i, "loop": k, "mask_to_mask": mean(mm), "self": mean(own),
                             "mask_to_unmasked": mean(unmasked), "masked_key_fraction": mean(uni)})
    finally:
        model.train(was_training)
    return rows


def trial_attention_shares(directory, rates: Sequence[float], n_loops: int | None = None,
                           device: str = "auto") -> list[dict]:
    """``attention_shares`` of a checkpoint on its study's validation split (the same windows
    ``loopsearch eval`` uses; the masks are keyed by the config's mask seed, the study's seed)."""
    model, config, val = load_for_validation(directory, device)
    return attention_shares(model, val, model.backbone.mask_id, rates, seed=config.mask_seed, n_loops=n_loops)


def rich_table(rows: list[dict]):
    table = Table(title="attention of masked queries (mask→mask: other masked keys; self apart; uniform share: "
                        "masked fraction of the other keys)")
    for name in ("t", "layer", "loop", "mask→mask (others)", "self", "mask→unmasked", "uniform share"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(f"{r['t']:g}", str(r["layer"]), str(r["loop"]), f"{r['mask_to_mask']:.3f}", f"{r['self']:.3f}",
                      f"{r['mask_to_unmasked']:.3f}", f"{r['masked_key_fraction']:.3f}")
    return table
