"""`lmforge batch`: resumable under SIGKILL, one record per id, Ray gives the same texts."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from lmforge.export.convert import convert
from tests.test_errors import assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiny_onnx(tiny_factory, tmp_path_factory):
    return convert(
        tiny_factory(("llama", "float32", False, None)), tmp_path_factory.mktemp("batch") / "m", progress=False
    )


def write_requests(path, n, max_tokens=24):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": i, "prompt": f"Request number {i}: tell me a fact.", "max_tokens": max_tokens}) + "\n"
            )


def records(path):
    return [json.loads(line) for line in open(path)]


def test_killed_three_times_still_one_complete_record_per_id(tiny_onnx, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 200)
    cmd = [sys.executable, "-m", "lmforge", "batch", str(tiny_onnx), str(inp), "-o", str(out)]
    rng = random.Random(7)
    interrupted = 0
    for _ in range(3):
        before = len(records(out)) if out.exists() else 0
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < before + 10):
            time.sleep(0.02)  # let it write a few records, then kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += len(out.read_bytes().splitlines()) < 200
    assert interrupted >= 1, "the job finished before any kill: make the requests longer"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    recs = records(out)
    assert sorted(rec["id"] for rec in recs) == list(range(200))
    for rec in recs:
        assert set(rec) == {"id", "text", "finish_reason", "usage"} and rec["finish_reason"] in ("stop", "length")
        assert rec["usage"]["total_tokens"] == rec["usage"]["prompt_tokens"] + rec["usage"]["completion_tokens"]


def test_bad_lines_become_records_and_duplicates_run_once(tiny_onnx, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "prompt": "Hello", "max_tokens": 4}),
                "{not json",
                json.dumps({"id": "b", "max_tokens": 4}),
                json.dumps({"id": "a", "prompt": "again", "max_tokens": 4}),
                json.dumps({"id": "c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
            ]
        )
        + "\n"
    )
    r = run_cli("batch", tiny_onnx, inp, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "id 'a' on line 4 repeats" in r.stderr
    recs = {json.dumps(rec.get("id")) + str(rec.get("line", "")): rec for rec in records(out)}
    assert len(records(out)) == 4
    assert "not JSON" in recs["null2"]["error"] and "prompt and messages" in recs['"b"3']["error"]
    assert {rec["id"] for rec in records(out) if "text" in rec} == {"a", "c"}
    assert run_cli("batch", tiny_onnx, inp, "-o", out).returncode == 0 and len(records(out)) == 4
    assert_user_error(run_cli("batch", tiny_onnx, tmp_path / "missing.jsonl", "-o", out), "no input file")


@pytest.mark.slow
def test_ray_gives_the_same_texts(tiny_onnx, tmp_path):
    pytest.importorskip("ray")
    inp = tmp_path / "in.jsonl"
    write_requests(inp, 20, max_tokens=12)
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert run_cli("batch", tiny_onnx, inp, "-o", local).returncode == 0
    r = run_cli("batch", tiny_onnx, inp, "-o", on_ray, "--ray", "--workers", "2")
    assert r.returncode == 0, r.stderr
    a = {rec["id"]: rec["text"] for rec in records(local)}
    b = {rec["id"]: rec["text"] for rec in records(on_ray)}
    assert len(b) == 20 and a == b


def test_one_job_per_output_and_output_checks(tiny_onnx, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 200)
    first = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "batch", str(tiny_onnx), str(inp), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and out.stat().st_size):
            time.sleep(0.02)
        assert_user_error(run_cli("batch", tiny_onnx, inp, "-o", out), "another lmforge batch is writing")
    finally:
        first.kill()
        first.wait()
    assert_user_error(run_cli("batch", tiny_onnx, inp, "-o", inp), "must differ from the input")
    assert_user_error(run_cli("batch", tiny_onnx, inp, "-o", tmp_path), "is a folder")
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(b'\xff\xfe{"id": 1}\n' + json.dumps({"id": 2, "prompt": "hi", "max_tokens": 2}).encode() + b"\n")
    r = run_cli("batch", tiny_onnx, odd, "-o", tmp_path / "odd-out.jsonl")
    assert r.returncode == 0, r.stderr
    recs = records(tmp_path / "odd-out.jsonl")
    assert "not UTF-8" in recs[0]["error"] and recs[1]["id"] == 2
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("[1, 2]\n")
    assert_user_error(run_cli("batch", tiny_onnx, odd, "-o", foreign), "not lmforge batch records")
