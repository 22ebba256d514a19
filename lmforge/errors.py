"""User-facing errors: one line that says what is wrong and what to do; the CLI exits 2."""


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
