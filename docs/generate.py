"""Generate the references in docs/ from the code, so they cannot drift:

- docs/cli.md: every command's ``--help``, as click renders it (width 100);
- docs/configuration.md: every key of study recipes, ``[train]``, ``[objective]`` and search spaces,
  with its type, default and description, from the pydantic models in loopsearch/spec.py.

    python docs/generate.py           # rewrite both files
    python docs/generate.py --check   # exit 1 if either differs from what the code generates (CI)
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH = 100


def cli_reference() -> str:
    import click

    from loopsearch.cli import cli

    out = ["# Command-line reference", "",
           "Generated from `--help` by `python docs/generate.py` (a test checks that this file matches).", ""]

    def walk(cmd: click.Command, path: list[str]):
        name = " ".join(["loopsearch", *path])
        ctx = click.Context(cmd, info_name=name, terminal_width=WIDTH, max_content_width=WIDTH)
        if path:
            out.extend([f"## `{name}`", "", "```", cmd.get_help(ctx).rstrip(), "```", ""])
        if isinstance(cmd, click.Group):
            for sub in sorted(cmd.commands):
                walk(cmd.commands[sub], [*path, sub])

    ctx = click.Context(cli, info_name="loopsearch", terminal_width=WIDTH, max_content_width=WIDTH)
    out.extend(["## `loopsearch`", "", "```", cli.get_help(ctx).rstrip(), "```", ""])
    walk(cli, [])
    return "\n".join(out).rstrip() + "\n"


def _type(annotation) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("loopsearch.spec.", "").replace("|", "\\|")


def _default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.default is PydanticUndefined:
        return "(from factory)" if field.default_factory is not None else "required"
    value = field.default
    if hasattr(value, "model_dump"):
        dumped = value.model_dump()
        if len(repr(dumped)) > 60:
            return "(its table's defaults)"
        value = dumped
    return f"`{value!r}`".replace("|", "\\|")


def config_reference() -> str:
    from loopsearch import spec

    tables = [
        ("Study recipe (`studies/*.toml`, `--recipe`)", spec.StudyRecipe, {"name"}),
        ("`[train]`: how every trial trains and is validated", spec.TrainConfig, set()),
        ("`[objective]`: what a study optimises", spec.ObjectiveSpec, set()),
        ("Search space (`search_spaces/*.toml`, `--space`)", spec.SearchSpace, set()),
        ("`[block]` of a search space", spec.BlockSpace, set()),
        ("`[arms.NAME]` of a search space", spec.Arm, set()),
        ("`{ low, high }` integer range", spec.IntRange, set()),
        ("`{ low, high }` float range", spec.FloatRange, set()),
    ]
    out = ["# Configuration reference", "",
           "Generated from the pydantic models in `loopsearch/spec.py` by `python docs/generate.py` (a test checks "
           "that this file matches). Unknown keys are rejected everywhere.", ""]
    for title, model, skip in tables:
        out.extend([f"## {title}", "", "| key | type | default | what it is |", "|---|---|---|---|"])
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


FILES = {"cli.md": cli_reference, "configuration.md": config_reference}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from the generated text")
    args = ap.parse_args(argv)
    stale = []
    for name, make in FILES.items():
        text, path = make(), HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(f'docs/{n}' for n in stale)}; run `python docs/generate.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
