"""A model with no chat template behaves the same in `run`, `chat`, the server and `batch`:
a plain prompt runs as raw text (said once on stderr, as Ollama runs a model with no TEMPLATE);
chat messages are refused with a hint (one line, exit 2 / HTTP 400 / the row's error), never
wrapped in a guessed format."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.test_errors import assert_user_error, run_cli

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def bare(tiny_factory, tmp_path_factory):
    """A tiny llama ONNX folder whose tokenizer files carry no chat template."""
    from lmforge.export.convert import convert

    folder = convert(
        tiny_factory(("llama", "float32", False, None)), tmp_path_factory.mktemp("bare") / "m", progress=False
    )
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg.pop("chat_template", None)  # the fixture had one: it is the thing removed
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def raw_text(bare):
    r = run_cli("run", bare, "-p", PROMPT, "--raw", "--temperature", "0", "--max-tokens", "6")
    assert r.returncode == 0 and "no chat template" not in r.stderr, r.stderr
    return r.stdout.rstrip("\n")


def test_run_continues_the_prompt_raw_and_says_so(bare, raw_text):
    r = run_cli("run", bare, "-p", PROMPT, "--temperature", "0", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == raw_text and raw_text
    notes = [line for line in r.stderr.splitlines() if "no chat template" in line]
    assert len(notes) == 1 and "raw text" in notes[0] and "--raw" in notes[0]


def test_chat_command_refuses_with_a_hint(bare):
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", str(bare)], input="hello\n", capture_output=True, text=True
    )
    assert_user_error(r, "no chat template", "cannot chat", "lmforge run")


def test_chat_command_refuses_before_converting(tiny_factory, tmp_path):
    """An HF folder with no template: refused at once, nothing converted into the cache."""
    import os
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny_factory(("llama", "float32", False, None)), folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    home = tmp_path / "home"
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", str(folder)],
        input="hello\n",
        capture_output=True,
        text=True,
        env={**os.environ, "LMFORGE_HOME": str(home)},
    )
    assert_user_error(r, "no chat template", "cannot chat")
    assert not home.exists() or not any(home.rglob("*.onnx")), sorted(home.rglob("*"))


def test_server_chat_is_a_400_and_completions_run_raw(bare, raw_text, tmp_path):
    from tests.test_server import Server

    server = Server(bare, "--threads", 1, log=tmp_path / "serve.log")
    try:
        chat = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        completion = httpx.post(
            server.url + "/v1/completions",
            json={"model": "m", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        )
    finally:
        server.stop()
    assert chat.status_code == 400
    error = chat.json()["error"]
    assert "no chat template" in error["message"] and "/v1/completions" in error["message"]
    assert error["param"] == "messages"
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == raw_text
    assert "no chat template: /v1/chat/completions answers 400" in (tmp_path / "serve.log").read_text()


def test_batch_runs_prompts_raw_and_refuses_messages_per_row(bare, raw_text, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": "p", "prompt": PROMPT, "max_tokens": 6, "temperature": 0},
        {"id": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("batch", bare, inp, "-o", out)
    assert r.returncode == 0, r.stderr  # a refused row is recorded, as any bad row is
    records = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert records["p"]["text"] == raw_text
    assert "no chat template" in records["m"]["error"] and '"prompt" field' in records["m"]["error"]
    assert sum("no chat template" in line for line in r.stderr.splitlines()) == 1
