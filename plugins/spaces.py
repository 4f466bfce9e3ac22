"""Registers the search spaces (search_spaces/*.toml) and study recipes (studies/*.toml) that
ship with loopsearch; they are installed as ``loopsearch_builtins.search_spaces`` and
``loopsearch_builtins.studies``."""

from __future__ import annotations

from importlib import resources

from loopsearch import hookimpl


def _tomls(package: str):
    return sorted((f for f in resources.files(package).iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)


@hookimpl
def register_search_spaces():
    return _tomls("loopsearch_builtins.search_spaces")


@hookimpl
def register_study_recipes():
    return _tomls("loopsearch_builtins.studies")
