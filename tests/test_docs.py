"""The documentation stays true: the generated references match the code, the README stays a front
page, and every link between the pages resolves."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_generated_references_match_the_code(capsys):
    """docs/cli.md is every command's --help and docs/configuration.md every config key, as
    `python docs/generate.py` writes them today."""
    gen = runpy.run_path(str(DOCS / "generate.py"))
    for name, make in gen["FILES"].items():
        assert (DOCS / name).read_text() == make(), f"docs/{name} is stale; run `python docs/generate.py`"
    assert gen["main"](["--check"]) == 0


def test_cli_reference_has_every_command():
    import click

    from loopsearch.cli import cli

    text = (DOCS / "cli.md").read_text()

    def leaves(group, prefix):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from leaves(cmd, prefix + [name])
            else:
                yield prefix + [name]

    for path in leaves(cli, []):
        assert f"## `loopsearch {' '.join(path)}`" in text


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
