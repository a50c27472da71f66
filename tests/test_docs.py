"""The Python examples in README.md and docs/operators.md run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / name).read_text(), flags=re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/operators.md", "docs/diffusion.md"])
def test_doc_examples_run(doc):
    blocks = _blocks(doc)
    assert blocks, f"{doc} has no python examples"
    for code in blocks:
        exec(compile(code, doc, "exec"), {})
