"""User-facing errors: one line that says what is wrong and what to do; the CLI exits 2."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager


class LmforgeError(Exception):
    """Base class for errors caused by the user's input, not by a bug in lmforge."""


class ModelNotFoundError(LmforgeError):
    """MODEL names nothing lmforge can find."""


class CheckpointError(LmforgeError):
    """A checkpoint exists but cannot be read (corrupt, truncated, unsafe format)."""


class UnsupportedArchitectureError(LmforgeError):
    """The checkpoint's architecture has no table in `lmforge.arch`."""


class TokenizerError(LmforgeError):
    """No tokenizer can be built from what the checkpoint carries."""


class ChatTemplateError(LmforgeError):
    """A chat template is missing, broken or tried to leave the sandbox."""


def read_user_text(path: str | os.PathLike, what: str = "", hint: str = "", newline: str | None = "") -> str:
    """The UTF-8 text of a file the user named, or an LmforgeError that says why it cannot be read.

    Args: the path; what the file is, named before it in messages ("calibration text"); advice
    appended to them ("; pass a text file with --data"); open()'s newline ("" keeps line endings,
    None translates them to "\\n")."""
    label = f"{what} {path}" if what else str(path)
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except OSError as e:
        raise LmforgeError(f"cannot read {label}: {e.strerror}{hint}") from None
    except UnicodeDecodeError:
        raise LmforgeError(f"{label} is not UTF-8 text{hint}") from None


# errno values that mean "this destination cannot take the output": read-only, no permission,
# disk or quota full, file-size limit (RLIMIT_FSIZE), not a folder
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR}


class WriteError(LmforgeError):
    """An output cannot be written where the user asked (read-only, full, over a size limit)."""

    def __init__(self, what, reason: str, hint: str):
        super().__init__(f"cannot write {what}: {reason}; {hint}")
        self.what, self.reason = what, reason


@contextmanager
def writing(what: str | os.PathLike, hint: str = "choose a writable folder with room for it", every: bool = False):
    """Turn an OSError that says the destination cannot take the output (any OSError when
    `every`: the block only creates things there) into one WriteError ("cannot write WHAT:
    File too large; HINT"); the caller removes what it half wrote. An outer `writing` gives
    an inner one's error its own hint."""
    try:
        yield
    except WriteError as e:
        raise WriteError(e.what, e.reason, hint) from None
    except OSError as e:
        if e.errno is None:  # numpy's tofile on a short write: "N requested and M written"
            raise WriteError(what, f"the disk is full or the file too large ({e})", hint) from None
        if e.errno not in WRITE_ERRNOS and not every:
            raise
        raise WriteError(what, e.strerror or str(e), hint) from None
