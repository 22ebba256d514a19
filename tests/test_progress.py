"""`lmforge.progress.Progress`: a bar on stderr when shown, nothing at all otherwise."""

import pytest

from lmforge.progress import Progress, shown


def test_quiet_bar_writes_nothing(capfd):
    with Progress(3, False, "quiet") as bar:
        bar.update()
        bar.goto(2, 3)
        bar.note(ppl="1.0")
    assert bar.bar is None
    assert capfd.readouterr() == ("", "")


def test_shown_bar_writes_to_stderr(capfd):
    with Progress(None, True, "convert", unit="layer") as bar:
        bar.goto(2, 4)
        assert (bar.bar.n, bar.bar.total) == (2, 4)
        bar.update()
        bar.note(ppl="1.5")
    out, err = capfd.readouterr()
    assert out == "" and "convert" in err and "3/4" in err


@pytest.mark.parametrize("tty", [True, False])
def test_default_follows_the_terminal(monkeypatch, tty):
    monkeypatch.setattr("os.isatty", lambda fd: tty if fd == 2 else False)
    assert shown(None) is tty
    assert shown(True) is True and shown(False) is False
