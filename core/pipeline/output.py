"""Writing results so that an interrupted run never leaves something that looks whole.

Work happens in a hidden staging directory beside the output; on success its files move into
place with the file that marks the result complete (``tensor-cache.json``, the library) last;
on any failure, Ctrl-C included, the staging directory is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging_dir(output: Path):
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into(tmp: Path, output: Path, last: str, remove: list[str] = ()) -> None:
    """Move every file of ``tmp`` into ``output``; ``last`` moves last.

    ``remove`` names files in ``output`` to delete first (the previous result), starting with
    ``last`` so the old result stops looking whole before any of its parts go.
    """
    output.mkdir(parents=True, exist_ok=True)
    order = sorted(remove, key=lambda n: n != last)
    for name in order:
        try:
            (output / name).unlink()
        except FileNotFoundError:
            pass
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != last] + ([last] if last in names else []):
        os.replace(tmp / name, output / name)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
