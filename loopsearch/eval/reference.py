"""A reference causal LM for generative perplexity (gen-PPL) of diffusion samples.

No pretrained weights can be downloaded, so loopsearch trains a small left-to-right transformer
(the builtin ``transformer`` backbone with ``causal = true``) on a study's own corpus and
tokeniser, and scores samples under it:

    gen-PPL = exp(mean over predicted tokens of -log p(x_i | x_<i))   (the first token is not scored)

gen-PPL rewards repetitive text, so it is always reported beside the unigram entropy of the
samples (as MDLM and ReMDM do). A reference only scores samples written with the tokeniser it
was trained with (``check_tokenizer``).

Layout of a reference directory (``<artifacts_dir>/<study>/reference``)::

    model.safetensors   weights (safetensors: no pickle)
    config.json         ReferenceConfig, vocabulary size and training results
    tokenizer.json      the BPE tokeniser of the study
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from ..data import PreparedData, random_batch, validation_batches
from ..errors import BudgetError, LoopsearchError
from ..flops import train_step_flops
from ..registry import get_registry
from ..stats import mean_interval
from ..train import _progress, lr_at, make_optimizer, resolve_device, use_bf16
from ..units import format_flops, parse_flops

BACKBONE = "transformer"  # the builtin backbone, run with causal = true
FORMAT = "loopsearch-reference-v1"
# Default size on Tiny Shakespeare (vocab 1024): 600 steps reach val NLL 3.44 nats/token (PPL 31);
# 400 steps (3.68 nats) took 73 s on 2 idle CPU cores, so 600 take about 2 minutes.
DEFAULT_STEPS = 600


class ReferenceConfig(BaseModel):
    """How to train the reference LM. Give ``steps`` or a FLOP ``budget`` (not both);
    with neither, it trains DEFAULT_STEPS steps."""

    model_config = ConfigDict(extra="forbid")
    n_layer: int = Field(4, ge=1, description="transformer layers")
    d_model: int = Field(128, ge=8, description="residual width")
    n_heads: int = Field(4, ge=1, description="attention heads")
    seq_len: int = Field(128, ge=8, description="context length: tokens fed per window (longer samples are scored "
                                                "in sliding windows)")
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr_frac: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak (cosine)")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="warmup length as a fraction of the steps")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    steps: int | None = Field(None, ge=1, description=f"optimizer steps (default {DEFAULT_STEPS} unless budget is set)")
    budget: float | None = Field(None, description="training FLOPs instead of steps: 3e13, '30 TFLOP', 'h100:0.1h@0.4'")
    eval_sequences: int = Field(64, ge=1, description="validation windows of seq_len tokens (valid split)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA")
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("budget", mode="before")
    @classmethod
    def _parse_budget(cls, v):
        if v is None:
            return None
        try:
            return parse_flops(v)
        except BudgetError as exc:  # reported by pydantic with the key it belongs to
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check(self):
        if self.steps is not None and self.budget is not None:
            raise ValueError(f"give steps ({self.steps}) or budget ({self.budget:.3g}), not both")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        return self

    def backbone_params(self) -> dict[str, Any]:
        return {"n_layer": self.n_layer, "d_model": self.d_model, "n_heads": self.n_heads, "causal": True}


def reference_dir(artifacts_dir: str | Path, study_name: str) -> Path:
    """Where a study's reference LM lives: ``<artifacts_dir>/<study>/reference``."""
    return Path(artifacts_dir) / study_name / "reference"


def build_reference(config: ReferenceConfig, vocab_size: int):
    """The causal backbone (untrained), through the plugin registry. ``vocab_size`` counts the
    tokeniser's tokens; the backbone's extra MASK id is never predicted (logits are cut to the vocab)."""
    return get_registry().build("backbone", BACKBONE, config.backbone_params(), vocab_size, config.seq_len)


def causal_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, vocab) of a causal backbone: position i predicts token i + 1.
    The MASK id the backbone adds is cut off, so the softmax is over the tokeniser's vocabulary."""
    h = model.embed(x)
    for i in range(model.n_layer):
        h = model.run_block(i, h)
    return model.head(h)[..., : model.mask_id]


def step_flops(model, config: ReferenceConfig) -> float:
    """FLOPs of one optimizer step: 3 x forward FLOPs per sequence x batch (flops.py)."""
    return train_step_flops(model.flop_profile(config.seq_len), config.batch_size)


def plan_steps(model, config: ReferenceConfig) -> int:
    """Optimizer steps to run: ``steps``, or what ``budget`` buys, or DEFAULT_STEPS."""
    if config.budget is None:
        return config.steps or DEFAULT_STEPS
    per_step = step_flops(model, config)
    steps = int(config.budget // per_step)
    if steps < 1:
        raise BudgetError(f"reference budget {format_flops(config.budget)} is below one training step "
                          f"({format_flops(per_step)}); raise budget to at least {per_step:.3g}")
    return steps


def train_reference(data: PreparedData, config: ReferenceConfig | None = None,
                    progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the reference causal LM on ``data``'s train split (next-token cross-entropy on random
    windows, AdamW, warmup + cosine, grad clipping, seeded). Returns the model (eval mode) and
    info: val_nll (nats/token) and val_ppl on the valid split, train_flops, steps, wall_s, ..."""
    config = config or ReferenceConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # weight init
    model = build_reference(config, data.vocab_size).to(device)
    steps = plan_steps(model, config)
    per_step = step_flops(model, config)
    bf16 = use_bf16(config.precision, device)
    opt = make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)  # data order
    model.train()
    loss_val, start = float("nan"), time.perf_counter()
    with _progress(progress, "reference LM", steps * per_step) as bar:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step / steps, config)
            x = random_batch(data.train, config.batch_size, config.seq_len + 1, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = causal_logits(model, x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"non-finite reference loss {loss_val} at step {step + 1}; "
                                         f"lower lr ({config.lr})")
            elapsed = time.perf_counter() - start
            done = (step + 1) * per_step
            bar.update(done, loss_val, (step + 1) * config.batch_size * config.seq_len / elapsed, done / elapsed)
    train_wall = time.perf_counter() - start
    model.eval()
    val = torch.cat(validation_batches(data.valid, config.seq_len + 1, config.eval_sequences, config.batch_size))
    scored = gen_ppl(model, val, batch_size=config.batch_size, device=device)
    tokens = steps * config.batch_size * config.seq_len
    info = {"val_nll": scored["nll"], "val_ppl": scored["gen_ppl"], "val_tokens": scored["tokens"],
            "train_flops": steps * per_step, "steps": steps, "final_loss": loss_val, "tokens": tokens,
            "wall_s": train_wall, "tokens_per_s": tokens / train_wall, "vocab_size": data.vocab_size,
            "corpus_fingerprint": data.fingerprint}
    return model, info


# ---- persistence ---------------------------------------------------------------------------------------------
def save_reference(directory: str | Path, model: torch.nn.Module, config: ReferenceConfig, tokenizer_json: str,
                   info: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors, config.json and tokenizer.json into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, str(d / "model.safetensors"))  # handles the tied embedding/head weights
    (d / "tokenizer.json").write_text(tokenizer_json)
    payload = {"format": FORMAT, "backbone": BACKBONE, "vocab_size": model.mask_id,
               "config": config.model_dump(mode="json"), "info": info or {}}
    (d / "config.json").write_text(json.dumps(payload, indent=2))
    return d


def load_reference(directory: str | Path) -> tuple[torch.nn.Module, ReferenceConfig, str, dict[str, Any]]:
    """Rebuild a saved reference LM (CPU, eval mode): (model, config, tokenizer_json, info)."""
    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise LoopsearchError(f"no reference LM in {d}; train one with `loopsearch reference train STUDY`")
    payload = json.loads((d / "config.json").read_text())
    if payload.get("format") != FORMAT:
        raise LoopsearchError(f"{d / 'config.json'} is not a loopsearch reference LM (format "
                              f"{payload.get('format')!r}, expected {FORMAT!r}); retrain it with "
                              f"`loopsearch reference train STUDY`")
    config = ReferenceConfig.model_validate(payload["config"])
    model = build_reference(config, int(payload["vocab_size"]))
    load_model(model, str(d / "model.safetensors"))
    return model.eval(), config, (d / "tokenizer.json").read_text(), payload.get("info", {})


def check_tokenizer(reference_tokenizer_json: str, model_tokenizer_json: str, study: str | None = None) -> None:
    """Raise unless the reference was trained with the same tokeniser as the model it scores."""
    if json.loads(reference_tokenizer_json) == json.loads(model_tokenizer_json):
        return
    ref = Tokenizer.from_str(reference_tokenizer_json).get_vocab_size()
    mine = Tokenizer.from_str(model_tokenizer_json).get_vocab_size()
    raise LoopsearchError(
        f"the reference LM's tokeniser (vocab {ref}) differs from the model's (vocab {mine}), so its "
        f"gen-PPL would be meaningless; train a reference for that study with "
        f"`loopsearch reference train {study or 'STUDY'}`")


# ---- scoring -------------------------------------------------------------------------------------------------
def _windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) for scoring ``length`` tokens with at most ``window`` at a time: the
    window [begin, end) predicts its tokens from index ``first`` on; every token but the first
    of the sequence is predicted exactly once, with at least window // 2 tokens of context
    after the first window."""
    stride = max(1, window // 2)
    out, scored_to, begin = [], 1, 0
    while scored_to < length:
        end = min(begin + window, length)
        out.append((begin, end, scored_to - begin))
        scored_to, begin = end, begin + stride
    return out


@torch.no_grad()
def gen_ppl(reference_model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 32,
            device: str | torch.device | None = None) -> dict[str, float]:
    """Generative perplexity of ``tokens`` (B, T) under the reference: exp of the mean over all
    predicted tokens (every position but the first of each sample) of -log p(x_i | x_<i).
    Samples longer than the reference's training length are scored in sliding windows.
    Returns gen_ppl, nll (nats/token), tokens (how many were scored), and the uncertainty from the
    finite number of samples: nll_se (over samples, each sample's mean NLL one value; None with one
    sample) and gen_ppl_lo/gen_ppl_hi (exp of the 95% t interval of nll)."""
    model = reference_model
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise LoopsearchError(f"gen_ppl needs samples of shape (batch, length >= 2), got {tuple(tokens.shape)}")
    vocab = model.mask_id
    bad = tokens[(tokens < 0) | (tokens >= vocab)]
    if bad.numel():
        raise LoopsearchError(f"samples contain token id {int(bad[0])} outside the reference vocabulary "
                              f"(0..{vocab - 1}); unmask every position (id {vocab} is MASK) and use the "
                              f"study's tokeniser")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    window = int(model.cos.shape[0]) + 1  # seq_len inputs (the rotary tables end there) predict seq_len tokens
    total, count = 0.0, 0
    per_sample: list[float] = []  # each sample's mean NLL
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        sums = torch.zeros(chunk.shape[0], dtype=torch.float64)
        n = 0
        for begin, end, first in _windows(chunk.shape[1], window):
            x = chunk[:, begin:end]
            logp = causal_logits(model, x[:, :-1]).float().log_softmax(-1)  # predicts x[:, 1:]
            picked = logp.gather(-1, x[:, 1:, None]).squeeze(-1)[:, first - 1 :]
            total -= picked.sum().item()
            count += picked.numel()
            sums -= picked.sum(-1).double().cpu()
            n += picked.shape[1]
        per_sample += (sums / n).tolist()
    nll = total / count
    ci = mean_interval(per_sample)
    return {"gen_ppl": math.exp(nll), "nll": nll, "tokens": count, "nll_se": ci.se,
            "gen_ppl_lo": None if ci.se is None else math.exp(nll - ci.half_width),
            "gen_ppl_hi": None if ci.se is None else math.exp(nll + ci.half_width)}


def unigram_entropy(tokens) -> float:
    """Mean over samples of the entropy (nats) of each sample's token frequency distribution.
    Repetitive samples score low here and low on gen-PPL: report both."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    if not rows or not all(rows):
        raise LoopsearchError("unigram_entropy needs at least one non-empty sample")
    total = 0.0
    for row in rows:
        counts = torch.unique(torch.as_tensor(row), return_counts=True)[1].double()
        p = counts / counts.sum()
        total += float(-(p * p.log()).sum())
    return total / len(rows)


def score_samples(reference_model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 32,
                  device: str | torch.device | None = None) -> dict[str, float]:
    """gen_ppl's dict plus ``entropy``: the unigram entropy that must be read beside gen-PPL."""
    return {**gen_ppl(reference_model, tokens, batch_size, device), "entropy": unigram_entropy(tokens)}
