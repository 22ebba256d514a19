"""The defaults users expect: run/chat/serve/load on the CPU take cpu-int4 (the exact block transcode
of a quantized GGUF, RTN for a float checkpoint) and say so on stderr; serve picks its engine as run
does; run reads a prompt from --file; recommend says why it rules a form out."""

import json
import subprocess
import sys

import pytest

from lmforge.errors import LmforgeError
from tests.test_errors import assert_user_error

QUESTION = "What is the capital of France?"


def lmforge(*args, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_run_defaults_to_the_exact_int4_transcode(tmp_path):
    from lmforge.model import load

    home = tmp_path / "home"
    r = lmforge(
        "run",
        "smollm2-135m",
        "-p",
        QUESTION,
        "--engine",
        "ort",
        "--max-tokens",
        "12",
        "--threads",
        "1",
        env={"LMFORGE_HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr
    # the GGUF's Q4_1 blocks (and its Q8_0 tensors) become MatMulNBits as they are; nothing is fp32
    assert "lmforge: running smollm2-135m as cpu-int4 (exact transcode of Q4_1, Q8_0)" in r.stderr.splitlines()
    folders = [p for p in (home / "onnx").iterdir() if p.is_dir()]
    assert len(folders) == 1 and json.loads((folders[0] / "lmforge.json").read_text())["target"] == "cpu-int4"
    explicit = load(folders[0], threads=1)  # the same folder named outright gives the same text
    assert r.stdout.strip() == explicit.generate(QUESTION, max_tokens=12).strip()


def test_load_defaults_to_int4_rtn_for_a_float_checkpoint(tiny_factory, tmp_path, monkeypatch):
    from lmforge.model import load

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    model = load(tiny_factory(("llama", "float32", False, None)), threads=1)
    assert model.form == "cpu-int4 (int4 RTN, block 32)"
    assert load(tiny_factory(("llama", "float32", False, None)), target="cpu-fp32", threads=1).form == (
        "cpu-fp32 (fp32 weights)"
    )


def test_serve_engine_auto_takes_llamacpp_for_a_gguf(default_model_path, tmp_path):
    pytest.importorskip("llama_cpp")
    import httpx

    from lmforge.model import load
    from tests.test_server import Server

    want = load(default_model_path, engine="llamacpp", threads=1).generate(
        "The capital of France is", raw=True, max_tokens=8
    )
    log = tmp_path / "serve.log"
    s = Server(default_model_path, "--threads", 1, "--name", "m", log=log)  # no --engine: auto
    try:
        body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        got = httpx.post(s.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert got == want
    finally:
        s.stop()
    assert f"running as {default_model_path.name} on llama.cpp (as it is)" in log.read_text()


def test_serve_unknown_engine_is_a_user_error():
    assert_user_error(lmforge("serve", "smollm2-135m", "--engine", "vllm"), "invalid choice", "auto")


def test_run_prompt_from_a_file(tmp_path):
    from lmforge.model import load

    prompt = "Quelle est la capitale de la France ? Répondez en un mot."
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    r = lmforge(
        "run",
        "smollm2-135m",
        "--file",
        tmp_path / "prompt.txt",
        "--engine",
        "ort",
        "--max-tokens",
        "8",
        "--threads",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == load("smollm2-135m", engine="ort", threads=1).generate(prompt, max_tokens=8).strip()


def test_run_prompt_file_errors(tmp_path):
    assert_user_error(lmforge("run", "smollm2-135m", "--file", tmp_path / "missing.txt"), "cannot read prompt file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_user_error(lmforge("run", "smollm2-135m", "--file", tmp_path / "latin1.txt"), "not UTF-8")
    (tmp_path / "ok.txt").write_text("hi")
    assert_user_error(lmforge("run", "smollm2-135m", "--file", tmp_path / "ok.txt", "-p", "hi"), "not allowed with")


def test_recommend_says_why_it_rules_a_form_out(monkeypatch):
    import onnxruntime

    from lmforge import devices
    from lmforge.recommend import recommend

    r = lmforge("recommend", "smollm2-135m", "--memory", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    rows = {f["target"]: f for f in json.loads(r.stdout)["forms"]}
    fp32 = rows["cpu-fp32"]
    assert fp32["memory_bytes"] > 0.5 * 2**30 and fp32["ruled_out"] == (
        f"too big: needs {fp32['memory_bytes'] / 2**30:.2f} GiB, memory given is 0.50 GiB"
    )
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert ("CUDAExecutionProvider" in (rows["cuda-fp16"]["ruled_out"] or "")) != cuda
    assert all((f["ruled_out"] is None) == f["fits"] for f in rows.values())
    text = lmforge("recommend", "smollm2-135m", "--memory", "0.5").stdout
    assert sum(line.strip().startswith("ruled out: ") for line in text.splitlines()) == sum(
        not f["fits"] for f in rows.values()
    )
    monkeypatch.setattr(devices, "_llamacpp", lambda: None)  # as on a machine without llama-cpp-python
    with pytest.raises(LmforgeError, match="the smallest that can run here needs 0.6 GiB"):
        recommend("smollm2-135m", 0.5)  # cpu-int4 (0.58 GiB) is then the smallest
    rows = {f["target"]: f for f in recommend("smollm2-135m", 0.7)["forms"]}
    assert rows["gguf-q8_0"]["ruled_out"] == "llama.cpp is not installed (pip install 'lmforge[llamacpp]')"
