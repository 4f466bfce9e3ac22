"""The trainer: MDLM loss under an exact training-FLOP budget. Knows nothing about Optuna.

Budget rule: a step runs only if the FLOPs spent so far plus that step's FLOPs (known before
the step from the loop count drawn for it, see flops.py) stay within the budget, so a run never
exceeds its budget and ends less than one step short of it. The learning-rate schedule
(linear warmup, cosine decay) runs over the budget's FLOPs, not over a step count, so it ends
exactly when the budget does whatever loop counts were drawn; the planned step count shown is
budget / expected step FLOPs (as nanochat's --target-flops).

Fault tolerance: with a ``Checkpointer`` (loopsearch/resume.py) the trainer restores the newest
saved state before the first step and saves one every ``checkpoint_every`` FLOPs.

Data parallel: inside an initialised ``torch.distributed`` group (``torchrun``), every rank draws
the same global batch, masks and mask rates from the shared seed, runs its contiguous shard of
``batch_size / world`` sequences through ``DistributedDataParallel`` (which averages gradients),
and all ranks agree on the loss and the FLOPs charged. The optimisation is the one-process run
with the same global batch, up to floating-point reduction order.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import interrupt, probe
from .data import PreparedData, random_batch, subsample, validation_windows
from .diffusion import EXPECTED_MASKED_SHARE, Validation, diffusion_loss, validation_elbo
from .errors import BudgetError, LoopsearchError
from .flops import TRAIN_MULTIPLIER
from .looping import ExecutionRecorder, LoopedMDM
from .resume import Checkpointer, TrainState
from .spec import TrainConfig
from .units import format_flops

# report(gflops, val_nll): called at every FLOP checkpoint (its nominal GFLOPs); may raise to stop (pruning).
Reporter = Callable[[int, float], None]


@dataclass
class TrainResult:
    train_flops: float  # FLOPs actually spent (forward + backward of every step run)
    budget: float
    steps: int
    planned_steps: int
    tokens: int
    val_nll: float  # nats/token, ELBO bound on held-out data at the end
    val_se: float  # its Monte-Carlo standard error given the validation windows
    final_loss: float
    wall_s: float
    tokens_per_s: float
    flops_per_s: float  # achieved training FLOP/s
    mean_train_loops: float
    history: list[tuple[float, ...]] = field(default_factory=list)  # (train FLOPs, val nll, se)
    # what the final validation executed, per sequence (the model's own inference mode)
    eval_applications: float = 0.0
    eval_extra_flops: float = 0.0
    eval_token_loops: float | None = None  # mean loops per masked token, for strategies that report it
    # strategy stats averaged over steps, and head_share: the share of positions the output head ran
    # on (the masked ones; the loss needs no others)
    train_stats: dict[str, float] = field(default_factory=dict)
    validation: Validation | None = None  # the final validation's per-(window, draw) values
    eval_s: float = 0.0  # wall seconds this process spent validating (inside wall_s)
    speed: dict = field(default_factory=dict)  # precision / compile chosen and why (loopsearch/probe.py)


@contextlib.contextmanager
def saved_on_interrupt(checkpointer: Checkpointer | None, state, model, opt, gens):
    """A Ctrl-C or SIGTERM taken at a safe point (``interrupt.Interrupted``: between steps or
    between validation batches, never inside a step) saves the training state before it ends the
    trial, so the trial's retry resumes there instead of starting over."""
    try:
        yield
    except interrupt.Interrupted:
        if checkpointer is not None and checkpointer.writer and state.steps > 0:
            checkpointer.save(state, model, opt, gens)
        raise


def distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group this process is in; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


STREAMS = ("data", "masks", "loops")  # separate random streams: arms with one seed see the same batches


def streams(seed: int) -> dict[str, torch.Generator]:
    """The trainer's random streams: data order, training masks and mask rates, loop-count draws.
    Separate streams so that what one trial draws (a loop count) never shifts another's data:
    every trial with the same seed trains on the same batches in the same order."""
    from .diffusion import keyed_generator

    return {name: keyed_generator(seed, -1 - i) for i, name in enumerate(STREAMS)}


def resolve_device(name: str) -> torch.device:
    """The torch device a ``device`` setting names; a one-line LoopsearchError for a device this
    machine does not have (checked before any trial starts: ``check_device``)."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed()[1] > 1:  # one GPU per DDP rank
        import os

        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device(name)


def training_memory(model: LoopedMDM, cfg: TrainConfig) -> float:
    """A rough upper estimate of a training step's memory in bytes, from the model's shape only
    (works on a meta-device model, before anything is allocated): fp32 weights, gradients and the
    two AdamW moments (16 bytes a parameter), activations kept for the backward pass (about 16
    floats of d_model per token, layer and loop application, plus the attention scores of the math
    kernel) and the logits with their gradient."""
    b, t = cfg.batch_size, cfg.seq_len
    bb = model.backbone
    params = sum(p.numel() for p in model.parameters())
    loops = model.strategy.max_train_loops() if model.strategy.loops_block else 1
    layers = bb.n_layer + (loops - 1) * (model.loop_end - model.loop_start)
    heads = int(getattr(getattr(bb, "params", None), "n_heads", 1) or 1)
    vocab = int(getattr(bb, "n_tokens", 0) or getattr(bb, "vocab_size", 0) or 0)
    activations = 4.0 * b * t * layers * (16 * bb.d_model + 2 * heads * t)
    logits = 4.0 * b * t * vocab * 3
    return 16.0 * params + activations + logits


def available_memory(device: torch.device) -> float | None:
    """Free memory in bytes on ``device`` (CUDA: free device memory; CPU: MemAvailable of
    /proc/meminfo), or None where it cannot be read."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(model: LoopedMDM, cfg: TrainConfig, device: torch.device | None = None) -> None:
    """Refuse, before any allocation, a configuration whose estimated training memory exceeds
    what the device has free (LoopsearchError naming the estimate)."""
    device = device or resolve_device(cfg.device)
    need, free = training_memory(model, cfg), available_memory(device)
    if free is not None and need > free:
        params = sum(p.numel() for p in model.parameters())
        raise LoopsearchError(
            f"this configuration needs about {need / 2**30:.1f} GiB to train ({params / 1e6:.1f}M parameters, batch "
            f"{cfg.batch_size} x seq {cfg.seq_len}) but {device.type} has {free / 2**30:.1f} GiB free; lower "
            f"d_model, n_layer, batch_size or seq_len")


def check_device(name: str) -> None:
    """Raise LoopsearchError unless ``name`` is auto, cpu, cuda or cuda:N that this machine has."""
    import re

    if name in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise LoopsearchError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise LoopsearchError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu or auto")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise LoopsearchError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _agree(values: list[float], world: int, device: torch.device) -> list[float]:
    """The mean over DDP ranks of per-rank values (loss, loop applications, strategy stats)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast without a probe (the reference LM, DDP runs): on CUDA when supported; on CPU
    only if asked. Trials decide "auto" by measurement (``choose_speed``, loopsearch/probe.py)."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def choose_speed(model: LoopedMDM, cfg: TrainConfig, device: torch.device, train_ids: torch.Tensor,
                 planned: int, world: int) -> probe.Choice:
    """Precision and compilation for this trial: as set, or (``auto``) measured by a short probe
    of the trial's own model on this machine (loopsearch/probe.py). DDP runs are not probed."""
    if world > 1:
        return probe.Choice(probe.Setting("bf16" if use_bf16(cfg.precision, device) else "fp32",
                                          cfg.compile is True), "DDP: not probed")
    loops = max(1, int(round(model.strategy.expected_train_loops())))
    mask_id = model.backbone.mask_id

    def probe_step(forward, opt) -> None:
        gen = torch.Generator().manual_seed(0)  # the probe's own stream: the trial's are untouched
        x0 = random_batch(train_ids, cfg.batch_size, cfg.seq_len, gen).to(device)
        loss, _ = diffusion_loss(forward, x0, mask_id, gen, loops, cfg.antithetic, positions=model.supports_positions,
                                 targets=model.strategy.uses_targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    shape = {"params": sum(p.numel() for p in model.parameters()), "n_layer": model.backbone.n_layer,
             "d_model": model.backbone.d_model, "batch": cfg.batch_size, "seq_len": cfg.seq_len,
             "block": [model.loop_start, model.loop_end], "strategy": model.strategy.name, "loops": loops}
    return probe.choose(model, probe_step, cfg.precision, cfg.compile, device, planned, shape)


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
                                  model.strategy.expected_extra_flops(cfg.seq_len),
                                  EXPECTED_MASKED_SHARE if model.supports_positions else 1.0,
                                  model.strategy.expected_forward_only())
    return int(budget // mean)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type == "cuda" for p in params)  # one kernel per step on a GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def train(model: LoopedMDM, data: PreparedData, cfg: TrainConfig, budget: float, seed: int,
          report: Reporter | None = None, progress: bool = True, description: str = "training",
          checkpointer: Checkpointer | None = None, eval_seed: int | None = None) -> TrainResult:
    """Train until the next step would exceed ``budget`` FLOPs. ``report`` runs at every FLOP
    checkpoint (on every DDP rank); ``checkpointer`` restores a saved state and saves new ones.
    ``seed``: initialisation is the caller's; data order, masks and loop counts come from it here.
    ``eval_seed`` keys the validation masks (default ``seed``): trials scored with the same one
    are scored on identical masks, whatever their seed, batch size or loop count."""
    # ---- set-up: device, DDP, optimizer, random streams, validation windows ----
    device = resolve_device(cfg.device)
    model.to(device)
    planned = plan_steps(model, cfg, budget)
    rank, world = distributed()
    if cfg.batch_size % world:
        raise LoopsearchError(f"batch_size {cfg.batch_size} does not split over {world} DDP processes; "
                              f"use a batch_size divisible by {world} (the global batch is what is searched)")
    train_ids = data.train if cfg.train_tokens is None else data.train[:cfg.train_tokens]  # (N,) token ids
    speed = choose_speed(model, cfg, device, train_ids, planned, world)
    bf16, compiled = speed.setting.precision == "bf16", speed.setting.compile
    forward = torch.compile(model) if compiled else model
    step_forward = forward
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=True)  # strategies may skip parameters on a step
        step_forward = torch.compile(ddp) if compiled else ddp
    opt = make_optimizer(model, cfg)
    gens = streams(seed)
    mask_id = model.backbone.mask_id
    eval_seed = seed if eval_seed is None else eval_seed
    windows, window_keys = validation_windows(data.valid, cfg.seq_len, cfg.eval_sequences)
    curve_windows, curve_keys = subsample(windows, window_keys, cfg.eval_curve_sequences)
    windows, curve_windows = windows.to(device), curve_windows.to(device)
    checkpoints = [budget * (i + 1) / cfg.eval_points for i in range(cfg.eval_points)]
    shard = (rank, world) if world > 1 else None
    recorder = ExecutionRecorder(forward)
    # every counter lives in the state a checkpoint saves (loopsearch/resume.py)
    restored = checkpointer.restore(model, opt, gens) if checkpointer is not None else None
    state = copy.deepcopy(restored) if restored is not None else TrainState()
    timing = {"eval_s": 0.0}

    def evaluate(final: bool = False) -> Validation:
        """Validate: the learning curve's checkpoints on ``eval_curve_sequences`` windows, the final
        validation on all ``eval_sequences`` (the same masks for the windows both use)."""
        began = time.perf_counter()
        model.eval()
        recorder.reset()  # keep what the latest validation executed
        w, k = (windows, window_keys) if final else (curve_windows, curve_keys)
        with probe.attention_backend(compiled, device), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            val = validation_elbo(recorder, w, k, mask_id, cfg.eval_draws, seed=eval_seed,
                                  batch_size=cfg.eval_batch_size)
        model.train()
        timing["eval_s"] += time.perf_counter() - began
        nominal = checkpoints[min(len(state.history), len(checkpoints) - 1)]
        state.history.append((state.spent, val.nll, val.se))
        if report is not None:
            # keyed by the checkpoint's nominal GFLOPs (budget * i / eval_points), not the FLOPs spent, so
            # every trial of a study reports at the same steps whatever its step cost (pruners compare
            # trials at equal steps); in GFLOPs because Optuna's step is 32-bit on PostgreSQL
            report(int(nominal // 1e9), val.nll)
        return val

    def step(n_loops: int, step_flops: float) -> None:
        """One optimizer step at ``n_loops`` loops: learning rate, batch, loss (agreed over DDP
        ranks and checked finite before the update), backward, clip, update, and what it cost."""
        for group in opt.param_groups:
            group["lr"] = lr_at(state.spent / budget, cfg)
        x0 = random_batch(train_ids, cfg.batch_size, cfg.seq_len, gens["data"]).to(device)
        with probe.attention_backend(compiled, device), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, out = diffusion_loss(step_forward, x0, mask_id, gens["masks"], n_loops, cfg.antithetic, shard=shard,
                                       positions=model.supports_positions,  # the head only where the loss is
                                       loop_generator=gens["loops"],  # what a strategy draws inside the loop
                                       targets=model.strategy.uses_targets)  # a loss over exits needs x0
        keys = sorted(out.stats)
        loss_val, applications, extra, head_share, forward_only, *stat_values = _agree(
            [loss.item(), float(out.applications), float(out.extra_flops), float(getattr(out, "head_share", 1.0)),
             float(getattr(out, "forward_only", 0.0))] + [float(out.stats[k]) for k in keys], world, device)
        if not math.isfinite(loss_val):  # before the update: the weights stay finite
            state.spent += step_flops / TRAIN_MULTIPLIER  # the forward ran (training = 3x forward)
            raise FloatingPointError(f"non-finite training loss {loss_val} at step {state.steps + 1}; "
                                     f"lower lr ({cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        # count what ran (a strategy may stop early); never more than the pre-checked bound
        state.spent += min(step_flops, model.train_step_flops(cfg.seq_len, cfg.batch_size, applications, extra,
                                                              head_share, forward_only))
        state.steps += 1
        state.loss = loss_val
        state.loops_sum += applications
        for key, value in zip(keys + ["head_share"], stat_values + [head_share]):  # head_share: the trainer's own
            state.stats_sum[key] = state.stats_sum.get(key, 0.0) + value

    # compile = "auto": the trial's first steps run compiled and are timed (probe.settle_trial_compile)
    trying = {"warm": 0.0, "timed": 0.0, "n": 0, "want": probe.probe_steps(planned, 1)} if speed.trial_compile else None

    def tried(dt: float) -> None:
        """Time one compiled step; once enough are timed, keep compilation or go on eager."""
        nonlocal forward, step_forward, compiled, trying
        trying["n"] += 1
        if trying["n"] <= probe.WARMUP_STEPS:
            trying["warm"] += dt
            return
        trying["timed"] += dt
        if trying["n"] < probe.WARMUP_STEPS + trying["want"]:
            return
        if not probe.settle_trial_compile(speed, trying["warm"], trying["timed"], trying["want"]):
            forward = step_forward = recorder.model = model  # eager from here on (same weights, same optimizer)
            compiled = False
        trying = None

    # ---- the loop: a step runs only if its FLOPs (known before it runs) fit in the budget ----
    n_max = model.strategy.max_train_loops()
    worst_step = model.train_step_flops(cfg.seq_len, cfg.batch_size, n_max,
                                        model.strategy.extra_flops_bound(n_max, cfg.seq_len))
    model.train()
    start = time.perf_counter()
    start_spent, start_steps = state.spent, state.steps
    with saved_on_interrupt(checkpointer, state, model, opt, gens):
        with _progress(progress and rank == 0, description, budget) as bar:
            while True:
                interrupt.check()  # a Ctrl-C during a study stops here, not inside a storage call
                n_loops = model.strategy.train_loops(gens["loops"])
                step_flops = model.train_step_flops(cfg.seq_len, cfg.batch_size, n_loops,
                                                    model.strategy.extra_flops_bound(n_loops, cfg.seq_len))
                if state.spent + step_flops > budget:
                    break
                began = time.perf_counter()
                try:
                    step(n_loops, step_flops)
                    if trying is not None:
                        tried(time.perf_counter() - began)
                finally:
                    if checkpointer is not None:
                        checkpointer.track(state.spent, state.steps)  # what a pruned or failed trial used
                elapsed = time.perf_counter() - start
                tokens = (state.steps - start_steps) * cfg.batch_size * cfg.seq_len
                bar.update(state.spent, state.loss, tokens / elapsed, (state.spent - start_spent) / elapsed)
                while len(state.history) < len(checkpoints) - 1 and state.spent >= checkpoints[len(state.history)]:
                    evaluate()
                if checkpointer is not None:
                    checkpointer.after_step(state, worst_step, model, opt, gens)
        if state.steps == 0:
            raise BudgetError(f"budget {format_flops(budget)} did not pay for one step; raise --budget")
        final = evaluate(final=True)

    # ---- the result ----
    wall = time.perf_counter() - start
    ran_tokens = (state.steps - start_steps) * cfg.batch_size * cfg.seq_len  # this process (not restored steps)
    eval_apps, eval_extra = recorder.means()
    return TrainResult(
        train_flops=state.spent, budget=budget, steps=state.steps, planned_steps=planned,
        tokens=state.steps * cfg.batch_size * cfg.seq_len, val_nll=final.nll, val_se=final.se,
        final_loss=state.loss, wall_s=wall, tokens_per_s=ran_tokens / wall,
        flops_per_s=(state.spent - start_spent) / wall, mean_train_loops=state.loops_sum / state.steps,
        history=list(state.history), eval_applications=eval_apps, eval_extra_flops=eval_extra,
        eval_token_loops=recorder.mean_token_loops(),
        train_stats={k: v / state.steps for k, v in state.stats_sum.items()}, validation=final,
        eval_s=timing["eval_s"], speed=speed.record())


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
