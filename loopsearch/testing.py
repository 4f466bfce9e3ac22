"""Conformance suites for plugins (builtin or third-party): looping strategies
(:class:`StrategyConformance`), exit criteria (:class:`ExitConformance`), samplers
(:class:`SamplerConformance`) and backbones (:class:`BackboneConformance`); the last three are
documented in their classes.

A strategy author subclasses :class:`StrategyConformance` in a pytest test module::

    from loopsearch.testing import StrategyConformance

    class TestMyStrategy(StrategyConformance):
        strategy = "my_strategy"                      # its registered name
        params = {"n_loops": 3}                       # a valid configuration (its Params)
        one_loop_params = {"n_loops": 1}              # one loop == the plain model; None if n/a

pytest then runs every ``test_*`` method below on that configuration: the Params model rejects
unknown keys, one loop equals the plain (non-looped) model, the analytic FLOP accounting
matches ``torch.utils.flop_counter.FlopCounterMode``, the model is deterministic under a seed,
every parameter gets a gradient, the loop counts are consistent, and a tiny Optuna study with
the strategy runs to completion under its FLOP budget.

The base class has no ``Test`` prefix, so pytest does not collect it by itself. The strategy is
looked up through the plugin registry (``loopsearch.registry.get_registry()``): the package
defining it must be installed (its ``loopsearch`` entry point is what is tested).
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import pytest
import torch
from pydantic import ValidationError
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .diffusion import diffusion_loss, mask_tokens
from .looping import LoopedMDM

__all__ = ["BackboneConformance", "ExitConformance", "SamplerConformance", "StrategyConformance", "TINY_RECIPE",
           "measured_flops", "space_toml"]

# A tiny study: 4 layers, d_model 32, a few dozen optimizer steps per trial (seconds on a CPU).
TINY_RECIPE = """
description = "tiny conformance study"
space = "early_middle"
budget = "3e9"
n_trials = 3
vocab_size = 300
seed = 0

[corpus]
name = "shakespeare"

[backbone]
name = "transformer"
params = { n_layer = 4, d_model = 32, n_heads = 2 }

[train]
batch_size = 8
seq_len = 32
lr = 3e-3
min_steps = 5
eval_points = 2
eval_sequences = 16
eval_curve_sequences = 8
"""

FLOP_TOLERANCE = 0.02  # relative difference allowed between the analytic and the counted FLOPs


def measured_flops(fn) -> int:
    """FLOPs ``fn()`` executes, counted by FlopCounterMode. The math SDPA backend is forced:
    FlopCounterMode counts the fused CPU attention kernel as 0 FLOPs."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a search space")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to a search space; "
                    f"set study_space to the space's TOML text instead")


def space_toml(strategy: str, params: dict[str, Any], block: tuple[int, int]) -> str:
    """A search space holding one configuration: ``strategy`` with ``params`` fixed, looping
    exactly the layers ``block`` = (loop_start, loop_end)."""
    start, end = block
    lines = [f'name = "conformance_{strategy}"', f"strategies = [{json.dumps(strategy)}]", "",
             "[block]", f"layers = [{start}, {end}]", f"length = [{end - start}, {end - start}]", "",
             f"[strategy.{strategy}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in params.items()]
    return "\n".join(lines) + "\n"


class StrategyConformance:
    """Inherit this in a ``Test...`` class and set ``strategy`` and ``params`` (see the module
    docstring). Every class attribute below may be overridden."""

    strategy: ClassVar[str] = ""  # the registered name of the strategy under test
    params: ClassVar[dict[str, Any]] = {}  # its Params, as a dict
    one_loop_params: ClassVar[dict[str, Any] | None] = None  # params giving exactly one loop; None: skip
    block: ClassVar[tuple[int, int]] = (1, 3)  # (loop_start, loop_end)
    backbone: ClassVar[str] = "transformer"
    n_layer: ClassVar[int] = 4
    d_model: ClassVar[int] = 32
    n_heads: ClassVar[int] = 2
    vocab: ClassVar[int] = 50
    seq_len: ClassVar[int] = 16
    batch_size: ClassVar[int] = 4
    seed: ClassVar[int] = 0
    study_space: ClassVar[str | None] = None  # TOML text of the study's space; None: space_toml(...)
    study_recipe: ClassVar[str] = TINY_RECIPE

    # ---- builders ------------------------------------------------------------------------------
    @classmethod
    def registry(cls):
        from .registry import get_registry

        return get_registry()

    @classmethod
    def strategy_class(cls):
        if not cls.strategy:
            raise TypeError(f"{cls.__name__}: set the class attribute `strategy` to the registered name")
        return cls.registry().get("loop_strategy", cls.strategy)

    @classmethod
    def make_backbone(cls, seed: int | None = None):
        torch.manual_seed(cls.seed if seed is None else seed)
        params = {"n_layer": cls.n_layer, "d_model": cls.d_model, "n_heads": cls.n_heads}
        return cls.registry().build("backbone", cls.backbone, params, cls.vocab, cls.seq_len)

    @classmethod
    def make_model(cls, params: dict[str, Any] | None = None, seed: int | None = None,
                   strategy: str | None = None, block: tuple[int, int] | None = None) -> LoopedMDM:
        """A tiny LoopedMDM with the strategy under test (or ``strategy``) built through the
        registry; the same seed gives the same weights."""
        backbone = cls.make_backbone(seed)
        if not strategy:
            cls.strategy_class()  # a clear error when the class attribute is missing
        start, end = cls.block if block is None else block
        st = cls.registry().build("loop_strategy", strategy or cls.strategy, cls.params if params is None else params,
                                  backbone.d_model)
        return LoopedMDM(backbone, st, start, end)

    @classmethod
    def plain_model(cls, seed: int | None = None) -> LoopedMDM:
        """The non-looped model (strategy ``none``) on the same backbone."""
        return cls.make_model({}, seed, strategy="none", block=(0, 0))

    @classmethod
    def batch(cls, model: LoopedMDM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, x_t, t): clean tokens, the same tokens masked at rates t spread over (0, 1)."""
        gen = torch.Generator().manual_seed(seed)
        b = cls.batch_size
        x0 = torch.randint(0, cls.vocab, (b, cls.seq_len), generator=gen)
        t = (torch.arange(b, dtype=torch.float32) + 0.5) / b
        xt, _ = mask_tokens(x0, t, model.backbone.mask_id, gen)
        return x0, xt, t

    # ---- the checks ----------------------------------------------------------------------------
    def test_params_model_forbids_unknown_keys(self):
        Params = self.strategy_class().Params
        Params.model_validate(self.params)  # the configuration under test is valid
        with pytest.raises(ValidationError):
            Params.model_validate({**self.params, "no_such_parameter_xyz": 1})

    def test_one_loop_equals_plain_model(self):
        if self.one_loop_params is None:
            pytest.skip(f"{self.strategy}: one_loop_params is None (n_loops = 1 equivalence does not apply)")
        plain = self.plain_model(seed=self.seed)
        looped = self.make_model(self.one_loop_params, seed=self.seed + 1)  # different init: the load must matter
        missing, unexpected = looped.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected, f"plain-model weights with no place in the looped model: {unexpected}"
        assert all(k.startswith("strategy.") for k in missing), f"backbone weights not loaded: {missing}"
        plain.eval(), looped.eval()
        _, xt, t = self.batch(plain)
        all_masked = torch.full_like(xt, plain.backbone.mask_id)
        with torch.no_grad():
            for x, tt in ((xt, t), (all_masked, torch.ones_like(t))):
                ref, out = plain(x, None, tt), looped(x, None, tt)
                assert out.applications == 1.0, f"one loop reported {out.applications} block applications"
                assert torch.equal(out.logits, ref.logits), (
                    f"{self.strategy} with {self.one_loop_params} differs from the plain model: max |diff| "
                    f"{(out.logits - ref.logits).abs().max().item():.3g}")

    def test_training_flops_match_flop_counter(self):
        model = self.make_model()
        model.train()
        x0, xt, t = self.batch(model)
        n = model.strategy.train_loops(torch.Generator().manual_seed(self.seed))
        got = {}
        targets = {"targets": x0} if model.strategy.uses_targets else {}  # a loss over exits scores readouts

        def step():
            out = model(xt, n, t, **targets)
            loss = out.logits.float().logsumexp(-1).sum()
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            loss.backward()
            got["out"] = out

        counted = measured_flops(step)
        out = got["out"]
        analytic = model.train_step_flops(self.seq_len, self.batch_size, out.applications, out.extra_flops,
                                          forward_only=out.forward_only)
        assert counted > 0
        assert abs(analytic - counted) / counted < FLOP_TOLERANCE, (
            f"training step: analytic {analytic:.6g} vs FlopCounterMode {counted:.6g} FLOPs "
            f"(applications {out.applications}, forward_only {out.forward_only}, extra_flops {out.extra_flops}): "
            f"report loops run under no_grad as forward_only")

    def test_inference_flops_match_flop_counter(self):
        model = self.make_model()
        model.eval()
        _, xt, t = self.batch(model)
        got = {}
        with torch.no_grad():
            counted = measured_flops(lambda: got.setdefault("out", model(xt, None, t)))
        out = got["out"]
        analytic = model.inference_flops_per_token(self.seq_len, out.applications, out.extra_flops) \
            * self.seq_len * self.batch_size
        assert counted > 0
        assert abs(analytic - counted) / counted < FLOP_TOLERANCE, (
            f"inference: analytic {analytic:.6g} vs FlopCounterMode {counted:.6g} FLOPs "
            f"(applications {out.applications}, extra_flops {out.extra_flops})")
        bound = model.inference_flops_per_token(self.seq_len)  # the default: eval_loops and the extra bound
        assert analytic <= bound * self.seq_len * self.batch_size * (1 + 1e-9), (
            "an inference call cost more than inference_flops_per_token() (eval_loops, extra_flops_bound) says")

    def _train_step(self, seed: int):
        model = self.make_model(seed=seed)
        model.train()
        x0, _, _ = self.batch(model)
        gen = torch.Generator().manual_seed(seed)
        n = model.strategy.train_loops(gen)
        loss, out = diffusion_loss(model, x0, model.backbone.mask_id, gen, n_loops=n)
        return model, loss, out

    def test_deterministic_under_seed(self):
        _, loss_a, out_a = self._train_step(self.seed)
        _, loss_b, out_b = self._train_step(self.seed)
        assert torch.equal(out_a.logits, out_b.logits), "same seed, same input: different logits"
        assert torch.equal(loss_a, loss_b), f"same seed, same input: losses {loss_a.item()} != {loss_b.item()}"
        assert out_a.applications == out_b.applications and out_a.extra_flops == out_b.extra_flops
        _, loss_c, _ = self._train_step(self.seed + 1)
        assert not torch.equal(loss_a, loss_c), "the seed has no effect on the model or the loss"

    def test_gradients_reach_every_parameter(self):
        model, loss, _ = self._train_step(self.seed)
        assert torch.isfinite(loss), f"non-finite training loss {loss.item()}"
        loss.backward()
        named = list(model.named_parameters())  # shared (tied) tensors appear once
        assert named
        problems = []
        for name, p in named:
            if not p.requires_grad:
                continue
            if p.grad is None:
                problems.append(f"{name}: no gradient")
            elif not torch.isfinite(p.grad).all():
                problems.append(f"{name}: non-finite gradient")
            elif not p.grad.abs().sum() > 0:
                problems.append(f"{name}: gradient is all zero")
        assert not problems, "parameters the loss does not train: " + "; ".join(problems)
        strategy_params = [n for n, _ in named if n.startswith("strategy.")]
        own = list(model.strategy.parameters())
        assert len(strategy_params) == len({id(p) for p in own}), "strategy parameters missing from the model"

    def test_loop_counts_are_consistent(self):
        st = self.make_model().strategy
        gen = torch.Generator().manual_seed(self.seed)
        hi = st.max_train_loops()
        assert isinstance(hi, int) and hi >= 1, f"max_train_loops() = {hi!r}"
        draws = [st.train_loops(gen) for _ in range(64)]
        assert all(isinstance(n, int) and 1 <= n <= hi for n in draws), (
            f"train_loops() outside [1, max_train_loops() = {hi}]: {sorted(set(draws))}")
        expected = st.expected_train_loops()
        assert math.isfinite(expected) and 1.0 <= expected <= hi, (
            f"expected_train_loops() = {expected} is outside [1, {hi}]")
        again = torch.Generator().manual_seed(self.seed)
        assert [st.train_loops(again) for _ in range(64)] == draws, "train_loops() is not reproducible"
        ev = st.eval_loops()
        assert isinstance(ev, int) and ev >= 1, f"eval_loops() = {ev!r}"

    def test_expected_train_loops_is_the_mean_of_what_training_runs(self):
        """Planning divides the budget by the cost at expected_train_loops(): it must be the mean of
        the block applications training steps execute (train_loops() drawn per step, mask rates t
        spread over (0, 1) as in training; 200 steps, 5 standard errors of slack)."""
        from .diffusion import sample_t

        model = self.make_model().train()
        st = model.strategy
        gen = torch.Generator().manual_seed(self.seed + 1)
        applications, forward_only, extra = [], [], []
        with torch.no_grad():
            for _ in range(200):
                n = st.train_loops(gen)
                x0 = torch.randint(0, self.vocab, (self.batch_size, self.seq_len), generator=gen)
                t = sample_t(self.batch_size, gen)
                xt, _ = mask_tokens(x0, t, model.backbone.mask_id, gen)
                targets = {"targets": x0} if st.uses_targets else {}
                out = model(xt, n, t, generator=gen, **targets)
                applications.append(float(out.applications))
                forward_only.append(float(out.forward_only))
                extra.append(float(out.extra_flops))
        for what, values, expected in (
                ("expected_train_loops()", applications, st.expected_train_loops()),
                ("expected_forward_only()", forward_only, st.expected_forward_only())):
            draws = torch.tensor(values, dtype=torch.float64)
            mean, se = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
            assert abs(mean - expected) <= 5 * se + 0.02, (
                f"{what} = {expected:.4f} but 200 training steps executed {mean:.4f} (± {se:.4f}) on average; "
                f"planning would buy the wrong number of steps")
        draws = torch.tensor(extra, dtype=torch.float64)
        mean, se = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
        expected = st.expected_extra_flops(self.seq_len)
        step = model.forward_flops(st.expected_train_loops(), self.seq_len)  # what 1% of a step's cost is
        assert abs(mean - expected) <= 5 * se + 0.01 * step, (
            f"expected_extra_flops() = {expected:.6g} but 200 training steps reported {mean:.6g} (± {se:.3g}) extra "
            f"FLOPs per sequence on average (a forward pass: {step:.6g}); planning would buy the wrong number of "
            f"steps")

    def test_runs_in_a_study(self, tmp_path, monkeypatch):
        import optuna

        from .search import study as studies
        from .search.space import BASELINE_ATTR
        from .search.workers import run

        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("LOOPSEARCH_STORAGE", f"sqlite:///{tmp_path / 'conformance.db'}")
        import os

        if not os.environ.get("LOOPSEARCH_CACHE"):
            monkeypatch.setenv("LOOPSEARCH_CACHE", str(tmp_path / "cache"))
        space = tmp_path / "space.toml"
        space.write_text(self.study_space if self.study_space is not None
                         else space_toml(self.strategy, self.params, self.block))
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(self.study_recipe)
        name = f"conformance-{self.strategy}"
        studies.create(studies.spec_from_options(name, str(space), str(recipe), None, None, None, None, 2))
        run(name, n_trials=2, progress=False)
        study, spec = studies.load(name)
        trials = study.get_trials(deepcopy=False)
        looped = [t for t in trials if not t.user_attrs.get(BASELINE_ATTR)]
        assert looped, "the study ran no trial of the strategy"
        for t in looped:
            a = t.user_attrs
            assert t.state == optuna.trial.TrialState.COMPLETE, (
                f"trial {t.number} {t.state.name}: {a.get('rejected', 'see the log')}")
            assert a["strategy"] == self.strategy
            assert math.isfinite(a["val_nll"]) and t.value == a["val_nll"]
            assert 0 < a["train_flops"] <= spec.budget, (a["train_flops"], spec.budget)


class ExitConformance:
    """The conformance suite of an exit criterion (``register_exit_criteria``). Inherit it in a
    ``Test...`` class and set ``criterion`` (the registered name) and ``params`` (a valid
    configuration)::

        class TestMyExit(ExitConformance):
            criterion = "my_exit"
            params = {"tol": 0.01}

    It checks, on a tiny LoopedMDM that loops layers 1-2 up to ``n_loops`` times (strategy
    ``fixed``): unknown parameters are refused; every check returns one bool per sequence, a
    finite non-negative FLOP charge, and stops that stay stopped; ``min_loops`` (when the criterion
    has it) holds even on a block that does not move; a run with the exit gives exactly the model
    run for the loops it reports; runs are deterministic; and the inference FLOPs, readouts
    included, match FlopCounterMode. ``loopsearch plugins check NAME`` runs it without a test file.
    """

    criterion: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    n_loops: ClassVar[int] = 4
    n_layer: ClassVar[int] = 4
    d_model: ClassVar[int] = 32
    n_heads: ClassVar[int] = 2
    vocab: ClassVar[int] = 50
    seq_len: ClassVar[int] = 16
    batch_size: ClassVar[int] = 3
    seed: ClassVar[int] = 0

    @classmethod
    def criterion_class(cls):
        if not cls.criterion:
            raise TypeError(f"{cls.__name__}: set the class attribute `criterion` to the registered name")
        from .registry import get_registry

        return get_registry().get("exit_criterion", cls.criterion)

    @classmethod
    def make_model(cls, n_loops: int | None = None) -> LoopedMDM:
        from .registry import get_registry

        reg = get_registry()
        torch.manual_seed(cls.seed)
        backbone = reg.build("backbone", "transformer", {"n_layer": cls.n_layer, "d_model": cls.d_model,
                                                         "n_heads": cls.n_heads}, cls.vocab, cls.seq_len)
        strategy = reg.build("loop_strategy", "fixed", {"n_loops": n_loops or cls.n_loops}, backbone.d_model)
        return LoopedMDM(backbone, strategy, 1, 3).eval()

    @classmethod
    def make(cls, model: LoopedMDM, params: dict[str, Any] | None = None):
        from .exits import make_exit

        return make_exit(cls.criterion, cls.params if params is None else params, model, None)

    @classmethod
    def inputs(cls, model: LoopedMDM) -> torch.Tensor:
        gen = torch.Generator().manual_seed(cls.seed + 3)
        x0 = torch.randint(0, cls.vocab, (cls.batch_size, cls.seq_len), generator=gen)
        t = torch.full((cls.batch_size,), 0.5)
        xt, _ = mask_tokens(x0, t, model.backbone.mask_id, gen)
        return xt

    def _ctx(self, model: LoopedMDM, crit, x: torch.Tensor):
        from .looping import LoopContext

        return LoopContext(masked=x == model.backbone.mask_id, exit=crit, readout=model.readout)

    def test_params_model_forbids_unknown_keys(self):
        Params = self.criterion_class().Params
        Params.model_validate(self.params)
        with pytest.raises(ValidationError):
            Params.model_validate({**self.params, "no_such_parameter_xyz": 1})

    def test_checks_give_one_sticky_bool_per_sequence(self):
        model = self.make_model()
        x = self.inputs(model)
        crit = self.make(model)
        gen = torch.Generator().manual_seed(self.seed + 5)
        h = torch.randn(self.batch_size, self.seq_len, self.d_model, generator=gen)
        state, stopped = crit.init(h), torch.zeros(self.batch_size, dtype=torch.bool)
        ctx = self._ctx(model, crit, x)
        with torch.no_grad():
            for k in range(6):
                new = h if k % 2 else torch.randn(h.shape, generator=gen)  # alternately moving and still
                stop, state, extra = crit.check(h, new, state, ctx)
                assert isinstance(stop, torch.Tensor) and stop.dtype == torch.bool, f"check {k}: stop {stop!r}"
                assert stop.shape == (self.batch_size,), f"check {k}: stop has shape {tuple(stop.shape)}, " \
                                                         f"not one decision per sequence ({self.batch_size},)"
                assert math.isfinite(float(extra)) and float(extra) >= 0, f"check {k}: extra FLOPs {extra!r}"
                assert not (stopped & ~stop).any(), f"check {k}: a sequence that had stopped started again"
                stopped, h = stop, new

    def test_min_loops_holds_on_a_block_that_does_not_move(self):
        if "min_loops" not in self.criterion_class().Params.model_fields:
            pytest.skip(f"{self.criterion}: no min_loops parameter")
        model = self.make_model()
        x = self.inputs(model)
        crit = self.make(model, {**self.params, "min_loops": 3})
        h = torch.randn(self.batch_size, self.seq_len, self.d_model, generator=torch.Generator().manual_seed(1))
        state, ctx = crit.init(h), self._ctx(model, crit, x)
        with torch.no_grad():
            for k in range(2):
                stop, state, _ = crit.check(h, h.clone(), state, ctx)
                assert not stop.any(), f"stopped after {k + 1} loop(s) with min_loops = 3"

    def test_an_exit_run_equals_the_model_at_the_loops_it_reports(self):
        model = self.make_model()
        x = self.inputs(model)
        with torch.no_grad():
            out = model(x, exit=self.make(model))
            again = model(x, exit=self.make(model))
            n = out.applications
            assert float(n).is_integer() and 1 <= n <= self.n_loops, f"applications {n}"
            ref = model(x, n_loops=int(n))
        assert torch.equal(out.logits, again.logits) and out.applications == again.applications, \
            "the same input gave different exits"
        assert torch.allclose(out.logits, ref.logits, atol=1e-5), (
            f"the exit run reported {n} loops but its logits differ from {int(n)} fixed loops by "
            f"{(out.logits - ref.logits).abs().max().item():.3g}")

    @pytest.mark.parametrize("loops", [1, 2, 4])
    def test_flops_match_flop_counter(self, loops):
        model = self.make_model(loops)
        x = self.inputs(model)
        crit = self.make(model)
        got = {}
        with torch.no_grad():
            counted = measured_flops(lambda: got.setdefault("out", model(x, exit=crit)))
        out = got["out"]
        analytic = model.inference_flops_per_token(self.seq_len, out.applications, out.extra_flops) \
            * self.seq_len * self.batch_size
        assert abs(analytic - counted) / counted < FLOP_TOLERANCE, (
            f"{self.criterion} at up to {loops} loops: analytic {analytic:.6g} vs FlopCounterMode {counted:.6g} "
            f"FLOPs (applications {out.applications}, extra_flops {out.extra_flops}): the readouts a check "
            f"runs must be returned as its extra FLOPs")


class SamplerConformance:
    """The conformance suite of a sampler (``register_samplers``). Inherit it in a ``Test...``
    class and set ``sampler`` (the registered name) and ``params``::

        class TestMySampler(SamplerConformance):
            sampler = "my_sampler"
            params = {}

    On a tiny looped model it checks: unknown parameters are refused (when the sampler has a Params
    model); every MASK is filled with a real token and the prompt (prefix and suffix) is kept; a
    committed token never changes between calls; at most ``steps`` network calls; the same seed
    gives the same samples; and the FLOPs the sampler's cost reports are the FLOPs that ran
    (FlopCounterMode). ``loopsearch plugins check NAME`` runs it without a test file.
    """

    sampler: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    steps: ClassVar[int] = 8
    vocab: ClassVar[int] = 50
    seq_len: ClassVar[int] = 16
    batch_size: ClassVar[int] = 3
    seed: ClassVar[int] = 0

    @classmethod
    def sampler_class(cls):
        if not cls.sampler:
            raise TypeError(f"{cls.__name__}: set the class attribute `sampler` to the registered name")
        from .registry import get_registry

        return get_registry().get("sampler", cls.sampler)

    @classmethod
    def make_model(cls) -> LoopedMDM:
        from .registry import get_registry

        reg = get_registry()
        torch.manual_seed(cls.seed)
        backbone = reg.build("backbone", "transformer", {"n_layer": 4, "d_model": 32, "n_heads": 2}, cls.vocab,
                             cls.seq_len)
        strategy = reg.build("loop_strategy", "fixed", {"n_loops": 2}, backbone.d_model)
        return LoopedMDM(backbone, strategy, 1, 3).eval()

    def _generate(self, model, init, seed=None):
        from .sampling import generate

        return generate(model, init, sampler=self.sampler, steps=self.steps, seed=self.seed if seed is None else seed,
                        params=self.params or None)

    def _init(self, model):
        from .sampling import make_init

        return make_init(self.batch_size, self.seq_len, model.backbone.mask_id, prefix=[5, 6, 7], suffix=[8, 9])

    def test_params_model_forbids_unknown_keys(self):
        Params = getattr(self.sampler_class(), "Params", None)
        if Params is None:
            pytest.skip(f"{self.sampler}: no Params model")
        Params.model_validate(self.params)
        with pytest.raises(ValidationError):
            Params.model_validate({**self.params, "no_such_parameter_xyz": 1})

    def test_fills_every_mask_and_keeps_the_prompt(self):
        model = self.make_model()
        mask = model.backbone.mask_id
        res = self._generate(model, self._init(model))
        tokens = res.tokens
        assert tokens.shape == (self.batch_size, self.seq_len), f"samples of shape {tuple(tokens.shape)}"
        assert not (tokens == mask).any(), "MASK left in the samples"
        assert int(tokens.min()) >= 0 and int(tokens.max()) < mask, "a token outside the vocabulary"
        assert tokens[:, :3].tolist() == [[5, 6, 7]] * self.batch_size, "the prefix changed"
        assert tokens[:, -2:].tolist() == [[8, 9]] * self.batch_size, "the suffix changed"
        assert 1 <= res.cost.network_calls <= self.steps, (
            f"{res.cost.network_calls} network calls for steps = {self.steps}")

    def test_committed_tokens_never_change(self, monkeypatch):
        from .sampling import Denoiser

        model = self.make_model()
        mask = model.backbone.mask_id
        seen, original = [], Denoiser.__call__

        def spy(den, x, step, steps, rows=None):
            seen.append(x.clone())
            return original(den, x, step, steps, rows)

        monkeypatch.setattr(Denoiser, "__call__", spy)
        res = self._generate(model, self._init(model))
        states = [*seen, res.tokens]
        for k, (before, after) in enumerate(zip(states, states[1:])):
            done = before != mask
            assert torch.equal(after[done], before[done]), f"call {k + 1}: a committed token changed"

    def test_same_seed_same_samples(self):
        model = self.make_model()
        init = self._init(model)
        a, b = self._generate(model, init), self._generate(model, init)
        assert torch.equal(a.tokens, b.tokens), "the same seed gave different samples: draw from `generator`"
        assert a.cost.network_calls == b.cost.network_calls

    def test_cost_matches_flop_counter(self):
        model = self.make_model()
        init = self._init(model)
        got = {}
        counted = measured_flops(lambda: got.setdefault("res", self._generate(model, init)))
        cost = got["res"].cost
        assert counted > 0
        assert abs(cost.flops - counted) / counted < FLOP_TOLERANCE, (
            f"{self.sampler}: its cost says {cost.flops:.6g} FLOPs, FlopCounterMode counted {counted:.6g}: "
            f"call the model through the Denoiser it is given, which charges every call")


class BackboneConformance:
    """Conformance suite for a backbone (a ``Backbone`` registered with ``register_backbones``).

    Subclass it in a pytest module with the registered name and a small configuration::

        class TestMyBackbone(BackboneConformance):
            backbone = "my_backbone"
            params = {"n_layer": 3, "d_model": 32}

    It checks: the Params model refuses unknown keys; the MASK token is the last id (``mask_id ==
    vocab``, ``n_tokens == vocab + 1``); ``embed`` / ``run_block`` / ``head`` keep the shapes the core
    relies on; the flop profile has one entry per layer and matches FlopCounterMode within 2% for a
    forward pass and for a training step (3x); every parameter gets a gradient; construction is
    deterministic under ``torch.manual_seed``; attention is bidirectional unless the params ask for a
    causal model (an MDM denoises every position from both sides); a backbone that says
    ``supports_token_index`` runs ``run_block(i, h, index=arange(T))`` exactly as without the index;
    and ``attention_probs``, where implemented, gives rows that sum to 1.
    """

    backbone: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}
    vocab: ClassVar[int] = 50
    seq_len: ClassVar[int] = 16
    batch_size: ClassVar[int] = 3
    seed: ClassVar[int] = 0

    @classmethod
    def make(cls, seed: int | None = None):
        if not cls.backbone:
            raise TypeError(f"{cls.__name__}: set the class attribute `backbone` to the registered name")
        from .registry import get_registry

        torch.manual_seed(cls.seed if seed is None else seed)
        return get_registry().build("backbone", cls.backbone, cls.params, cls.vocab, cls.seq_len)

    def _x(self, bb) -> torch.Tensor:
        x = torch.randint(0, self.vocab, (self.batch_size, self.seq_len), generator=torch.Generator().manual_seed(1))
        x[:, ::3] = bb.mask_id
        return x

    def _forward(self, bb, x):
        h = bb.embed(x)
        for i in range(bb.n_layer):
            h = bb.run_block(i, h)
        return bb.head(h)

    def test_params_model_forbids_unknown_keys(self):
        from .registry import get_registry

        Params = get_registry().get("backbone", self.backbone).Params
        Params.model_validate(self.params)
        with pytest.raises(ValidationError):
            Params.model_validate({**self.params, "no_such_parameter_xyz": 1})

    def test_mask_token_and_shapes(self):
        bb = self.make()
        assert bb.mask_id == self.vocab and bb.n_tokens == self.vocab + 1, (
            f"MASK must be the last id: mask_id {bb.mask_id}, n_tokens {bb.n_tokens} for vocab {self.vocab}")
        assert isinstance(bb.n_layer, int) and bb.n_layer >= 1 and isinstance(bb.d_model, int)
        x = self._x(bb)
        h = bb.embed(x)
        assert tuple(h.shape) == (self.batch_size, self.seq_len, bb.d_model), f"embed gave {tuple(h.shape)}"
        for i in range(bb.n_layer):
            h2 = bb.run_block(i, h)
            assert h2.shape == h.shape, f"run_block({i}) changed the shape {tuple(h.shape)} -> {tuple(h2.shape)}"
            h = h2
        logits = bb.head(h)
        assert tuple(logits.shape) == (self.batch_size, self.seq_len, bb.n_tokens), f"head gave {tuple(logits.shape)}"
        assert torch.isfinite(logits).all(), "non-finite logits at initialisation"

    def test_flop_profile_matches_flop_counter(self):
        bb = self.make()
        profile = bb.flop_profile(self.seq_len)
        assert len(profile.layers) == bb.n_layer, (
            f"flop_profile has {len(profile.layers)} layers, the model {bb.n_layer}")
        x = self._x(bb)
        with torch.no_grad():
            counted = measured_flops(lambda: self._forward(bb, x))
        analytic = self.batch_size * (sum(profile.layers) + profile.head)
        assert counted > 0 and abs(analytic - counted) / counted < FLOP_TOLERANCE, (
            f"forward: flop_profile gives {analytic:.6g} FLOPs, FlopCounterMode counted {counted:.6g}")
        from .flops import TRAIN_MULTIPLIER

        trained = measured_flops(lambda: self._forward(bb, x).float().logsumexp(-1).sum().backward())
        assert abs(TRAIN_MULTIPLIER * analytic - trained) / trained < FLOP_TOLERANCE, (
            f"training step: {TRAIN_MULTIPLIER} x flop_profile = {TRAIN_MULTIPLIER * analytic:.6g} FLOPs, "
            f"FlopCounterMode counted {trained:.6g}")

    def test_gradients_reach_every_parameter(self):
        bb = self.make()
        self._forward(bb, self._x(bb)).float().logsumexp(-1).sum().backward()
        missing = [n for n, p in bb.named_parameters()
                   if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
        assert not missing, f"parameters without a gradient: {missing}"

    def test_deterministic_under_seed(self):
        a, b, c = self.make(seed=3), self.make(seed=3), self.make(seed=4)
        x = self._x(a)
        with torch.no_grad():
            ya, yb, yc = self._forward(a, x), self._forward(b, x), self._forward(c, x)
        assert torch.equal(ya, yb), "the same seed built different models (draw initial weights from torch's generator)"
        assert not torch.equal(ya, yc), "the seed has no effect on the initial weights"

    def test_attention_is_bidirectional(self):
        if self.params.get("causal"):
            pytest.skip(f"{self.backbone}: causal by its params")
        bb = self.make()
        x = self._x(bb)
        y = x.clone()
        y[:, -1] = (x[:, -1] + 1) % self.vocab  # change only the last position
        with torch.no_grad():
            first_x, first_y = self._forward(bb, x)[:, 0], self._forward(bb, y)[:, 0]
        assert not torch.equal(first_x, first_y), (
            "the first position's logits ignore the last token: a masked diffusion model needs bidirectional attention")

    def test_token_index_gives_each_token_its_position(self):
        """``run_block(i, h, index=)``: the identity index is the plain block, and permuting the tokens
        together with their index permutes the output (positions come from the index, not the order)."""
        bb = self.make()
        if not getattr(bb, "supports_token_index", False):
            pytest.skip(f"{self.backbone}: supports_token_index is False (the router strategy is not available)")
        h = bb.embed(self._x(bb)) * 10.0  # large states: attention is sharp, so positions matter visibly
        index = torch.arange(self.seq_len).expand(self.batch_size, self.seq_len)
        perm = torch.randperm(self.seq_len, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            plain = bb.run_block(0, h)
            assert torch.allclose(bb.run_block(0, h, index=index), plain, atol=1e-5), (
                "run_block(i, h, index=arange(T)) differs from run_block(i, h)")
            permuted = bb.run_block(0, h[:, perm], index=index[:, perm])
            assert torch.allclose(permuted, plain[:, perm], atol=1e-4, rtol=1e-4), (
                "permuting tokens with their index does not permute the output: run_block ignores `index`")

    def test_attention_probs_rows_sum_to_one(self):
        bb = self.make()
        h = bb.embed(self._x(bb))
        try:
            with torch.no_grad():
                probs = bb.attention_probs(0, h)
        except NotImplementedError:
            pytest.skip(f"{self.backbone}: attention_probs is not implemented (optional)")
        assert probs.dim() == 4 and probs.shape[0] == self.batch_size and probs.shape[-2:] == (self.seq_len,) * 2
        assert torch.allclose(probs.float().sum(-1), torch.ones(()), atol=1e-4), "attention rows do not sum to 1"
