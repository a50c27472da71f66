"""The docs written for users: every ``python`` block runs; the CLI reference covers every
sub-command and option of ``medrecon``; internal links resolve."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from medrecon.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ["getting-started.md", "cli.md", "api.md", "conventions.md", "geometry.md", "training.md", "model-cards.md",
         "benchmarks.md", "methods/fbp.md", "methods/zero-filled.md", "methods/cg.md", "methods/tv.md",
         "methods/l1-wavelet.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)])
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in _blocks(page):  # blocks of a page share one namespace, like a reader's session
        exec(compile(code, str(DOCS / page), "exec"), scope)


def test_method_pages_cover_classical_methods():
    from medrecon.api import METHODS

    for name in METHODS:
        text = (DOCS / "methods" / f"{name}.md").read_text()
        assert "**Problem.**" in text and "| setting |" in text or name in ("zero-filled",), name


def test_cli_reference_covers_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert f"`{name}" in text or f"`medrecon {name}" in text, name
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert opt in text, f"{name} {opt} missing from docs/cli.md"


def test_links_resolve():
    for page in [*PAGES, "operators.md", "diffusion.md"]:
        path = DOCS / page
        if not path.exists():
            continue
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).resolve().is_file(), f"{page} links to missing {target}"


def test_getting_started_has_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    page = (DOCS / "getting-started.md").read_text()
    for cmd in re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", readme):
        assert cmd in page
    assert os.path.basename("docs/cli.md") in page
