"""Sampling from a trained trial: load its checkpoint, encode a prompt with its tokeniser, run a
sampler (loopsearch/sampling.py) and decode. What ``loopsearch sample`` and the generation
metrics (gen-PPL, task accuracy) call; the sampling math itself lives in sampling.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .. import checkpoint
from ..errors import LoopsearchError
from ..sampling import ModelRange, SampleResult, generate, make_init
from ..train import resolve_device


@dataclass
class Loaded:
    model: Any  # LoopedMDM in eval mode on its device
    config: Any  # TrialConfig
    tokenizer_json: str

    @property
    def seq_len(self) -> int:
        return self.config.train.seq_len

    def tokenizer(self):
        return Tokenizer.from_str(self.tokenizer_json)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer().encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer().decode([int(i) for i in ids])


def load_trial(directory: str | Path, device: str = "auto") -> Loaded:
    model, config, tok = checkpoint.load(directory)
    model.to(resolve_device(device)).eval()
    return Loaded(model, config, tok)


def parse_model_schedule(text: str) -> list[tuple[float, float, int]]:
    """'0-0.3:2,0.7-1:5' -> [(0.0, 0.3, 2), (0.7, 1.0, 5)]: fractions of the steps and the trial
    whose model runs them (the trial being sampled runs the rest)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        span, _, trial = part.partition(":")
        lo, _, hi = span.partition("-")
        try:
            a, b, n = float(lo), float(hi), int(trial)
        except ValueError:
            raise LoopsearchError(f"cannot read model schedule {part!r}; write START-END:TRIAL with fractions of "
                                  f"the steps, e.g. 0-0.3:2,0.7-1:5") from None
        if not 0 <= a < b <= 1:
            raise LoopsearchError(f"model schedule range {a}-{b} must satisfy 0 <= start < end <= 1")
        out.append((a, b, n))
    return out


def sample_trial(loaded: Loaded, *, n: int = 4, sampler: str = "ancestral", steps: int | None = None, seed: int = 0,
                 params: dict | None = None, loops=None, exit: tuple[str, dict] | None = None,
                 prompt: str | None = None, suffix: str | None = None, seq_len: int | None = None,
                 models: list[ModelRange] | None = None) -> tuple[SampleResult, list[str]]:
    """n samples of ``seq_len`` tokens (default: the trial's training length) from a loaded
    trial; ``steps`` defaults to the number of positions to generate. Returns the result and
    the decoded texts (prompt and suffix included)."""
    trained = loaded.seq_len
    seq_len = seq_len or trained
    if not 1 <= seq_len <= trained:
        raise LoopsearchError(f"--seq-len {seq_len} must be between 1 and {trained}, the length the trial was "
                              f"trained at (its rotary tables end there)")
    mask_id = loaded.model.backbone.mask_id
    prefix = loaded.encode(prompt) if prompt else None
    tail = loaded.encode(suffix) if suffix else None
    device = next(loaded.model.parameters()).device
    init = make_init(n, seq_len, mask_id, prefix, tail, device)
    steps = steps or int((init == mask_id).sum(dim=1).max())
    result = generate(loaded.model, init, sampler=sampler, steps=steps, seed=seed, params=params, loops=loops,
                      exit=exit, models=models)
    return result, [loaded.decode(row.tolist()) for row in result.tokens]


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """['threshold=0.8', 'block_length=8'] -> {'threshold': '0.8', ...} (the plugin's Params convert)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LoopsearchError(f"cannot read --param {item!r}; write KEY=VALUE, e.g. --param threshold=0.8")
        out[key.strip()] = value.strip()
    return out

