"""Library warnings go through `logging` (logger "lmforge..."); the CLI prints them on stderr as
`lmforge: warning: ...` lines, and a library user sees them as log records."""

import logging

from tests.test_errors import run_cli


def test_cli_prints_library_warnings_as_its_own_lines(tmp_path, tiny_factory):
    """The tiny llama's rows of 64 fit no K-quant: the GGUF writer warns through logging, the CLI shows one line."""
    src = tiny_factory(("llama", "float32", False, None))
    r = run_cli("convert", src, "-o", tmp_path / "t.gguf", "--gguf", "q4_k_m")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: warning: "), r.stderr
    assert "tensors fall back to another type" in lines[0] and "Q5_0" in lines[0]


def test_library_warns_through_logging(tmp_path, tiny_factory, caplog, capfd, monkeypatch):
    from lmforge.export.gguf import convert_to_gguf

    monkeypatch.setattr(logging.getLogger("lmforge"), "handlers", [])  # as in a program that never ran the CLI
    src = tiny_factory(("llama", "float32", False, None))
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        convert_to_gguf(src, tmp_path / "t.gguf", "q4_k_m", progress=False)
    records = [r for r in caplog.records if r.name == "lmforge.export.gguf"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "tensors fall back to another type" in records[0].getMessage()
    assert "lmforge: warning:" not in capfd.readouterr().err  # no print of its own


def test_cli_handler_format_and_level(capsys):
    from lmforge.cli import _StderrHandler, show_library_warnings

    logger = logging.getLogger("lmforge")
    before = list(logger.handlers)
    try:
        show_library_warnings()
        show_library_warnings()  # installed once per process
        assert sum(isinstance(h, _StderrHandler) for h in logger.handlers) == 1
        logging.getLogger("lmforge.somewhere").warning("the %s is odd", "input")
        logging.getLogger("lmforge.somewhere").info("not shown")
        logging.getLogger("lmforge.server").error("it broke")
        assert capsys.readouterr().err == "lmforge: warning: the input is odd\nlmforge: error: it broke\n"
    finally:
        logger.handlers[:] = before
