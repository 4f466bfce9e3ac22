"""Precision and compilation chosen by measurement: ``precision = "auto"`` and ``compile = "auto"``.

Machines differ: on a CPU with bf16 matmul units (AVX512-BF16, AMX) bf16 autocast ran 1.6x and
bf16 + torch.compile 3.5x faster than fp32 at d_model 256; on one without them bf16 ran ~30x
slower. No constant default is right everywhere, so ``choose`` times a few training steps of the
trial's own model in each candidate setting on the machine that runs the trial and picks the one
whose *whole trial* is fastest: ``steps x seconds per step`` plus, for a compiled setting, the
compilation time measured by the probe (compiling pays only on long trials).

Rules:
- bf16 is a candidate only where the hardware has bf16 units (``bf16_supported``): never on a CPU
  without them, whatever a timing says.
- compiled settings are probed only when the trial's estimated eager time is at least
  ``COMPILE_MIN_S`` (below that, compilation, tens of seconds on a CPU, cannot pay for itself).
- a setting wins only if it beats the simpler one (fp32 before bf16, eager before compiled) by more
  than ``MARGIN``: timing noise must not flip the choice.
- with ``compile = "auto"`` compilation is not probed on a copy (that would compile twice): the trial
  compiles its own model in the best eager precision and times its first steps (``settle_trial_compile``:
  2 warm-up steps, which include the compilation, then ``probe_steps`` timed ones); if they are not
  ``MARGIN`` faster than the eager probe's steps, the trial goes on eager. The outcome is cached, so
  the next trials of the shape decide without trying. Measured 2026-12-02 on an AMX Xeon (8L/d256,
  bf16, one thread): compiling on a copy made the auto trial 166 s against 160 s for plain bf16 and
  about 105 s for bf16 + compile set by hand (two copies compiled, 57 s, before the trial's own).
- one candidate (fp32 eager): nothing is probed.
- the probe stays small against the trial: an eager setting gets one warm-up step and
  ``probe_steps(steps, n)`` timed ones (at most ``PROBE_SHARE`` of the trial's steps over all n
  candidates, at least 1, at most ``TIMED_STEPS``). A trial of few, long steps times one step per
  setting (one long step times well); a trial of many short steps times five.

Probes are cached per machine, torch version, thread count and model shape in
``$LOOPSEARCH_CACHE/probe.json`` (default ``~/.cache/loopsearch``), so the studies' next trial of the
same shape pays nothing. The probe trains a copy of the model with its own optimizer and random
generator: the trial's weights and random streams are untouched. The choice and the measured
speeds are recorded with the trial (``speed``) and shown in its line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

COMPILE_MIN_S = 120.0  # probe compilation only for trials expected to run at least this long eager
# ... and, with compile = "auto", try it on the trial only above these eager estimates per precision: a
# failed try costs its compilation (30-40 s at 8L/d256 on one CPU core). Measured 2026-12-02 (AMX Xeon,
# 8L/d256, one thread, math attention under compile): bf16 + compile 1.6-1.8x faster than bf16, fp32 +
# compile 1.09x faster than fp32; so fp32 tries only where a failed try costs under about 6%
TRY_COMPILE_MIN_S = {"bf16": 120.0, "fp32": 600.0}
MARGIN = 0.05  # a more complex setting must be this much faster (whole trial) to be chosen
WARMUP_STEPS, TIMED_STEPS = 2, 5  # warm-up steps (1 for an eager setting) and at most this many timed ones
PROBE_SHARE = 0.02  # timed probe steps of all eager settings together: at most this share of the trial's steps


@dataclass(frozen=True)
class Setting:
    precision: str  # "fp32" or "bf16"
    compile: bool

    @property
    def label(self) -> str:
        return f"{self.precision}{' + compile' if self.compile else ''}"


FP32 = Setting("fp32", False)


@dataclass
class Choice:
    """What ``choose`` decided and why: the setting, per-setting seconds per step and compile
    seconds as measured (empty when nothing needed probing), the estimated trial seconds."""

    setting: Setting
    reason: str
    step_s: dict[str, float] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    # compilation tried on the trial's own first steps (``settle_trial_compile``): the eager setting's
    # seconds per step to beat, and the cache key the outcome is stored under for the next trials
    trial_compile: bool = False
    eager_step_s: float = 0.0
    cache_key: str = ""

    def record(self) -> dict:
        return {"precision": self.setting.precision, "compile": self.setting.compile, "reason": self.reason,
                "step_s": self.step_s, "compile_s": self.compile_s, "cached": self.cached}


def attention_backend(compiled: bool, device: torch.device):
    """The attention kernels a (compiled) model runs with: on a CPU, a compiled model runs SDPA's math
    backend, which inductor fuses with the rest of the graph (2026-12-02, AMX Xeon, 8L/d256 bf16: the
    fused flash kernel left compile about 4% faster than eager, math about 1.8x, in
    benchmarks/train_throughput.py); elsewhere, and eager, torch's default choice."""
    if compiled and device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware has bf16 matmul units: CUDA's own check; on a CPU the avx512_bf16 or
    amx_bf16 flag (Linux /proc/cpuinfo; False where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def candidates(precision: str, compile_: bool | str, device: torch.device,
               eager_trial_s: float | None) -> list[Setting]:
    """The settings worth timing for a trial's ``precision`` / ``compile`` options."""
    precisions = ["fp32", "bf16"] if precision == "auto" else [precision]
    if precision == "auto" and not bf16_supported(device):
        precisions = ["fp32"]
    if compile_ == "auto":
        long_enough = eager_trial_s is not None and eager_trial_s >= COMPILE_MIN_S
        compiles = [False, True] if long_enough else [False]
    else:
        compiles = [bool(compile_)]
    return [Setting(p, c) for p in precisions for c in compiles]


def decide(step_s: dict[Setting, float], compile_s: dict[Setting, float], steps: int,
           bf16_ok: bool, margin: float = MARGIN) -> tuple[Setting, str]:
    """The setting with the shortest whole trial (``steps`` x seconds per step + compile time).
    Settings are tried from the simplest (fp32 eager) on; a later one replaces the current best
    only when its trial is shorter by more than ``margin``. bf16 is never chosen without bf16
    units (``bf16_ok`` False)."""
    order = sorted(step_s, key=lambda s: (s.compile, s.precision != "fp32"))
    usable = [s for s in order if bf16_ok or s.precision != "bf16"]
    if not usable:
        raise ValueError("no usable setting to choose from")

    def trial_s(s: Setting) -> float:
        return steps * step_s[s] + compile_s.get(s, 0.0)

    best = usable[0]
    for s in usable[1:]:
        if trial_s(s) < trial_s(best) * (1 - margin):
            best = s
    others = ", ".join(f"{s.label} {trial_s(s):.0f} s" for s in usable if s != best)
    reason = f"{best.label}: est. {trial_s(best):.0f} s for {steps} steps" + (f" (vs {others})" if others else "")
    return best, reason


# ---- measuring ------------------------------------------------------------------------------------
def probe_steps(steps: int, n_settings: int) -> int:
    """Timed steps per eager setting for a trial of ``steps`` steps with ``n_settings`` candidates."""
    return max(1, min(TIMED_STEPS, int(PROBE_SHARE * steps / max(n_settings, 1))))


def _time_steps(model, step_fn: Callable[[torch.nn.Module, torch.optim.Optimizer], None], setting: Setting,
                device: torch.device, timed: int = TIMED_STEPS) -> tuple[float, float]:
    """(seconds per step after warm-up, seconds of the warm-up beyond steady steps: compilation).
    Eager settings warm up with one step, compiled ones with ``WARMUP_STEPS``; ``timed`` steps are timed."""
    probe_model = copy.deepcopy(model).to(device).train()
    opt = torch.optim.AdamW([p for p in probe_model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(probe_model) if setting.compile else probe_model

    def one():
        with attention_backend(setting.compile, device), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.precision == "bf16"):
            step_fn(forward, opt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmup = WARMUP_STEPS if setting.compile else 1
    began = time.perf_counter()
    for _ in range(warmup):
        one()
    warm = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(timed):
        one()
    per_step = (time.perf_counter() - began) / timed
    return per_step, max(0.0, warm - warmup * per_step)


def settle_trial_compile(choice: Choice, warm_s: float, timed_s: float, timed: int) -> bool:
    """After a trial's first steps ran compiled (``choice.trial_compile``): ``warm_s`` seconds for the
    ``WARMUP_STEPS`` warm-up steps (the compilation included), ``timed_s`` for ``timed`` steps after
    them. Keep compilation when its steps beat the eager probe's by more than ``MARGIN`` (the
    compilation is paid already); record the outcome in ``choice`` and the cache. Returns whether the
    trial stays compiled."""
    per_step = timed_s / max(timed, 1)
    compile_cost = max(0.0, warm_s - WARMUP_STEPS * per_step)
    compiled = choice.setting
    eager = Setting(compiled.precision, False)
    keep = per_step < choice.eager_step_s * (1 - MARGIN)
    choice.step_s[compiled.label] = per_step
    choice.compile_s[compiled.label] = compile_cost
    choice.trial_compile = False
    if not keep:
        choice.setting = eager
    choice.reason += (f": {compiled.label} {per_step:.3g} s/step vs {eager.label} {choice.eager_step_s:.3g} s/step "
                      f"(compiled in {compile_cost:.0f} s) -> {choice.setting.label}")
    if choice.cache_key:
        cache = _load_cache()
        cache[choice.cache_key] = {"step_s": {json.dumps(asdict(compiled)): per_step},
                                   "compile_s": {json.dumps(asdict(compiled)): compile_cost}}
        _save_cache(cache)
    return keep


def _cache_path() -> Path:
    root = os.environ.get("LOOPSEARCH_CACHE") or Path.home() / ".cache" / "loopsearch"
    return Path(root) / "probe.json"


def machine_key(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return f"{device.type}|{name}|{cpu}|{os.cpu_count()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _key(device: torch.device, shape: dict, settings: list[Setting]) -> str:
    text = json.dumps({"machine": machine_key(device), "shape": shape, "settings": [s.label for s in settings]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: probe again next time, never fail a trial over a cache


def choose(model, step_fn, precision: str, compile_: bool | str, device: torch.device, steps: int,
           shape: dict) -> Choice:
    """Decide precision and compilation for a trial of ``steps`` optimizer steps. ``step_fn(forward,
    opt)`` runs one training step (forward, backward, optimizer) on a model; ``shape`` keys the
    cache (backbone, batch, sequence length, loop block and strategy)."""
    fixed = precision != "auto" and compile_ != "auto"
    if fixed:
        return Choice(Setting(precision, bool(compile_)), "set in the recipe")
    eager = candidates(precision, False if compile_ == "auto" else compile_, device, None)
    if len(eager) == 1 and compile_ != "auto":
        return Choice(eager[0], "the only candidate" + ("" if precision != "auto" else " (no bf16 units)"))
    cache = _load_cache()
    bf16_ok = bf16_supported(device)
    step_s: dict[Setting, float] = {}
    compile_s: dict[Setting, float] = {}
    eager_key = _key(device, shape, eager)
    hit = cache.get(eager_key)
    if hit:
        step_s.update({Setting(**json.loads(k)): v for k, v in hit["step_s"].items()})
    else:
        timed = probe_steps(steps, len(eager))
        for s in eager:
            step_s[s], _ = _time_steps(model, step_fn, s, device, timed=timed)
    best_eager = min(step_s.values())
    settings = candidates(precision, compile_, device, best_eager * steps)
    compiled = [s for s in settings if s.compile]
    cached = bool(hit)
    if compiled and compile_ == "auto":  # try compilation on the trial itself, in the best eager precision
        if not hit:
            cache[eager_key] = {"step_s": {json.dumps(asdict(s)): step_s[s] for s in eager}}
            _save_cache(cache)
        eager_best, eager_reason = decide(step_s, {}, steps, bf16_ok)
        floor = TRY_COMPILE_MIN_S.get(eager_best.precision, COMPILE_MIN_S)
        if step_s[eager_best] * steps < floor:
            return Choice(eager_best, f"{eager_reason}; compile not tried (est. {step_s[eager_best] * steps:.0f} s "
                                      f"{eager_best.label} < {floor:.0f} s)",
                          {s.label: v for s, v in step_s.items()}, {}, cached)
        target = Setting(eager_best.precision, True)
        key = _key(device, shape, [target])
        chit = cache.get(key)
        if chit:  # an earlier trial of this shape tried it: decide on its numbers
            step_s.update({Setting(**json.loads(k)): v for k, v in chit["step_s"].items()})
            compile_s.update({Setting(**json.loads(k)): v for k, v in chit["compile_s"].items()})
            best, reason = decide({eager_best: step_s[eager_best], target: step_s[target]}, compile_s, steps, bf16_ok)
            return Choice(best, reason + f" ({eager_reason})", {s.label: v for s, v in step_s.items()},
                          {s.label: v for s, v in compile_s.items()}, cached)
        return Choice(target, f"{eager_reason}; compile tried on the trial's first steps",
                      {s.label: v for s, v in step_s.items()}, {}, False, trial_compile=True,
                      eager_step_s=step_s[eager_best], cache_key=key)
    if compiled:
        key = _key(device, shape, compiled)
        chit = cache.get(key)
        if chit:
            step_s.update({Setting(**json.loads(k)): v for k, v in chit["step_s"].items()})
            compile_s.update({Setting(**json.loads(k)): v for k, v in chit["compile_s"].items()})
        else:
            cached = False
            timed = probe_steps(steps, len(compiled))
            for s in compiled:
                step_s[s], compile_s[s] = _time_steps(model, step_fn, s, device, timed=timed)
            cache[key] = {"step_s": {json.dumps(asdict(s)): step_s[s] for s in compiled},
                          "compile_s": {json.dumps(asdict(s)): compile_s[s] for s in compiled}}
    if not hit:
        cache[eager_key] = {"step_s": {json.dumps(asdict(s)): step_s[s] for s in eager}}
    if not hit or compiled:
        _save_cache(cache)
    best, reason = decide(step_s, compile_s, steps, bf16_ok)
    if compile_ == "auto" and not compiled:
        reason += f"; compile not probed (est. {best_eager * steps:.0f} s eager < {COMPILE_MIN_S:.0f} s)"
    return Choice(best, reason, {s.label: v for s, v in step_s.items()}, {s.label: v for s, v in compile_s.items()},
                  cached)
