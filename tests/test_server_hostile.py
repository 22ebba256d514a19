"""`lmforge serve` against hostile input and clients, on real uvicorn servers on loopback: a
seeded schema fuzzer (no response >= 500), input errors as 400s, a pathological chat template
(a 400 within 2 s while another stream keeps streaming), browser rules (Host allow-list, no
cross-site calls, CORS only for named origins, JSON bodies only), half-open connections, and
SIGTERM draining running streams."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.schema_fuzz import requests as fuzz_requests
from tests.test_server import EOS_BIAS, NAME, QUESTION, Server, assert_openai_error, wait_until

BOOM = "boom"  # the message that sends the hostile template into its loops
HOSTILE_PREFIX = (
    "{% if messages[-1].content == '" + BOOM + "' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
)


@pytest.fixture(scope="module")
def hostile_folder(int4_folder, tmp_path_factory):
    """The default model's int4 folder whose chat template loops for hours on the message 'boom'."""
    folder = tmp_path_factory.mktemp("hostile-template")
    for f in int4_folder.iterdir():
        if f.name != "tokenizer_config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((int4_folder / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE_PREFIX + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hostile_server(hostile_folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-hostile") / "serve.log"
    s = Server(
        hostile_folder,
        *("--name", NAME, "--max-batch", 4, "--threads", 2),
        *("--header-timeout", 2, "--max-connections", 100),
        log=log,
    )
    s.log_path = log
    yield s
    s.stop()


def post(url: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


# ---- input errors ------------------------------------------------------------------------------

SURROGATE = b'"\\ud800 hi"'
BAD_INPUT = [  # (path, body, param): each was a 500 or silently accepted
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\xc2\xb2": 1}}', "logit_bias"),  # "²"
    ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\xd9\xa3": 1}}', "logit_bias"),  # "٣" (Arabic-Indic 3)
    ("/v1/completions", b'{"prompt": ' + SURROGATE + b"}", "prompt"),
    ("/v1/completions", b'{"prompt": [' + SURROGATE + b"]}", "prompt.0"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + SURROGATE + b"}]}", "messages.0.content"),
    ("/tokenize", b'{"content": ' + SURROGATE + b"}", "content"),
    ("/tokenize", b'{"content": "\\udfff"}', "content"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', None),
    ("/v1/completions", b'{"prompt": "hi", "seed": Infinity}', None),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 1e999}', "temperature"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
]


def test_input_errors_are_400s(hostile_server):
    url = hostile_server.url
    for path, body, param in BAD_INPUT:
        assert_openai_error(post(url + path, body), 400, param)
    # a negative seed is a seed like any other (OpenAI takes any integer): the same one, the same draw
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": -12345}
    first, again = (post(url + "/v1/completions", body) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    assert first.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]
    # a temperature too small to divide by is greedy
    tiny = post(url + "/v1/completions", {**body, "temperature": 1e-320})
    greedy = post(url + "/v1/completions", {**body, "temperature": 0})
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert "Traceback" not in hostile_server.log_path.read_text()


@pytest.mark.slow
def test_2000_schema_fuzzed_requests_get_no_5xx(int4_folder, tmp_path):
    log = tmp_path / "serve.log"
    server = Server(int4_folder, "--name", NAME, "--max-tokens-limit", 4, "--max-batch", 4, "--threads", 2, log=log)
    try:
        client = httpx.Client(timeout=120, headers={"content-type": "application/json"})

        def send(item):
            path, body = item
            r = client.post(server.url + path, content=body)
            return path, body, r.status_code, r.text

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, fuzz_requests(seed=17, n=2000)))
        statuses = Counter(status for *_, status, _ in results)
        bad = [(p, b[:200], s, t[:300]) for p, b, s, t in results if s >= 500 or '"server_error"' in t]
        assert not bad, (statuses, bad[:5])
        assert statuses[200] > 100 and sum(statuses.values()) == 2000, statuses  # the fuzzer also reaches the model
        assert httpx.get(server.url + "/health").status_code == 200
        r = post(server.url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
    assert "Traceback" not in log.read_text()


# ---- a pathological chat template --------------------------------------------------------------


def stream_chunks(url: str, body: dict, arrivals: list, lines: list) -> None:
    """POST a streaming request; record each SSE line and when it came."""
    with httpx.stream(
        "POST", url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line:
                arrivals.append(time.monotonic())
                lines.append(line)


def test_pathological_template_is_a_400_within_2s_while_a_stream_keeps_streaming(hostile_server):
    url = hostile_server.url
    arrivals, lines = [], []
    body = {"messages": QUESTION, "max_tokens": 400, "stream": True, "logit_bias": EOS_BIAS}
    streamer = threading.Thread(target=stream_chunks, args=(url + "/v1/chat/completions", body, arrivals, lines))
    streamer.start()
    deadline = time.monotonic() + 60
    while len(arrivals) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(arrivals) >= 5, "the stream did not start"

    health = []

    def poll_health():
        while streamer.is_alive() and len(health) < 20:
            t = time.monotonic()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.1)

    poller = threading.Thread(target=poll_health)
    poller.start()
    start = time.monotonic()
    r = post(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": BOOM}], "max_tokens": 4})
    took, end = time.monotonic() - start, time.monotonic()
    assert_openai_error(r, 400, "messages")
    assert "to render" in r.json()["error"]["message"]
    assert took < 2.0, took
    streamer.join(120)
    poller.join(30)
    during = [t for t in arrivals if start <= t <= end]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if start <= b <= end + 0.5]
    assert len(during) >= 5 and max(gaps) < 0.75, (len(during), max(gaps, default=None))  # it kept streaming
    assert health and max(health) < 1.0, health  # it froze for the whole render (23 s) before
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2] + lines[-3]


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "\xed\xa0\x80 hi"}',  # a surrogate's raw bytes: json.loads decodes with surrogatepass
        '{"prompt": "\ud800 hi"}'.encode("utf-16-le", "surrogatepass"),  # UTF-16 JSON
        '{"prompt": "\\udfff"}'.encode("utf-32"),
        b'{"prompt": "a \\\\ud800 is fine", "suffix": "\\uDBFF"}',  # an escaped backslash, then a real one
    ],
    ids=["raw-utf8-bytes", "utf-16", "utf-32", "after-escaped-backslash"],
)
def test_lone_surrogates_in_every_spelling_are_400s(body):
    from lmforge.server import protocol as P

    with pytest.raises(P.ApiError) as e:
        P.parse(P.CompletionRequest, body)
    assert e.value.status == 400 and "lone UTF-16 surrogate" in str(e.value.body()), e.value.body()


def test_a_megabyte_of_token_ids_parses_at_about_the_cost_of_json_and_validation():
    """The lone-surrogate check walked every decoded value in Python (~200 ms a megabyte of token
    ids, more than decoding and validating it); now it scans the bytes first."""
    from lmforge.server import protocol as P

    body = json.dumps({"prompt": list(range(100_000, 250_000)), "max_tokens": 1}).encode()
    times = {"parse": [], "loads+validate": []}
    for _ in range(5):  # interleaved, medians: the test machine is shared
        start = time.perf_counter()
        P.parse(P.CompletionRequest, body)
        times["parse"].append(time.perf_counter() - start)
        start = time.perf_counter()
        P.CompletionRequest.model_validate(json.loads(body))
        times["loads+validate"].append(time.perf_counter() - start)
    parse, reference = (sorted(t)[2] for t in times.values())
    assert parse < 1.5 * reference, (parse, reference)


def test_a_burst_of_pathological_templates_does_not_hold_up_other_requests(hostile_server):
    """More hostile renders at once than the default executor has threads: they wait for the 2
    render workers on threads of their own, so a plain completion and /tokenize answer at once."""
    import os

    url = hostile_server.url
    burst = min(32, (os.cpu_count() or 1) + 4) + 2  # more than the default executor's threads
    hostile = {"messages": [{"role": "user", "content": BOOM}], "max_tokens": 1}
    with ThreadPoolExecutor(burst) as pool:
        replies = [pool.submit(post, url + "/v1/chat/completions", hostile) for _ in range(burst)]
        time.sleep(0.3)
        start = time.monotonic()
        r = post(url + "/v1/completions", {"prompt": "Once upon", "max_tokens": 1})
        took = time.monotonic() - start
        t = post(url + "/tokenize", {"content": "hello"})
        took_tokenize = time.monotonic() - start - took
        codes = Counter(f.result().status_code for f in replies)
    assert r.status_code == 200 and t.status_code == 200, (r.text, t.text)
    assert took < 0.8 and took_tokenize < 0.5, (took, took_tokenize)
    assert codes == {400: burst}, codes


# ---- browsers ----------------------------------------------------------------------------------


def test_browser_rules_on_a_real_server(hostile_server):
    url, port = hostile_server.url, hostile_server.port
    good = {"prompt": "hi", "max_tokens": 1}
    malformed = ("localhost:80@evil.example", "[::1]evil.example", "localhost:80:80", "[::1", "[evil]:80", "a b")
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io", *malformed):
        assert_openai_error(httpx.get(url + "/health", headers={"host": host}), 403)
        assert_openai_error(httpx.post(url + "/v1/completions", json=good, headers={"host": host}), 403)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", "localhost.", "192.168.0.7:1", "[::1]:80"):
        assert httpx.get(url + "/health", headers={"host": host}).status_code == 200, host
    # a cross-site form or fetch: text/plain needs no preflight, so it must not run
    before = hostile_server.metrics()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        r = httpx.post(url + "/v1/completions", content=json.dumps(good), headers={"content-type": kind})
        assert_openai_error(r, 415)
    after = hostile_server.metrics()
    key = 'lmforge_requests_total{endpoint="/v1/completions",status="200"}'
    assert after.get(key, 0) == before.get(key, 0)  # none of them generated
    evil = {"origin": "http://evil.example", "content-type": "application/json"}
    assert_openai_error(httpx.post(url + "/v1/completions", json=good, headers=evil), 403)
    preflight = {"origin": "http://evil.example", "access-control-request-method": "POST"}
    r = httpx.options(url + "/v1/completions", headers=preflight)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # the chat page's own requests carry its origin: same origin, allowed
    r = httpx.post(url + "/v1/completions", json=good, headers={"origin": url})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_only_for_the_named_origins(reference):
    from fastapi.testclient import TestClient

    from lmforge.server.app import create_app
    from lmforge.server.guard import Access

    site = "https://app.example.com"
    access = Access(allowed_hosts=("localhost",), cors_origins=(site,))
    with TestClient(create_app(lambda: reference, NAME, access=access), base_url="http://localhost") as client:
        preflight = {
            "origin": site,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        }
        r = client.options("/v1/completions", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == site
        assert "POST" in r.headers["access-control-allow-methods"]
        assert {"content-type", "authorization"} <= set(r.headers["access-control-allow-headers"].lower().split(", "))
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"origin": site})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site
        for other in ("https://evil.example", "https://app.example.com.evil.example", "null"):
            r = client.options("/v1/completions", headers={**preflight, "origin": other})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 403


@pytest.mark.parametrize(
    "flags,needle",
    [
        (("--cors-origin", "app.example.com"), "--cors-origin"),
        (("--max-connections", "0"), "--max-connections"),
        (("--max-connections", "100000000"), "--max-connections"),
        (("--shutdown-grace", "-1"), "--shutdown-grace"),
        (("--header-timeout", "0"), "--header-timeout"),
    ],
)
def test_cli_rejects_bad_limits_in_one_line(int4_folder, flags, needle):
    from tests.test_errors import assert_user_error, run_cli

    assert_user_error(run_cli("serve", int4_folder, *flags, "--port", "0"), needle)


# ---- slow clients ------------------------------------------------------------------------------


def test_300_half_open_connections_leave_health_answering(hostile_server):
    """Past --max-connections 100 the oldest idle connections make room; past --header-timeout
    the rest are closed; the warnings about it are rate-limited."""
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # never finished
            socks.append(s)
        start = time.monotonic()
        r = httpx.get(hostile_server.url + "/health", timeout=5)
        assert r.status_code == 200 and time.monotonic() - start < 1.0
        time.sleep(3.0)  # past --header-timeout 2: the server has closed every one of them
        for s in socks:
            s.settimeout(2)
            assert _closed(s)
        assert httpx.get(hostile_server.url + "/health", timeout=5).status_code == 200
    finally:
        for s in socks:
            s.close()
    assert hostile_server.log_path.read_text().count("connections are open") <= 6


SLOW_BODY = (
    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n{"
)


def test_connections_trickling_their_bodies_do_not_lock_others_out(hostile_server):
    """--max-connections 100 connections each sending a body a byte at a time: they no longer
    count as busy, so the oldest make room and /health answers at once."""
    socks = []
    try:
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5)
            s.sendall(SLOW_BODY)
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            with contextlib.suppress(OSError):
                s.sendall(b" ")
        start = time.monotonic()
        r = httpx.get(hostile_server.url + "/health", timeout=5)
        assert r.status_code == 200 and time.monotonic() - start < 1.0
    finally:
        for s in socks:
            s.close()


def _closed(s: socket.socket) -> bool:
    """The server closed `s` (unread data makes the close a reset)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_body_that_never_arrives_is_a_408(reference):
    import uvicorn

    from lmforge.server.app import Limits, create_app
    from tests.test_server import free_port

    port = free_port()
    app = create_app(lambda: reference, NAME, limits=Limits(body_timeout_s=1.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: _health(port) == 200, 30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            start = time.monotonic()
            reply = b""
            while b"request_timeout" not in reply and (piece := s.recv(4096)):
                reply += piece
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
            assert 0.9 < time.monotonic() - start < 3
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a byte every 0.3 s: one deadline
            s.sendall(SLOW_BODY)
            start, reply = time.monotonic(), b""
            s.setblocking(False)
            while b"request_timeout" not in reply and time.monotonic() - start < 5:
                time.sleep(0.3)
                with contextlib.suppress(BlockingIOError):
                    s.sendall(b" ")
                    reply += s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
            assert 0.9 < time.monotonic() - start < 3
    finally:
        server.should_exit = True
        thread.join(10)


def _health(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


# ---- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_drains_running_streams_and_exits_0(int4_folder, tmp_path):
    s = Server(int4_folder, "--name", NAME, "--max-batch", 4, "--threads", 2, "--shutdown-grace", 4, log=tmp_path / "l")
    results = [([], []) for _ in range(4)]
    lengths = (24, 24, 2000, 2000)  # two finish within the grace, two are cut off by it
    threads = [
        threading.Thread(
            target=stream_chunks,
            args=(
                s.url + "/v1/completions",
                {"prompt": "Once upon a time", "max_tokens": n, "stream": True, "logit_bias": EOS_BIAS},
                *results[i],
            ),
        )
        for i, n in enumerate(lengths)
    ]
    try:
        for t in threads:
            t.start()
        assert all(wait_until(lambda a=a: len(a) >= 2, 60) for a, _ in results), "the streams did not start"
        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        with pytest.raises(httpx.HTTPError):  # no new requests
            time.sleep(0.5)
            httpx.get(s.url + "/health", timeout=2).raise_for_status()
        assert s.proc.wait(30) == 0
        took = time.monotonic() - sent
        for t in threads:
            t.join(30)
    finally:
        s.stop()
    assert took < 4 + 3, took
    for (arrivals, lines), n in zip(results, lengths):
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][len("data: ") :])
        if n > 24:  # streamed on through the grace period, then cut off with an error event
            assert last["error"]["code"] == "server_shutdown", last
            assert sum(t > sent + 1 for t in arrivals) >= 3
        elif "error" in last:  # a machine too loaded to write 24 tokens in 4 s
            assert last["error"]["code"] == "server_shutdown", last
        else:
            assert last["choices"][0]["finish_reason"] == "length"


def test_sigterm_while_bodies_are_arriving_is_503_and_a_quiet_exit(int4_folder, tmp_path):
    """Requests still reading their bodies when the drain starts get a 503 at once: the server
    exits 0 well within the grace, with no cancelled tasks or tracebacks in its log."""
    log = tmp_path / "serve.log"
    s = Server(int4_folder, "--name", NAME, "--threads", 1, "--shutdown-grace", 4, log=log)
    socks = []
    try:
        for _ in range(6):
            socks.append(socket.create_connection(("127.0.0.1", s.port), timeout=10))
            socks[-1].sendall(SLOW_BODY)
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert s.proc.wait(30) == 0
        took = time.monotonic() - sent
        replies = []
        for sock in socks:
            with contextlib.suppress(OSError):
                replies.append(sock.recv(4096))
    finally:
        for sock in socks:
            sock.close()
        s.stop()
    assert took < 3, took
    assert replies and all(r.startswith(b"HTTP/1.1 503") and b"draining" in r for r in replies), replies
    text = log.read_text()
    assert "Traceback" not in text and "Cancel" not in text and "Exception in ASGI" not in text, text[-2000:]


def test_cli_run_with_a_pathological_template_is_one_line_and_exit_2(hostile_folder):
    from tests.test_errors import assert_user_error, run_cli

    start = time.monotonic()
    r = run_cli("run", hostile_folder, "-p", BOOM, "--max-tokens", "2")
    assert_user_error(r, "chat template took more than 1 s to render")
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_with_few_descriptors_a_connection_flood_leaves_health_answering_and_the_log_small(int4_folder, tmp_path):
    """The issue's case: out of descriptors, /health stopped answering and asyncio logged 450k
    tracebacks. With 256 descriptors and 600 connections that never finish their headers the
    server stays under its descriptor budget (connections past it, and the oldest idle ones,
    are closed), /health answers, and the log stays a few lines."""
    import os
    import resource
    import subprocess
    import sys

    from tests.test_server import free_port

    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "lmforge", "serve", str(int4_folder), "--port", str(port), "--threads", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
        )
    socks = []
    try:
        assert wait_until(lambda: _health(port) == 200, 120)
        for _ in range(600):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=0.2)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                socks.append(s)
            except OSError:
                pass  # a full accept queue: the kernel drops the SYN
        for _ in range(5):
            start = time.monotonic()
            assert _health(port) == 200 and time.monotonic() - start < 1.0
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < 256
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        assert proc.wait(30) == 0
    assert len(socks) > 150, len(socks)  # the flood did reach the server
    assert log.stat().st_size < 20_000, log.read_text()[:2000]
