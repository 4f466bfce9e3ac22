"""The plugin hooks. Every hook returns an iterable of things to register.

A plugin is a module (or object) with one or more functions marked ``@loopsearch.hookimpl``
and named after these specs, exposed through the ``loopsearch`` entry-point group::

    [project.entry-points.loopsearch]
    my_plugin = "my_package.plugin"

Classes registered by the first four hooks carry a ``name`` (str) and a ``Params`` pydantic
model of their parameters. Builtins are registered through the same group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("loopsearch")
hookimpl = pluggy.HookimplMarker("loopsearch")


@hookspec
def register_backbones():
    """Return Backbone subclasses (see loopsearch.backbone.Backbone)."""


@hookspec
def register_loop_strategies():
    """Return LoopStrategy subclasses (see loopsearch.looping.LoopStrategy)."""


@hookspec
def register_samplers():
    """Return diffusion sampler classes (generation; see the samplers docs)."""


@hookspec
def register_corpora():
    """Return Corpus subclasses (see loopsearch.data.Corpus)."""


@hookspec
def register_exit_criteria():
    """Return inference-time exit criteria for looped blocks (see loopsearch/looping.py:
    ``run_with_exit``): classes with ``name``, ``Params``, ``init(h)`` and ``check(...)``."""


@hookspec
def register_search_spaces():
    """Return paths (or importlib.resources files) of search-space TOML files."""


@hookspec
def register_study_recipes():
    """Return paths (or importlib.resources files) of study-recipe TOML files."""
