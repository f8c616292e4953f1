"""The README stays true to the code: its map names every module, it documents every command."""

import re
from pathlib import Path

import typer.main

from ecdit_cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_the_map_of_the_code_names_every_module():
    code_map = _section("Map of the code")
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "ecdit_cli").rglob("*.py"))
               if p.name != "__init__.py" and p.name not in code_map and p.parent.name != "cli"]
    assert not missing, f"modules the README's map does not name: {missing}"


def test_every_command_and_bench_subcommand_appears_in_the_readme():
    cli._register()
    group = typer.main.get_command(cli.app)
    shown = set(re.findall(r"ecdit (\w+)(?: (\w+))?", README))
    names = {c for c, _ in shown}
    assert set(group.commands) <= names, sorted(set(group.commands) - names)
    bench = {sub for c, sub in shown if c == "bench"}
    assert set(group.commands["bench"].commands) <= bench, sorted(set(group.commands["bench"].commands) - bench)
