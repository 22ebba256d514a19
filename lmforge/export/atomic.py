"""Output folders that appear only when complete.

A writer fills a hidden temporary folder beside OUT (named after the writing process) and it is
swapped into place at the end (`replace`), so OUT is never a mix of old and new files; on any
error or interrupt it is removed. A conversion killed outright (kill -9) leaves only hidden
folders or files, which the next write beside OUT removes (`clean_stale`).
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import LmforgeError, writing


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


def temp_path(out: Path, kind: str = "tmp") -> Path:
    """The hidden sibling of OUT that this process writes (`tmp`) or parks the old OUT in (`old`)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def clean_stale(out: Path) -> None:
    """Remove what writers of OUT that no longer run left beside it: hidden temporary folders
    and files, and old outputs parked during a replacement (put back if OUT is missing)."""
    for kind in ("old", "tmp"):
        for tmp in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists() and not os.path.lexists(out):
                os.replace(tmp, out)  # killed between its two renames: the old output is whole
            elif tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _pause() -> None:
    """Tests only: LMFORGE_TEST_SLOW_REPLACE seconds between the steps of a replacement, so that
    kills land inside it."""
    delay = os.environ.get("LMFORGE_TEST_SLOW_REPLACE")
    if delay:
        time.sleep(float(delay))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace(tmp: Path, out: Path) -> None:
    """Put the complete `tmp` at OUT. At every moment OUT is the old complete output or the new
    one: an existing OUT is swapped with `tmp` in one step, and the old one is then removed (or,
    where the swap is not supported, parked under a hidden name that `clean_stale` restores)."""
    _pause()
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        _pause()
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        return
    old = temp_path(out, "old")
    os.replace(out, old)
    _pause()
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # OUT stays the old complete output, not missing until a later write
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces OUT, on failure it disappears. A
    destination that cannot take it (read-only, full, over the file-size limit) is one LmforgeError."""
    with writing(out.parent, every=True):
        clean_stale(out)
        tmp = temp_path(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with writing(out):
            yield tmp
            replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
