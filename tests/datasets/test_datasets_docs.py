"""The Python examples in docs/data.md run (in order, in one namespace)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def test_data_md_examples_run(tmp_path, monkeypatch):
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda *a, **k: str(tmp_path)
    )  # keep outputs in tmp_path
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "recon").is_dir() and (tmp_path / "sim" / "mr.h5").is_file()
