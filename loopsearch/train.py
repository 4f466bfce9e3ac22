"""The trainer: MDLM loss under an exact training-FLOP budget. Knows nothing about Optuna.

Budget rule: a step runs only if the FLOPs spent so far plus that step's FLOPs (known before
the step from the loop count drawn for it, see flops.py) stay within the budget, so a run never
exceeds its budget and ends less than one step short of it. The learning-rate schedule
(linear warmup, cosine decay) runs over the budget's FLOPs, not over a step count, so it ends
exactly when the budget does whatever loop counts were drawn; the planned step count shown is
budget / expected step FLOPs (as nanochat's --target-flops).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .data import PreparedData, random_batch, validation_batches
from .diffusion import diffusion_loss, validation_nll
from .errors import BudgetError
from .looping import ExecutionRecorder, LoopedMDM
from .spec import TrainConfig
from .units import format_flops

# report(gflops_spent, val_nll): called at every FLOP checkpoint; may raise to stop (pruning).
Reporter = Callable[[int, float], None]


@dataclass
class TrainResult:
    train_flops: float  # FLOPs actually spent (forward + backward of every step run)
    budget: float
    steps: int
    planned_steps: int
    tokens: int
    val_nll: float  # nats/token, ELBO bound on held-out data at the end
    final_loss: float
    wall_s: float
    tokens_per_s: float
    flops_per_s: float  # achieved training FLOP/s
    mean_train_loops: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (train FLOPs, val nll)
    # what the final validation executed, per sequence (the model's own inference mode)
    eval_applications: float = 0.0
    eval_extra_flops: float = 0.0
    eval_token_loops: float | None = None  # mean loops per masked token, for strategies that report it
    train_stats: dict[str, float] = field(default_factory=dict)  # strategy stats averaged over steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: on CUDA when supported; on CPU only if asked (on the tiny models
    loopsearch trains on CPU, fp32 measured faster, see benchmarks/train_throughput.py)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def lr_at(progress: float, cfg: TrainConfig) -> float:
    """Learning rate at a fraction of the FLOP budget: linear warmup then cosine decay."""
    if progress < cfg.warmup_frac:
        return cfg.lr * (progress + 1e-3) / cfg.warmup_frac
    frac = (progress - cfg.warmup_frac) / max(1e-9, 1 - cfg.warmup_frac)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def plan_steps(model: LoopedMDM, cfg: TrainConfig, budget: float) -> int:
    """Optimizer steps the budget buys at the strategy's mean loop count; raises BudgetError
    when the budget cannot pay for a single step at the largest loop count."""
    n_max = model.strategy.max_train_loops()
    worst = model.train_step_flops(cfg.seq_len, cfg.batch_size, n_max,
                                   model.strategy.extra_flops_bound(n_max, cfg.seq_len))
    if budget < worst:
        raise BudgetError(
            f"budget {format_flops(budget)} is below one training step ({format_flops(worst)} for this model "
            f"at batch {cfg.batch_size} x seq {cfg.seq_len}); raise --budget to at least {worst:.3g}"
        )
    expected = model.strategy.expected_train_loops()
    mean = model.train_step_flops(cfg.seq_len, cfg.batch_size, expected,
                                  model.strategy.extra_flops_bound(int(round(expected)), cfg.seq_len))
    return int(budget // mean)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def train(model: LoopedMDM, data: PreparedData, cfg: TrainConfig, budget: float, seed: int,
          report: Reporter | None = None, progress: bool = True, description: str = "training") -> TrainResult:
    device = resolve_device(cfg.device)
    model.to(device)
    planned = plan_steps(model, cfg, budget)
    bf16 = use_bf16(cfg.precision, device)
    forward = torch.compile(model) if cfg.compile else model
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(seed)  # data order, masks, t and loop counts
    mask_id = model.backbone.mask_id
    val = [b.to(device) for b in validation_batches(data.valid, cfg.seq_len, cfg.eval_sequences, cfg.batch_size)]
    checkpoints = [budget * (i + 1) / cfg.eval_points for i in range(cfg.eval_points)]
    history: list[tuple[float, float]] = []

    recorder = ExecutionRecorder(forward)

    def evaluate(spent: float) -> float:
        model.eval()
        recorder.reset()  # keep what the latest validation executed
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            nll = validation_nll(recorder, val, mask_id, cfg.eval_t_points, seed=seed + 1)
        model.train()
        history.append((spent, nll))
        if report is not None:
            report(int(spent // 1e9), nll)  # keyed in GFLOPs: Optuna's step is 32-bit on PostgreSQL
        return nll

    spent, steps, loops_sum, loss_val = 0.0, 0, 0.0, float("nan")
    stats_sum: dict[str, float] = {}
    model.train()
    start = time.perf_counter()
    with _progress(progress, description, budget) as bar:
        while True:
            n_loops = model.strategy.train_loops(gen)
            extra_bound = model.strategy.extra_flops_bound(n_loops, cfg.seq_len)
            step_flops = model.train_step_flops(cfg.seq_len, cfg.batch_size, n_loops, extra_bound)
            if spent + step_flops > budget:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(spent / budget, cfg)
            x0 = random_batch(data.train, cfg.batch_size, cfg.seq_len, gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, out = diffusion_loss(forward, x0, mask_id, gen, n_loops, cfg.antithetic)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            # count what ran (a strategy may stop early); never more than the pre-checked bound
            spent += min(step_flops, model.train_step_flops(cfg.seq_len, cfg.batch_size, out.applications,
                                                            out.extra_flops))
            steps += 1
            loops_sum += out.applications
            for key, value in out.stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
            loss_val = loss.item()
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"non-finite training loss {loss_val} at step {steps}; lower lr ({cfg.lr})")
            elapsed = time.perf_counter() - start
            bar.update(spent, loss_val, steps * cfg.batch_size * cfg.seq_len / elapsed, spent / elapsed)
            while len(history) < len(checkpoints) - 1 and spent >= checkpoints[len(history)]:
                evaluate(spent)
    if steps == 0:
        raise BudgetError(f"budget {format_flops(budget)} did not pay for one step; raise --budget")
    nll = evaluate(spent)
    wall = time.perf_counter() - start
    tokens = steps * cfg.batch_size * cfg.seq_len
    eval_apps, eval_extra = recorder.means()
    return TrainResult(spent, budget, steps, planned, tokens, nll, loss_val, wall, tokens / wall,
                       spent / wall, loops_sum / steps, history, eval_apps, eval_extra,
                       recorder.mean_token_loops(), {k: v / steps for k, v in stats_sum.items()})


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args) -> None:
        pass


class _RichBar(_NullBar):
    """FLOPs spent / budget, loss, tokens/s and achieved FLOP/s."""

    def __init__(self, description: str, budget: float):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[flops]}"), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TextColumn("{task.fields[fps]}/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
        )
        self.budget = budget
        self.task = self.progress.add_task(description, total=budget, flops="", loss="-", tps="-", fps="-")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, spent: float, loss: float, tps: float, fps: float) -> None:
        self.progress.update(
            self.task, completed=spent, loss=f"{loss:.3f}", tps=f"{tps:,.0f}", fps=format_flops(fps),
            flops=f"{format_flops(spent)} / {format_flops(self.budget)}",
        )


def _progress(enabled: bool, description: str, budget: float):
    return _RichBar(description, budget) if enabled else _NullBar()
