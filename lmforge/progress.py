"""Progress bars for long work (convert, AWQ, GGUF writing, eval, batch): a tqdm bar on stderr
when it is a terminal, nothing otherwise, unless the caller says `progress=True/False`."""

from __future__ import annotations

import os


def shown(enabled: bool | None) -> bool:
    """ENABLED, or when None whether stderr is a terminal."""
    return os.isatty(2) if enabled is None else enabled


class Progress:
    """A tqdm bar, or nothing when not shown: callers drive both the same way.

    Args: total steps (None: unknown yet); whether to show it (None: on a terminal); the label;
    the unit; whether the finished bar stays on screen."""

    def __init__(self, total: int | None, enabled: bool | None, desc: str, unit: str = "it", leave: bool = False):
        self.bar = None
        if shown(enabled):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, leave=leave)

    def update(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def goto(self, done: int, total: int) -> None:
        """Show DONE of TOTAL steps: for work that reports where it is rather than each step."""
        if self.bar is not None:
            self.bar.total, self.bar.n = total, done
            self.bar.refresh()

    def note(self, **fields) -> None:
        """Figures shown after the bar (tqdm's postfix), e.g. the running perplexity."""
        if self.bar is not None:
            self.bar.set_postfix(**fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tqdm_class(enabled: bool | None):
    """A tqdm class for libraries that draw their own bars (huggingface_hub's downloads), shown
    by the same rule as `Progress`: ENABLED, or when None whether stderr is a terminal."""
    from tqdm import tqdm

    show = shown(enabled)

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's bar groups; plain tqdm rejects the keyword
            kwargs["disable"] = not show
            super().__init__(*args, **kwargs)

    return Bar
