"""Speculative decoding in the server: a sequence decoding alone drafts (n-gram) and verifies in
one pass of its pool row; its greedy text is the model's plain greedy text, alone or while other
requests join and leave the batch; /metrics counts the drafts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_errors import assert_user_error, run_cli
from tests.test_server import NAME, Server

# text that repeats itself, so that prompt lookup drafts and the model keeps the drafts
GROUNDED = (
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "def mul(a, b):\n    return a * b\n\n\ndef div(a, b):\n    return a / b\n\n\n"
    "Here are the same four functions again, copied exactly:\n\ndef add(a, b):\n"
)
PROMPTS = [GROUNDED, "The history of the Roman Empire", GROUNDED.replace("add", "plus"), "Once upon a time,"]


@pytest.fixture(scope="module")
def plain(default_onnx):
    """The fp32 form in this process, speculation off: the greedy text to match."""
    from lmforge.model import load

    return load(default_onnx, threads=1, speculative="off")


def _complete(url: str, prompt: str, n: int = 48) -> str:
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.slow
def test_a_lone_sequence_speculates_and_keeps_the_greedy_text(default_onnx, plain, tmp_path):
    s = Server(default_onnx, "--name", NAME, "--max-batch", 4, "--threads", 2, log=tmp_path / "serve.log")
    try:
        assert _complete(s.url, GROUNDED) == plain.generate(GROUNDED, raw=True, max_tokens=48)
        m = s.metrics()
        assert m["lmforge_speculative_verifies_total"] > 0, m
        assert m["lmforge_speculative_accepted_total"] > 0, m  # the copied functions are drafted and kept
        assert m["lmforge_speculative_tokens_total"] > m["lmforge_speculative_passes_total"]
        # a prompt over 256 tokens prefills in the lane, then decodes in the pool: it speculates too
        before = m["lmforge_speculative_verifies_total"]
        long = "Copy this code exactly.\n\n" + GROUNDED * 4
        assert _complete(s.url, long) == plain.generate(long, raw=True, max_tokens=48)
        assert s.metrics()["lmforge_speculative_verifies_total"] > before
        # replies that end inside a verify pass (max_tokens reached on an accepted draft)
        for n in range(10, 22):
            assert _complete(s.url, GROUNDED, n) == plain.generate(GROUNDED, raw=True, max_tokens=n), n
        assert "engine step failed" not in (tmp_path / "serve.log").read_text()  # it failed the others in flight
        # requests that join and leave: rows speculate while alone, decode in the batch otherwise
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: _complete(s.url, p), PROMPTS))
        assert got == [plain.generate(p, raw=True, max_tokens=48) for p in PROMPTS]
    finally:
        s.stop()


@pytest.mark.slow
def test_a_llamacpp_draft_model_outlives_the_requests_around_it(default_onnx, default_model_path, plain, tmp_path):
    """A GGUF draft runs on llama.cpp, whose one context serves its newest cache only: a drafter
    whose cache another request's drafter took over starts a new one (it failed every request)."""
    s = Server(
        default_onnx,
        *("--name", NAME, "--max-batch", 4, "--threads", 2),
        *("--speculative", "draft", "--draft", default_model_path),
        log=tmp_path / "serve.log",
    )
    try:
        lengths = [40, 4, 24]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda n: _complete(s.url, GROUNDED, n), lengths))
        assert got == [plain.generate(GROUNDED, raw=True, max_tokens=n) for n in lengths]
        assert _complete(s.url, GROUNDED, 32) == plain.generate(GROUNDED, raw=True, max_tokens=32)
        assert s.metrics()["lmforge_speculative_verifies_total"] > 0
    finally:
        s.stop()


@pytest.mark.slow
def test_speculative_off_and_int4(default_onnx, int4_folder, tmp_path):
    """--speculative off: plain decoding, no speculative counters; cpu-int4, where a verified row
    may round unlike a decoded one, speculates only when asked."""
    for folder, args, speculates in (
        (default_onnx, ("--speculative", "off"), False),
        (int4_folder, (), False),
        (int4_folder, ("--speculative", "ngram"), True),
    ):
        s = Server(folder, "--name", NAME, "--threads", 2, *args, log=tmp_path / "serve.log")
        try:
            assert _complete(s.url, GROUNDED, 24)
            m = s.metrics()
            assert ("lmforge_speculative_passes_total" in m) == speculates, (args, m)
            if speculates:
                assert m["lmforge_speculative_verifies_total"] > 0
        finally:
            s.stop()


def test_serve_speculative_user_errors():
    assert_user_error(run_cli("serve", NAME, "--draft-max", "0"), "--draft-max")
    assert_user_error(run_cli("serve", NAME, "--speculative", "draft"), "--draft")
