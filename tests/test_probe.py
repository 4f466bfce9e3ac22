"""Precision and compilation chosen by measurement (loopsearch/probe.py): the decision logic on
stubbed timings, the candidates a machine gets, the cache, and a real probe on a tiny model."""

import pytest
import torch

from loopsearch import probe
from loopsearch.probe import Setting

FP32, BF16 = Setting("fp32", False), Setting("bf16", False)
FP32C, BF16C = Setting("fp32", True), Setting("bf16", True)
CPU = torch.device("cpu")


def test_bf16_is_never_chosen_without_bf16_units_however_fast_it_looks():
    best, _ = probe.decide({FP32: 1.0, BF16: 0.1}, {}, steps=1000, bf16_ok=False)
    assert best == FP32


def test_the_faster_precision_wins_where_bf16_units_exist():
    assert probe.decide({FP32: 1.0, BF16: 0.6}, {}, steps=1000, bf16_ok=True)[0] == BF16
    assert probe.decide({FP32: 0.6, BF16: 1.0}, {}, steps=1000, bf16_ok=True)[0] == FP32  # AVX2-like: bf16 slow


def test_a_win_inside_the_margin_keeps_the_simpler_setting():
    assert probe.decide({FP32: 1.0, BF16: 0.97}, {}, steps=1000, bf16_ok=True)[0] == FP32


def test_compilation_is_chosen_only_when_it_pays_for_itself_over_the_trial():
    step_s = {FP32: 1.0, FP32C: 0.5}
    # 100 steps: 100 s eager vs 50 s + 60 s compile -> eager; 1000 steps: 1000 vs 560 -> compiled
    assert probe.decide(step_s, {FP32C: 60.0}, steps=100, bf16_ok=False)[0] == FP32
    best, reason = probe.decide(step_s, {FP32C: 60.0}, steps=1000, bf16_ok=False)
    assert best == FP32C and "fp32 + compile" in reason and "1000 steps" in reason
    # the fastest of four (bf16 + compile, as on an AVX512-BF16 CPU at d_model 256)
    four = {FP32: 1.0, BF16: 0.62, FP32C: 0.8, BF16C: 0.29}
    assert probe.decide(four, {FP32C: 40.0, BF16C: 40.0}, steps=2000, bf16_ok=True)[0] == BF16C


def test_candidates_follow_the_hardware_and_the_trial_length(monkeypatch):
    monkeypatch.setattr(probe, "bf16_supported", lambda device: False)
    assert probe.candidates("auto", "auto", CPU, eager_trial_s=10.0) == [FP32]
    assert probe.candidates("auto", "auto", CPU, eager_trial_s=1e4) == [FP32, FP32C]
    assert probe.candidates("bf16", False, CPU, None) == [BF16]  # asked for: allowed, not probed against
    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)
    assert probe.candidates("auto", "auto", CPU, eager_trial_s=10.0) == [FP32, BF16]
    assert set(probe.candidates("auto", "auto", CPU, eager_trial_s=1e4)) == {FP32, FP32C, BF16, BF16C}


def _stub(monkeypatch, timings: dict, calls: list):
    def fake(model, step_fn, setting, device, timed=probe.TIMED_STEPS):
        calls.append(setting)
        return timings[setting]
    monkeypatch.setattr(probe, "_time_steps", fake)


def test_choose_probes_once_per_shape_and_machine_then_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)
    calls = []
    _stub(monkeypatch, {FP32: (0.010, 0.0), BF16: (0.006, 0.0)}, calls)
    shape = {"d_model": 256, "n_layer": 8}
    first = probe.choose(None, None, "auto", "auto", CPU, steps=100, shape=shape)  # 1 s eager: compile not probed
    assert first.setting == BF16 and not first.cached and set(calls) == {FP32, BF16}
    assert "compile not probed" in first.reason and first.step_s == {"fp32": 0.010, "bf16": 0.006}
    calls.clear()
    again = probe.choose(None, None, "auto", "auto", CPU, steps=100, shape=shape)
    assert again.setting == BF16 and again.cached and calls == []
    other = probe.choose(None, None, "auto", "auto", CPU, steps=100, shape={"d_model": 64})
    assert not other.cached and calls  # another shape is probed anew


def test_a_fixed_setting_is_not_probed(monkeypatch):
    calls = []
    _stub(monkeypatch, {}, calls)
    c = probe.choose(None, None, "fp32", False, CPU, steps=10, shape={})
    assert c.setting == FP32 and c.reason == "set in the recipe" and calls == []
    monkeypatch.setattr(probe, "bf16_supported", lambda device: False)
    c = probe.choose(None, None, "auto", False, CPU, steps=10, shape={})
    assert c.setting == FP32 and "no bf16 units" in c.reason and calls == []


def test_an_unwritable_cache_never_fails_a_trial(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LOOPSEARCH_CACHE", str(blocker / "sub"))  # a directory under a file: cannot be made
    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)
    _stub(monkeypatch, {FP32: (0.01, 0.0), BF16: (0.02, 0.0)}, [])
    assert probe.choose(None, None, "auto", False, CPU, steps=10, shape={}).setting == FP32


def test_a_real_probe_times_the_trials_own_model_and_leaves_it_untouched(monkeypatch, tmp_path):
    from helpers import tiny_model
    from loopsearch.diffusion import diffusion_loss

    monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path))
    model = tiny_model(loop=(1, 3, {"n_loops": 2}))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def step(forward, opt):
        x0 = torch.randint(0, 49, (4, 16), generator=torch.Generator().manual_seed(0))
        loss, _ = diffusion_loss(forward, x0, model.backbone.mask_id, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)  # time both, whatever this CPU has
    c = probe.choose(model, step, "auto", False, CPU, steps=50, shape={"t": 1})
    assert set(c.step_s) == {"fp32", "bf16"} and all(v > 0 for v in c.step_s.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert c.record()["precision"] in ("fp32", "bf16")


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512f", False), ("avx2 avx512_bf16", True),
                                            ("amx_bf16 amx_tile", True)])
def test_bf16_units_are_read_from_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    fake = tmp_path / "cpuinfo"
    fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real = probe.Path

    monkeypatch.setattr(probe, "Path", lambda p: real(fake) if p == "/proc/cpuinfo" else real(p))
    assert probe.bf16_supported(CPU) is expected


def test_the_gpu_check_script_lists_its_steps_in_a_dry_run():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    r = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("cuda_tests", "tput_d256_compile", "tput_paper", "study_cuda", "ddp_torchrun"):
        assert f"would run ({name}," in r.stdout
    assert "--shape 12,768,12,1024,8,50257" in r.stdout and "torchrun" in r.stdout
    assert "dry run: nothing ran" in r.stdout


def test_the_probe_stays_small_against_the_trial():
    """At most PROBE_SHARE of a trial's steps are timed over all eager candidates, at least one each:
    a 144-step trial of 1-2 s steps (8L/d256 on one CPU core) times one step per setting, not five."""
    assert probe.probe_steps(144, 2) == 1
    assert probe.probe_steps(1700, 2) == probe.TIMED_STEPS
    assert probe.probe_steps(400, 2) == 4
    assert probe.probe_steps(10, 1) == 1


def test_compile_auto_is_tried_on_the_trial_then_cached(monkeypatch, tmp_path):
    """compile = "auto" on a long trial: no copy is compiled; the trial compiles its own model in the
    best eager precision and keeps compilation only if its timed steps beat eager by the margin. The
    outcome is cached: the next trial of the shape decides at once."""
    monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)
    calls = []
    _stub(monkeypatch, {FP32: (2.0, 0.0), BF16: (1.0, 0.0)}, calls)
    shape = {"d_model": 256}
    c = probe.choose(None, None, "auto", "auto", CPU, steps=1000, shape=shape)  # 1000 s eager: try compiling
    assert c.setting == BF16C and c.trial_compile and c.eager_step_s == 1.0 and set(calls) == {FP32, BF16}
    assert probe.settle_trial_compile(c, warm_s=30.0, timed_s=0.5, timed=1)  # 0.5 s vs 1.0 s: keep
    assert c.setting == BF16C and c.compile_s["bf16 + compile"] == pytest.approx(29.0)
    assert "-> bf16 + compile" in c.reason
    calls.clear()
    again = probe.choose(None, None, "auto", "auto", CPU, steps=1000, shape=shape)
    assert again.setting == BF16C and not again.trial_compile and calls == []  # decided from the cache
    slow = probe.choose(None, None, "auto", "auto", CPU, steps=1000, shape={"d_model": 64})
    assert not probe.settle_trial_compile(slow, warm_s=30.0, timed_s=0.98, timed=1)  # within margin
    assert slow.setting == BF16 and "-> bf16" in slow.reason
    assert probe.choose(None, None, "auto", "auto", CPU, steps=1000, shape={"d_model": 64}).setting == BF16


def test_a_trial_that_tries_compilation_goes_on_eager_when_it_does_not_pay(monkeypatch, tmp_path):
    """The trainer side: the first steps run compiled and are timed; a compiled step no faster than
    eager sends the rest of the trial eager, recorded in the trial's speed."""
    from helpers import tiny_model
    from loopsearch.data import PreparedData
    from loopsearch.spec import TrainConfig
    from loopsearch.train import train

    monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path))
    choice = probe.Choice(FP32C, "stub", {"fp32": 1e-9}, {}, False, trial_compile=True,
                          eager_step_s=1e-9, cache_key="k")  # eager "takes" 1 ns a step: compiled cannot beat it
    monkeypatch.setattr("loopsearch.train.choose_speed", lambda *a, **k: choice)
    compiled_calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled_calls.append(m) or m)  # no real compilation
    ids = torch.randint(0, 49, (4000,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=4, seq_len=16, min_steps=1, eval_sequences=8, eval_curve_sequences=8,
                      eval_points=1, precision="fp32", compile="auto")
    r = train(tiny_model(seq_len=16), PreparedData(ids, ids[:600].clone(), "", 49, "random"), cfg, 2e8, seed=0,
              progress=False)
    assert compiled_calls and r.speed["compile"] is False and "-> fp32" in r.speed["reason"]
    assert "fp32 + compile" in r.speed["step_s"]


def test_fp32_tries_compilation_only_on_long_trials(monkeypatch, tmp_path):
    """A failed try costs its compilation; fp32 gained only 1.09x from compiling (bf16 1.6-1.8x), so an
    fp32 trial tries it only above TRY_COMPILE_MIN_S["fp32"] (600 s eager), a bf16 one above 120 s."""
    monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(probe, "bf16_supported", lambda device: False)  # an AVX2-like CPU: fp32 only
    _stub(monkeypatch, {FP32: (1.0, 0.0)}, [])
    c = probe.choose(None, None, "auto", "auto", CPU, steps=300, shape={"a": 1})  # 300 s eager
    assert c.setting == FP32 and not c.trial_compile and "compile not tried" in c.reason
    assert probe.choose(None, None, "auto", "auto", CPU, steps=900, shape={"a": 2}).trial_compile
    monkeypatch.setattr(probe, "bf16_supported", lambda device: True)
    _stub(monkeypatch, {FP32: (2.0, 0.0), BF16: (1.0, 0.0)}, [])
    assert probe.choose(None, None, "auto", "auto", CPU, steps=150, shape={"a": 3}).trial_compile  # 150 s bf16
