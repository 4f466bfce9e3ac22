"""Plugin discovery: builtins through entry points, throwaway plugins, failures, name clashes."""

import importlib.metadata as md
import types

import pytest

import loopsearch
from loopsearch.errors import UnknownPluginError
from loopsearch.looping import LoopStrategy
from loopsearch.registry import KINDS, Registry


def fresh() -> Registry:
    reg = Registry()
    reg.load_entrypoints()
    return reg


def test_builtins_come_through_the_entry_point_group(monkeypatch):
    monkeypatch.setenv("LOOPSEARCH_PLUGINS", "")
    reg = fresh()
    assert {"none", "fixed"} <= set(reg.items("loop_strategy"))
    assert "transformer" in reg.items("backbone")
    assert {"early_middle", "anywhere", "depth"} <= set(reg.items("search_space"))
    assert {"shakespeare", "text", "hub"} <= set(reg.items("corpus"))
    info = reg.items("loop_strategy")["fixed"]
    assert info.distribution == "loopsearch" and info.version == md.version("loopsearch")
    assert set(info.params_schema()) == {"n_loops", "train_loops", "mean_loops", "sigma", "reinject"}
    eps = {ep.value for ep in md.entry_points(group="loopsearch") if ep.dist.metadata["Name"] == "loopsearch"}
    assert "loopsearch_builtins.strategies" in eps


def test_unknown_plugin_lists_available():
    with pytest.raises(UnknownPluginError) as e:
        fresh().get("loop_strategy", "nope")
    assert "fixed" in str(e.value) and "none" in str(e.value)


def throwaway(name: str, cls_name: str = "Mine"):
    strategy = type(cls_name, (LoopStrategy,), {"name": name})
    module = types.SimpleNamespace()
    module.register_loop_strategies = loopsearch.hookimpl(lambda: [strategy])
    return module, strategy


def test_registered_plugin_is_found_and_cannot_shadow_a_builtin():
    reg = fresh()
    mine, cls = throwaway("mine")
    evil, _ = throwaway("fixed", "Evil")
    reg.register(mine, "mine", "my-dist", "1.0")
    reg.register(evil, "evil", "evil-dist", "6.6.6")
    assert reg.get("loop_strategy", "mine") is cls
    assert reg.get("loop_strategy", "fixed").__module__ == "loopsearch_builtins.strategies"
    clash = [f for f in reg.failures if f.distribution == "evil-dist"]
    assert clash and "already registered by loopsearch" in clash[0].error


def test_failing_plugin_is_reported_and_others_load(monkeypatch, caplog):
    class BrokenEP:
        name, value, group = "broken", "does_not_exist_xyz", "loopsearch"
        dist = types.SimpleNamespace(metadata={"Name": "broken-dist"}, version="0.0.1")

        def load(self):
            raise ImportError("No module named 'does_not_exist_xyz'")

    real = md.entry_points

    def fake_entry_points(group=None, **kw):
        return [*real(group=group), BrokenEP()]

    monkeypatch.setattr(md, "entry_points", fake_entry_points)
    monkeypatch.delenv("LOOPSEARCH_PLUGINS", raising=False)
    reg = fresh()
    assert [f.plugin for f in reg.failures] == ["broken"]
    assert "does_not_exist_xyz" in reg.failures[0].error and reg.failures[0].distribution == "broken-dist"
    assert "fixed" in reg.items("loop_strategy")
    assert any("broken" in r.getMessage() and "failed to load" in r.getMessage() for r in caplog.records)


def test_a_hook_that_raises_is_reported():
    reg = fresh()
    bad = types.SimpleNamespace(register_corpora=loopsearch.hookimpl(lambda: 1 / 0))
    reg.register(bad, "bad", "bad-dist")
    assert "shakespeare" in reg.items("corpus")
    assert any("ZeroDivisionError" in f.error for f in reg.failures)


def test_every_kind_has_a_hook():
    from loopsearch import hookspecs

    assert all(hasattr(hookspecs, hook) for hook in KINDS.values())


def test_one_factory_builds_every_plugin_kind_with_one_error_format():
    """Registry.build is the one place plugins are instantiated; bad parameters give the same
    one-line message for every kind."""
    from loopsearch.errors import SpecError
    from loopsearch.registry import get_registry

    reg = get_registry()
    sampler = reg.build("sampler", "threshold", {"threshold": 0.5})
    assert sampler.params.threshold == 0.5
    corpus = reg.build("corpus", "shakespeare", {})
    assert corpus.name == "shakespeare"
    for kind, name, bad in (("sampler", "threshold", {"threshold": 7}), ("backbone", "transformer", {"n_layr": 2}),
                            ("exit_criterion", "kl", {"tol": "abc"})):
        with pytest.raises(SpecError, match=rf"^bad parameters for {kind.replace('_', ' ')} '{name}'.*accepted: "):
            reg.build(kind, name, bad)
