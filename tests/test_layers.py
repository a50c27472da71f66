"""The package's layers point one way: nothing imports a layer above its own.

operators → priors → solvers → api → pipeline/pacs → cli (ARCHITECTURE.md), with the pieces
that belong beside them: ``errors``, ``linalg`` (conjugate gradients, used by operators and
solvers) and ``_version`` at the bottom; ``datasets`` (readers, writers, simulation) above
operators; ``metrics`` and ``report`` beside the API; ``tuning`` (which runs whole
reconstructions) and the prior trainer ``training`` (whose previews run the solvers'
unconditional preset) above the API.  Every ``import`` counts, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medrecon"

#: (module prefix, rank); the longest matching prefix wins
LAYERS = [
    ("medrecon.errors", 0),
    ("medrecon.linalg", 0),
    ("medrecon._version", 0),
    ("medrecon.operators", 1),
    ("medrecon.datasets", 2),
    ("medrecon.priors", 3),
    ("medrecon.solvers", 4),
    ("medrecon.metrics", 5),
    ("medrecon.report", 5),
    ("medrecon.api", 5),
    ("medrecon", 5),  # the package root re-exports the API
    ("medrecon.tuning", 6),
    ("medrecon.training", 6),
    ("medrecon.pipeline", 7),
    ("medrecon.pacs", 7),
    ("medrecon.cli", 8),
]


def rank(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medrecon":
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "medrecon"]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert MODULES
    for path in MODULES:
        rank(module_name(path))  # raises if no prefix matches


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_points_up(path):
    me = module_name(path)
    up = [f"line {line}: {target} (layer {rank(target)})" for line, target in imports(path) if rank(target) > rank(me)]
    assert not up, f"{me} (layer {rank(me)}) imports from above: {up}"


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an operator module importing the solvers is reported."""
    bad = tmp_path / "medrecon" / "operators" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from medrecon.solvers.presets import run_diffusion\n")
    found = [t for _, t in imports(bad) if rank(t) > rank("medrecon.operators.bad")]
    assert found == ["medrecon.solvers.presets"]
