"""Writing results so that an interrupted run never leaves something that looks whole.

Work happens in a hidden staging directory beside the output; on success its files move into
place with the file that marks the result complete (``tensor-cache.json``, the library) last;
on any failure, Ctrl-C and SIGTERM included, the staging directory is removed.  A process killed
outright (SIGKILL, power loss) cannot clean up, so the staging directory's name records its
owner (``.NAME.partial-<host>-<pid>-<random>``) and the next run staging the same output removes
the directories of owners that are gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("kiln")

# A staging directory whose owner cannot be told (another machine, an older kiln) is removed
# only when it has not changed for this long.
STALE_AFTER_S = 24 * 3600


def _host_tag() -> str:
    return hashlib.md5(socket.gethostname().encode()).hexdigest()[:8]


def staging_prefix(output: Path, pid: int | None = None) -> str:
    """The name prefix of ``output``'s staging directories owned by process ``pid`` (default: this one)."""
    return f".{Path(output).name}.partial-{_host_tag()}-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def sweep_stale_staging(output: Path) -> list[Path]:
    """Remove ``output``'s staging directories left by processes that no longer run; return them."""
    output = Path(output)
    common = f".{output.name}.partial-"
    removed = []
    try:
        candidates = [p for p in output.parent.iterdir() if p.name.startswith(common) and p.is_dir()]
    except OSError:
        return removed
    host = _host_tag()
    for path in candidates:
        parts = path.name[len(common):].split("-")
        try:
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                stale = not _alive(int(parts[1]))
            else:  # another machine's, or an older kiln's: go by age
                stale = time.time() - path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
                log.info("removed %s, left behind by an interrupted run", path)
    return removed


@contextmanager
def staging_dir(output: Path):
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(output)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(output), dir=output.parent))
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
