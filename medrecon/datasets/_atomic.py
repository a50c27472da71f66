"""Atomic writes: write under a temporary name in the target folder, fsync, then rename.

Every medrecon writer goes through :func:`atomic_files` (one or several files, e.g. ``.cfl`` +
``.hdr``) or :func:`atomic_dir` (a DICOM series folder).  A failure anywhere leaves no partial
output behind, and existing outputs are never replaced unless ``overwrite=True``.  Writers that
stream into an open file (JSON records, CSV / HTML summaries, figures) take their temporary file
from :func:`open_temp`.

Permissions: every file is created with mode ``0o666`` and every folder with ``0o777``, less the
process umask, like ``open()`` and ``mkdir``.  (``tempfile.mkstemp`` would create ``0o600``
files, which the rename then carries onto the output.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from medrecon.errors import InputError

__all__ = ["atomic_files", "atomic_dir", "check_writable", "open_temp"]


def _suffix(path: Path) -> str:
    """Full suffix (``.nii.gz``, ``.h5``) so libraries that look at the extension still work."""
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def open_temp(folder: str | Path, suffix: str = ".tmp") -> tuple[int, str]:
    """Create a new, hidden temporary file in ``folder`` whose mode follows the umask.

    A drop-in for ``tempfile.mkstemp(dir=folder, suffix=suffix)`` for files that are renamed onto
    an output: the file is created with ``0o666`` less the umask, as ``open()`` would, instead of
    ``mkstemp``'s fixed ``0o600``.  Its name starts with ``.tmp-``, so leftovers of a killed run
    are recognised (:func:`medrecon.pipeline.records.clean_partial`).

    Parameters
    ----------
    folder : str or Path
        Existing folder (the output's folder, so that the rename is atomic).
    suffix : str
        End of the name (e.g. ``".json.tmp"``).

    Returns
    -------
    (int, str)
        An open file descriptor (read-write) and the file's path, as ``mkstemp`` returns them.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = os.path.join(str(folder), f".tmp-{uuid.uuid4().hex[:12]}{suffix}")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(paths: Sequence[str | Path], overwrite: bool) -> list[Path]:
    """Return the paths as :class:`Path`; raise if one exists and ``overwrite`` is False.

    Raises
    ------
    InputError
        A target exists (and ``overwrite`` is False) or is an existing folder where a file is
        expected.
    """
    out = [Path(p) for p in paths]
    for p in out:
        if p.exists() and not overwrite:
            raise InputError(p, "already exists; pass overwrite=True to replace it")
    return out


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | Path], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield temporary paths for ``paths``; rename them onto ``paths`` when the block succeeds.

    Parameters
    ----------
    paths : sequence of str or Path
        Final file names.  Parent folders are created.
    overwrite : bool
        Replace existing files.  If False and one exists, :class:`InputError` is raised before
        anything is written.

    Yields
    ------
    list of Path
        Temporary names in the same folders, with the same suffixes.  Write to these.
    """
    targets = check_writable(paths, overwrite)
    tag = uuid.uuid4().hex[:8]
    temps = []
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        temps.append(t.parent / f".{t.name}.tmp-{tag}{_suffix(t)}")
    try:
        yield temps
        for tmp in temps:
            if not tmp.exists():
                raise InputError(tmp, "writer produced no file")
            _fsync(tmp)
        for tmp, t in zip(temps, targets, strict=True):
            if t.is_dir():
                raise InputError(t, "is a folder; expected a file name")
            os.replace(tmp, t)
        for d in {t.parent for t in targets}:
            _fsync(d)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it to ``path`` when the block succeeds.

    With ``overwrite=True`` an existing folder is moved aside, replaced, then deleted.
    """
    (target,) = check_writable([path], overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
