"""Imports point one way, down the layers of the README's code map; no module names a higher one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ecdit_cli"

# Rank of each top-level module or sub-package; a module may import its own rank only inside its
# own package (the two rank-5 packages, bench and study, stay independent of each other).
# Training evaluates as it goes (train.eval_every), so evaluate sits below train.
FOUNDATIONS = ("__init__", "errors", "files", "lock", "rundir", "seeding", "devices", "numbers", "figures",
               "deepspeed_compat", "config")
LAYERS = {**{name: 0 for name in FOUNDATIONS}, "data": 1, "model": 2, "evaluate": 3, "train": 4, "bench": 5,
          "study": 5, "cli": 6, "__main__": 7}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(rel.parts), path


def _imports(path: Path):
    """Every ecdit_cli module a file imports (at the top or inside functions) or names in a string."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ecdit_cli":
            if node.module == "ecdit_cli":
                yield from (f"ecdit_cli.{a.name}" for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "ecdit_cli")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ecdit_cli."):
            yield node.value.split()[0]


def test_every_module_belongs_to_a_layer():
    units = {_unit(m) for m, _ in _modules()}
    assert units <= set(LAYERS), f"modules outside the layer map: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("module,path", list(_modules()), ids=[m for m, _ in _modules()])
def test_imports_point_down_the_layers(module, path):
    src = _unit(module)
    for target in _imports(path):
        dst = _unit(target)
        if dst not in LAYERS or dst == src:
            continue  # e.g. ecdit_cli.__version__ resolves to the package itself (rank 0)
        assert LAYERS[dst] < LAYERS[src] or (LAYERS[dst] == LAYERS[src] == 0), (
            f"{module} (layer {src}, rank {LAYERS[src]}) imports {target} (layer {dst}, rank {LAYERS[dst]})")


def test_the_cli_is_imported_by_nothing_but_the_program_entry():
    users = {m for m, path in _modules() if _unit(m) not in ("cli", "__main__")
             and any(_unit(t) == "cli" for t in _imports(path))}
    assert not users
