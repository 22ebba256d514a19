"""Output folders that appear only when complete.

A writer fills a hidden temporary folder beside OUT (named after the writing process) and it is
renamed into place at the end; on any error or interrupt it is removed. A conversion killed
outright (kill -9) leaves only the hidden folder, which the next write beside OUT removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError


def check_output(out: Path, force: bool, marker: str, source: Path | None = None) -> Path:
    """OUT resolved, or a user error: it must not exist (unless --force and it is a folder that
    lmforge wrote, recognised by `marker`), must not hold the current folder or the source, and
    its parent must exist."""
    out = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise LmforgeError(f"-o {out} is the current folder or holds it; name a new folder")
    if source is not None:
        src = Path(source).resolve()
        if out == src or out in src.parents:
            raise LmforgeError(f"-o {out} is the source or holds it; name a new folder")
    if out.exists():
        if not force:
            raise LmforgeError(f"{out} already exists; choose another -o or pass --force to replace it")
        if not out.is_dir():
            raise LmforgeError(f"{out} is a file; choose another -o")
        if any(out.iterdir()) and not (out / marker).exists():
            raise LmforgeError(
                f"{out} is not a folder lmforge wrote (no {marker}); --force replaces only those: "
                "remove it yourself or choose another -o"
            )
    if not out.parent.exists():
        raise LmforgeError(f"folder {out.parent} does not exist; create it first")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove hidden temporary folders of OUT left by writers that no longer run."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces OUT, on failure it disappears."""
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
