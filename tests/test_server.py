"""`lmforge serve` on the default model (cpu-int4): the official `openai` client against a real
uvicorn server, continuous batching against each prompt's greedy output generated alone,
cancellation, bad input, the API key, and the chat page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_errors import assert_user_error, run_cli

NAME = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EOS_BIAS = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: keep generating to max_tokens


# ---- a real server in a subprocess -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lmforge serve FOLDER` on a free loopback port, up until `stop()`."""

    def __init__(self, model, *args, log: Path | None = None, timeout: float = 120, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log or os.devnull, "w")
        cmd = [sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmforge serve exited with {self.proc.returncode}: {log and log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("lmforge serve did not become ready")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics").text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; every sample line must parse."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (-?[0-9.e+-]+|\+Inf|NaN)", line)
        assert m, f"not a Prometheus sample: {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ---- the official client -----------------------------------------------------------------------


def test_openai_client_chat_and_completions(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    want = reference.chat(QUESTION, max_tokens=24)
    n_prompt = len(reference.prompt_ids(messages=QUESTION))

    r = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reference.last.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, reference.last.generation_tokens)
    assert r.object == "chat.completion" and r.model == NAME

    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference.last.finish_reason
    assert chunks[-1].usage.completion_tokens == reference.last.generation_tokens and not chunks[-1].choices

    prompt = "The capital of France is"
    want = reference.generate(prompt, raw=True, max_tokens=12)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(reference.prompt_ids(prompt, raw=True)) and r.usage.completion_tokens == 12
    pieces = [
        c.choices[0].text
        for c in client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    ]
    assert "".join(pieces) == want and len(pieces) > 3

    assert [m.id for m in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


def test_stop_strings_logprobs_and_seed(server, reference):
    prompt = "Once upon a time, in a small village,"
    stop = ["ic and h", "never"]  # the first spans three tokens ("magic", " and", " had")
    want = reference.generate(prompt, raw=True, max_tokens=40, stop=stop)
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": stop, "logprobs": 3},
        timeout=60,
    ).json()
    choice = r["choices"][0]
    assert choice["text"] == want and choice["finish_reason"] == "stop" and want.endswith("a master of mag")
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) > 0
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the top one

    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2},
        timeout=60,
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
    assert all(
        len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
        for c in content
    )

    def sampled(seed):
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": seed, "logit_bias": EOS_BIAS}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    assert sampled(7) == sampled(7) == reference.generate(prompt, raw=True, max_tokens=16, temperature=1.0, seed=7)


# ---- continuous batching -----------------------------------------------------------------------


def test_kv_pool_rows_give_each_sequence_its_own_logits(reference):
    """KVPool: prefill straight into a slot, decode a prefix of rows, move a row into a freed slot,
    grow the capacity mid-way: every row's logits equal its sequence run alone in a KVCache."""
    import numpy as np

    engine = reference.engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 40000, n).tolist() for n in (5, 17, 9)]

    def alone(prompt, tokens):
        cache = engine.new_cache(1, 64)
        out = [engine.prefill(cache, [prompt])[0]]
        return out + [engine.decode(cache, [t])[0] for t in tokens]

    pool = engine.new_pool(4, capacity=8)  # too small on purpose: it doubles as rows grow
    got = {0: [], 1: [], 2: []}
    got[0].append(engine.prefill(pool.rows(0, 1), [prompts[0]])[0])  # row 0: sequence 0
    got[1].append(engine.prefill(pool.rows(1, 2), [prompts[1]])[0])  # row 1: sequence 1
    for a, b in ((11, 12), (13, 14)):
        l0, l1 = engine.decode(pool.rows(0, 2), [a, b])
        got[0].append(l0), got[1].append(l1)
    got[2].append(engine.prefill(pool.rows(2, 3), [prompts[2]])[0])  # joins in row 2
    l0, l1, l2 = engine.decode(pool.rows(0, 3), [15, 16, 17])
    got[0].append(l0), got[1].append(l1), got[2].append(l2)
    pool.move_row(2, 0)  # sequence 0 leaves; sequence 2 moves into its slot
    l2, l1 = engine.decode(pool.rows(0, 2), [18, 19])
    got[2].append(l2), got[1].append(l1)
    want = {0: alone(prompts[0], [11, 13, 15]), 1: alone(prompts[1], [12, 14, 16, 19]), 2: alone(prompts[2], [17, 18])}
    for k in want:
        assert len(got[k]) == len(want[k])
        for g, w in zip(got[k], want[k]):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
    assert pool.capacity >= 21 and list(pool.lengths[:2]) == [11, 21]


def _request_cases(reference):
    """(kind, request body, expected text): prompts of different lengths and stops, one past the
    prefill chunk (256 tokens) so it prefills in chunks while others decode."""
    long_prompt = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
    cases = []
    for i, (prompt, n) in enumerate(
        [
            ("The capital of France is", 30),
            ("def fibonacci(n):", 40),
            ("Once upon a time, in a small village,", 12),
            (long_prompt + " Item 60 is", 20),
            ("1, 2, 3, 4,", 25),
            ("The best way to learn a language is", 35),
        ]
    ):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": i % 2 == 0}
        cases.append(("completions", body, reference.generate(prompt, raw=True, max_tokens=n)))
    for question, n in [("What is 2 + 2?", 40), ("Write a haiku about the sea.", 48)]:
        messages = [{"role": "user", "content": question}]
        body = {"messages": messages, "max_tokens": n, "temperature": 0, "stream": n == 40}
        cases.append(("chat/completions", body, reference.chat(messages, max_tokens=n)))
    return cases


def _call(url, kind, body) -> str:
    if not body.get("stream"):
        r = httpx.post(f"{url}/v1/{kind}", json=body, timeout=120).json()
        c = r["choices"][0]
        return c["text"] if kind == "completions" else c["message"]["content"]
    text = []
    with httpx.stream("POST", f"{url}/v1/{kind}", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        c = json.loads(line.removeprefix("data: "))["choices"][0]
        text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
    return "".join(text)


def test_concurrent_greedy_requests_equal_each_prompt_alone(server, reference):
    cases = _request_cases(reference)
    before = server.metrics()
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: _call(server.url, c[0], c[1]), cases))
    for (kind, body, want), text in zip(cases, got):
        assert text == want, (kind, body.get("prompt", body.get("messages"))[:60])
    after = server.metrics()
    steps = after["lmforge_decode_steps_total"] - before["lmforge_decode_steps_total"]
    rows = after["lmforge_decode_rows_total"] - before["lmforge_decode_rows_total"]
    print(f"{len(cases)} requests: {steps:.0f} decode steps, mean batch {rows / steps:.2f}")
    assert rows / steps > 2  # they did decode together
    assert after["lmforge_active_sequences"] == 0 and after["lmforge_queue_depth"] == 0


def test_serial_scheduler_serves_any_engine(reference):
    """The generic path (`--engine llamacpp` uses it): one sequence at a time through the Engine
    protocol, here over the ONNX Runtime engine, against Model.generate."""
    from lmforge.sampling import SamplingParams
    from lmforge.server.batching import Handle, SerialScheduler

    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    results = {i: [] for i in range(len(prompts))}
    done = threading.Event()
    sched = SerialScheduler(reference.engine).start()
    try:
        for i, p in enumerate(prompts):

            def sink(item, i=i):
                results[i].append(item)
                if all(r and getattr(r[-1], "finish_reason", None) for r in results.values()):
                    done.set()

            h = Handle(
                reference.tokenizer,
                reference.prompt_ids(p, raw=True),
                SamplingParams(max_tokens=20, temperature=0),
                reference.eos_token_ids,
                reference.engine.vocab_size,
                sink,
            )
            assert sched.submit(h)
        assert done.wait(60)
    finally:
        sched.close()
    for i, p in enumerate(prompts):
        assert "".join(d.text for d in results[i]) == reference.generate(p, raw=True, max_tokens=20)


def test_llamacpp_engine_serves_requests_one_at_a_time(default_model_path, tmp_path):
    """`--engine llamacpp`: concurrent requests are queued and each gets what the llama.cpp
    engine gives the prompt alone."""
    import inspect

    pytest.importorskip("llama_cpp")
    from lmforge.model import load

    if "engine" not in inspect.signature(load).parameters:
        pytest.skip("lmforge.model.load has no llama.cpp engine in this tree")
    ref = load(default_model_path, engine="llamacpp", threads=1)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    want = [ref.generate(p, raw=True, max_tokens=16) for p in prompts]
    s = Server(default_model_path, "--engine", "llamacpp", "--threads", 2, "--name", NAME, log=tmp_path / "serve.log")
    try:
        bodies = [{"prompt": p, "max_tokens": 16, "temperature": 0, "stream": i == 1} for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(lambda b: _call(s.url, "completions", b), bodies))
        assert got == want
        m = s.metrics()
        assert m["lmforge_decode_rows_total"] == m["lmforge_decode_steps_total"] > 0  # one sequence per step
        assert m["lmforge_active_sequences"] == 0
    finally:
        s.stop()


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metrics()
    body = {
        "prompt": "Tell me a very long story.",
        "max_tokens": 1500,
        "temperature": 0.8,
        "stream": True,
        "logit_bias": EOS_BIAS,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # (leaving this iterator closes the connection)
        for _ in range(6):
            assert next(lines).startswith("data: ") and next(lines) == ""
        assert server.metrics()["lmforge_active_sequences"] == 1
        lines.close()
    assert wait_until(lambda: server.metrics()["lmforge_active_sequences"] == 0, 5)
    after = server.metrics()
    assert after["lmforge_requests_cancelled_total"] == before["lmforge_requests_cancelled_total"] + 1
    assert after["lmforge_generation_tokens_total"] == before["lmforge_generation_tokens_total"]


# ---- the small endpoints -----------------------------------------------------------------------


def test_health_models_metrics_tokenize(server, reference):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/v1/models").json()
    assert r["object"] == "list" and r["data"][0]["id"] == NAME and r["data"][0]["object"] == "model"
    text = "Hello, wörld!"
    ids = httpx.post(server.url + "/tokenize", json={"content": text}).json()["tokens"]
    assert ids == reference.tokenizer.encode(text)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["content"] == text
    m = server.metrics()
    for name in (
        "lmforge_prompt_tokens_total",
        "lmforge_generation_tokens_total",
        "lmforge_queue_depth",
        "lmforge_active_sequences",
        "lmforge_time_to_first_token_seconds_count",
        "lmforge_generation_tokens_per_second_count",
        'lmforge_requests_total{endpoint="/tokenize",status="200"}',
    ):
        assert name in m, name
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "<script" in page.text
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # no external assets


BAD_REQUESTS = [  # (path, raw body, status, param) — each must be a 4xx with an OpenAI error body
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", b"{}", 400, "messages"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400, "max_tokens"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}',
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}',
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}',
        400,
        "temperature",
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": "x"}', 400, "top_p"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}',
        400,
        "stop",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}',
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}',
        400,
        "logit_bias",
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}', 400, "seed"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -1}', 400, "top_k"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "min_p": 1.5}', 400, "min_p"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}',
        400,
        "repetition_penalty",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999": 1}}',
        400,
        "logit_bias",
    ),
    ("/v1/completions", b'{"prompt": "hi", "presence_penalty": 2.5}', 400, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": 42}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [99999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 9}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "hi", "suffix": "x"}', 400, "suffix"),
    ("/tokenize", b'{"content": 5}', 400, "content"),
    ("/detokenize", b'{"tokens": [-1]}', 400, "tokens"),
    ("/detokenize", b'{"tokens": ["a"]}', 400, "tokens.0"),
]


def assert_openai_error(r, status, param="skip"):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param != "skip":
        assert err["param"] == param, err


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS, ids=[f"{p}:{b[:40]!r}" for p, b, *_ in BAD_REQUESTS])
def test_bad_request_is_a_4xx_with_an_openai_error(server, path, body, status, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert_openai_error(r, status, param)


def test_limits_and_routes(server, reference):
    long_text = "hello " * 9000  # past the 8192-token context
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}, timeout=60
    )
    assert_openai_error(r, 400, "messages")
    n = len(reference.prompt_ids(messages=[{"role": "user", "content": long_text}]))
    assert r.json()["error"]["code"] == "context_length_exceeded" and str(n) in r.json()["error"]["message"]
    assert "8192" in r.json()["error"]["message"]
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    assert_openai_error(httpx.post(server.url + "/v1/completions", content=big), 413)
    assert_openai_error(httpx.get(server.url + "/nope"), 404)
    assert_openai_error(httpx.get(server.url + "/static/../../../../etc/passwd"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert httpx.get(server.url + "/health").status_code == 200  # still up


# ---- in-process app: loading, the API key ------------------------------------------------------


def test_health_is_503_while_loading_and_api_key_guards_v1(reference):
    from fastapi.testclient import TestClient

    from lmforge.server.app import Limits, create_app

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return reference

    app = create_app(slow_load, NAME, api_key="s3cret", limits=Limits(max_tokens_limit=5))
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert_openai_error(
            client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer s3cret"}), 503
        )
        release.set()
        assert wait_until(lambda: client.get("/health").status_code == 200)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Bearer s3cret "},
        ):
            assert_openai_error(client.get("/v1/models", headers=headers), 401)
            assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
            assert_openai_error(client.post("/tokenize", json={"content": "hi"}, headers=headers), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, headers=ok)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        # max_tokens past --max-tokens-limit is capped, as is a request without one
        for extra in ({"max_tokens": 10**9}, {}):
            r = client.post(
                "/v1/chat/completions", json={"messages": QUESTION, "logit_bias": EOS_BIAS, **extra}, headers=ok
            ).json()
            assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_api_key_on_a_real_server(int4_folder, tmp_path):
    """The key from $LMFORGE_API_KEY (kept out of the process list): /v1 needs it, /health does not."""
    import openai

    s = Server(int4_folder, "--name", NAME, env={"LMFORGE_API_KEY": "k-123"}, log=tmp_path / "serve.log")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        assert_openai_error(httpx.get(s.url + "/v1/models"), 401)
        assert_openai_error(
            httpx.post(
                s.url + "/v1/chat/completions", json={"messages": QUESTION}, headers={"Authorization": "Bearer k-12"}
            ),
            401,
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k-123", max_retries=0)
        r = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
    finally:
        s.stop()


def test_load_failure_is_reported(reference):
    from fastapi.testclient import TestClient

    from lmforge.errors import LmforgeError
    from lmforge.server.app import create_app

    def broken():
        raise LmforgeError("model.onnx is truncated; convert the model again")

    told = []
    with TestClient(create_app(broken, NAME, on_load_error=told.append)) as client:
        assert wait_until(lambda: client.get("/health").json()["status"] == "failed")
        assert client.get("/health").status_code == 503 and told == ["model.onnx is truncated; convert the model again"]
        assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}), 503)


def test_engine_fault_fails_its_requests_not_the_server(reference):
    """A decode step that raises: the sequences in it get an OpenAI error (500, or an error event
    in the stream), the queue is kept, and the next request is served."""
    from fastapi.testclient import TestClient

    from lmforge.model import Model
    from lmforge.runtime.ort import OrtEngine
    from lmforge.server.app import Limits, create_app

    class Flaky(OrtEngine):  # the reference engine, failing on chosen decode calls
        fail_on = {3, 30}
        calls = 0

        def decode(self, cache, token_ids):
            Flaky.calls += 1
            if Flaky.calls in self.fail_on:
                raise RuntimeError("injected fault")
            return super().decode(cache, token_ids)

    engine = object.__new__(Flaky)
    engine.__dict__.update(reference.engine.__dict__)
    model = Model(engine, reference.tokenizer, reference.chat_template)
    with TestClient(create_app(lambda: model, NAME, limits=Limits(max_batch=2))) as client:
        assert wait_until(lambda: client.get("/health").status_code == 200)
        body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "engine_failed"
        Flaky.calls, Flaky.fail_on = 0, {2}
        assert_openai_error(client.post("/v1/completions", json=body), 500)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference.generate(
            body["prompt"], raw=True, max_tokens=8
        )


def test_a_failed_prefill_and_a_failed_row_answer_their_requests_only(reference):
    """A batched prefill that raises fails the prompts in it (they had left the queue: they must
    not wait forever); a sequence whose own sampling raises fails alone, its batch goes on."""
    from lmforge.runtime.ort import OrtEngine
    from lmforge.sampling import SamplingParams
    from lmforge.server.batching import BatchScheduler, Failed, Handle

    class FailingPrefill(OrtEngine):
        fail = True

        def prefill(self, cache, token_ids):
            if FailingPrefill.fail:
                FailingPrefill.fail = False
                raise RuntimeError("injected prefill fault")
            return super().prefill(cache, token_ids)

    engine = object.__new__(FailingPrefill)
    engine.__dict__.update(reference.engine.__dict__)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    results = {i: [] for i in range(len(prompts))}
    done = threading.Event()

    def sink(i):
        def put(item):
            results[i].append(item)
            if all(r and (isinstance(r[-1], Failed) or r[-1].finish_reason) for r in results.values()):
                done.set()

        return put

    handles = [
        Handle(
            reference.tokenizer,
            reference.prompt_ids(p, raw=True),
            SamplingParams(max_tokens=12),
            reference.eos_token_ids,
            engine.vocab_size,
            sink(i),
        )
        for i, p in enumerate(prompts)
    ]
    broken = handles[1].state
    broken.accept = lambda row: 1 / 0  # this row's own fault, at its first token
    sched = BatchScheduler(engine, max_batch=4)
    try:
        for h in handles[:2]:
            assert sched.submit(h)
        sched.start()
        assert wait_until(lambda: all(results[i] for i in (0, 1)), timeout=30), results
        assert all(isinstance(results[i][-1], Failed) for i in (0, 1))  # the failed prefill held both
        FailingPrefill.fail = False
        handles[1].state, handles[1].done = broken, False  # a fresh submit of the broken row, with a good one
        results[1].clear()
        assert sched.submit(handles[1]) and sched.submit(handles[2])
        assert done.wait(60), results
    finally:
        sched.close()
    assert isinstance(results[1][-1], Failed) and "ZeroDivisionError" in str(results[1][-1])
    assert "".join(d.text for d in results[2]) == reference.generate(prompts[2], raw=True, max_tokens=12)


def test_full_queue_is_a_429(reference):
    from fastapi.testclient import TestClient

    from lmforge.server.app import Limits, create_app

    with TestClient(create_app(lambda: reference, NAME, limits=Limits(max_queue=0))) as client:
        assert wait_until(lambda: client.get("/health").status_code == 200)
        assert_openai_error(client.post("/v1/completions", json={"prompt": "hi"}), 429)


def test_cli_serve_user_errors(tmp_path):
    assert_user_error(run_cli("serve", tmp_path / "no-such-model"), "no such model")
    assert_user_error(run_cli("serve", NAME, "--max-batch", "0"), "--max-batch")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert_user_error(run_cli("serve", NAME, "--port", busy.getsockname()[1]), "cannot listen")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("serve", empty, "--port", free_port())  # exists, but no model in it: fails while loading
    assert (
        r.returncode == 2
        and "Traceback" not in r.stderr
        and r.stderr.strip().splitlines()[-1].startswith("lmforge: error:")
    )


# ---- the chat page in a real browser -----------------------------------------------------------


def chromium_path() -> str | None:
    for name in (os.environ.get("LMFORGE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_chat_page_streams_a_reply_in_headless_chromium(server):
    exe = chromium_path()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; the dev extra has it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m'")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=60_000)
            reply = page.text_content(".msg.assistant.done")
            meta = page.text_content(".meta")
            assert reply and "Error" not in reply, reply
            assert re.search(r"[\d.]+ tokens/s", meta), meta
            # a long reply, stopped while it streams: the server frees its slot
            page.fill("#max-tokens", "1500")
            page.fill("#temperature", "1")
            page.fill("#input", "Tell me a very long story about dragons.")
            page.click("#send")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[1].textContent.length > 20", timeout=60_000
            )
            page.click("#stop")
            page.wait_for_selector(".msg.assistant.done >> nth=1", timeout=10_000)
            assert "stopped" in page.text_content(".meta >> nth=1")
        finally:
            browser.close()
    assert wait_until(lambda: server.metrics()["lmforge_active_sequences"] == 0, 5)
