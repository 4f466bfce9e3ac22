"""Parse FLOP budgets: plain numbers, SI units, and GPU time.

Accepted forms (case-insensitive)::

    3e13              plain FLOPs
    30 TFLOP          SI prefixes k, M, G, T, P, E (FLOP or FLOPs)
    2 PFLOPs
    h100:2h@0.4       GPU time: GPU name, hours (h) or minutes (m), assumed MFU
"""

from __future__ import annotations

import math

import re

from .errors import BudgetError

SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "a100": 312e12,
    "a10g": 125e12,
    "l4": 121e12,
    "l40s": 362e12,
    "h100": 989e12,  # SXM; PCIe is 756e12 (use h100-pcie)
    "h100-pcie": 756e12,
    "h200": 989e12,
    "b200": 2250e12,
    "rtx4090": 165e12,
    "rtx3090": 71e12,
    "v100": 125e12,  # fp16 tensor cores (no bf16 on V100)
}

_PLAIN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?:([kmgtpe]?)(flops?))?\s*$", re.I)
_GPU = re.compile(
    r"^\s*([a-z0-9-]+)\s*:\s*([0-9]*\.?[0-9]+)\s*(h|m)\s*(?:@\s*([0-9]*\.?[0-9]+))?\s*$", re.I
)

FORMS = "a number (3e13), a unit (30 TFLOP, 2 PFLOP) or GPU time (h100:2h@0.4 = 2 hours at 40% MFU)"


MAX_FLOPS = 1e27  # beyond any training run: a typo or inf


def parse_flops(value: str | float | int) -> float:
    """Return a FLOP count from one of the accepted forms; raise BudgetError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        flops = float(value)
    else:
        text = str(value)
        m = _PLAIN.match(text)
        if m:
            flops = float(m.group(1)) * SI[(m.group(2) or "").lower()]
        else:
            g = _GPU.match(text)
            if not g:
                raise BudgetError(f"cannot read budget {text!r}; write {FORMS}")
            flops = _gpu_flops(g.group(1).lower(), float(g.group(2)), g.group(3).lower(), g.group(4))
    if not flops > 0:
        raise BudgetError(f"budget must be positive, got {value!r}; write {FORMS}")
    if not math.isfinite(flops) or flops > MAX_FLOPS:
        raise BudgetError(f"budget {value!r} is beyond {MAX_FLOPS:.0e} FLOPs (a zettaFLOP-scale run); write {FORMS}")
    return flops


def _gpu_flops(gpu: str, amount: float, unit: str, mfu: str | None) -> float:
    if gpu not in GPU_PEAK_BF16:
        raise BudgetError(f"unknown GPU {gpu!r} in budget; known: {', '.join(sorted(GPU_PEAK_BF16))}")
    seconds = amount * (3600.0 if unit == "h" else 60.0)
    frac = float(mfu) if mfu is not None else 0.4
    if not 0 < frac <= 1:
        raise BudgetError(f"MFU must be in (0, 1], got {frac}; e.g. h100:2h@0.4")
    return GPU_PEAK_BF16[gpu] * seconds * frac


def format_flops(flops: float) -> str:
    """Human form with an SI prefix: 3.2e13 -> '32.0 TFLOP'."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"
