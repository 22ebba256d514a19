"""User-facing errors: one line that says what is wrong and what to do; the CLI exits 2."""

from __future__ import annotations

import os


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
