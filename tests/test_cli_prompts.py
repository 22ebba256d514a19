"""Prompts from the standard input (`-p -`, or piped with no -p) and `chat --system`, checked
against the library given the same text and messages."""

import subprocess
import sys

import pytest

from tests.test_errors import assert_user_error

QUESTION = "What is the capital of France?"
RUN = ("--engine", "ort", "--target", "cpu-fp32", "--max-tokens", "12", "--threads", "1")


def lmforge(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def fp32_model():
    from lmforge.model import load

    return load("smollm2-135m", engine="ort", target="cpu-fp32", threads=1)


def test_prompt_from_stdin(fp32_model):
    expected = fp32_model.generate(QUESTION, max_tokens=12)
    assert "Paris" in expected  # FACTS.md: the fp32 path answers so
    for args in (("-p", "-"), ()):
        r = lmforge("run", "smollm2-135m", *args, *RUN, stdin=QUESTION)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == expected.strip()


def test_no_prompt_on_a_terminal_is_a_user_error():
    # no -p and a terminal on stdin: a pseudo-terminal stands in for the user's
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "lmforge", "run", "smollm2-135m"], stdin=follower, capture_output=True, text=True
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert_user_error(r, "-p TEXT", "pipe")


def test_chat_system_message(fp32_model):
    system = "Answer in Spanish."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    expected = fp32_model.chat(messages, max_tokens=12)
    assert expected != fp32_model.chat(messages[1:], max_tokens=12)  # the system message changes the answer
    conversation = f"{QUESTION}\n/reset\n{QUESTION}\n/exit\n"
    r = lmforge("chat", "smollm2-135m", "--system", system, *RUN, stdin=conversation)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    answers = [line.removeprefix(">>> ") for line in lines if line.startswith(">>> ") and line != ">>> "]
    assert answers == [expected.strip(), "(conversation cleared)", expected.strip()]  # /reset keeps it
