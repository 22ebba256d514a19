"""Output folders that appear only when complete.

A writer fills a hidden temporary folder beside OUT (named after the writing process) and it is
renamed into place at the end; on any error or interrupt it is removed. A conversion killed
outright (kill -9) leaves only the hidden folder, which the next write beside OUT removes.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError


def check_output(out: Path, force: bool) -> None:
    """A user error unless OUT can be written: absent (or --force), in a folder that exists."""
    if out.exists() and not force:
        raise LmforgeError(f"{out} already exists; choose another -o or pass --force to replace it")
    if not out.parent.exists():
        raise LmforgeError(f"folder {out.parent} does not exist; create it first")


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
