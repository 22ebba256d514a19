"""`lmforge serve` under load and faults: 200 requests from 16 concurrent clients, a random fifth
of which leave mid-stream, plus malformed requests mixed in. The server stays up, every other
request gets its complete greedy answer (the one the prompt gets alone), no sequence is left
active, and resident memory after the run is within 10% of after the first 20 requests."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.test_server import NAME, Server, wait_until

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The best way to learn a language is",
    "Water boils at",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def loaded_server(int4_folder, tmp_path_factory):
    s = Server(
        int4_folder,
        "--name",
        NAME,
        "--max-batch",
        8,
        "--threads",
        2,
        log=tmp_path_factory.mktemp("serve-load") / "serve.log",
    )
    yield s
    s.stop()


def one_request(url: str, prompt: str, leave_after: int | None) -> str | None:
    """Stream a greedy completion; with `leave_after`, disconnect after that many events.
    Returns the text of a complete answer (checked to end properly), None after leaving."""
    body = {
        "model": NAME,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = (line.removeprefix("data: ") for line in r.iter_lines() if line)
        if leave_after is not None:
            for _ in range(leave_after):
                next(events)
            events.close()
            return None
        events = list(events)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] <= MAX_TOKENS and not chunks[-1]["choices"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["text"] for c in chunks[:-1])


BAD_BODIES = [
    b'{"prompt": ',
    b'{"prompt": "x", "max_tokens": -5}',
    b'{"prompt": "x", "temperature": 9}',
    b'{"model": "nope", "prompt": "x"}',
    b'{"messages": []}',
]


def bad_request(url: str, body: bytes) -> None:
    path = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
    r = httpx.post(url + path, content=body, timeout=30)
    assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_200_requests_16_clients_a_fifth_leave(loaded_server, reference):
    server, url = loaded_server, loaded_server.url
    want = {p: reference.generate(p, raw=True, max_tokens=MAX_TOKENS) for p in PROMPTS}
    rng = random.Random(1234)
    plan = [
        (
            rng.choice(PROMPTS),
            rng.randint(1, 6) if rng.random() < 0.2 else None,
            rng.choice(BAD_BODIES) if rng.random() < 0.05 else None,
        )
        for _ in range(200)
    ]
    lock = threading.Lock()
    wrong, leaving = [], sum(leave is not None for _, leave, _ in plan)

    def run(item):
        prompt, leave, bad = item
        if bad is not None:
            bad_request(url, bad)
        text = one_request(url, prompt, leave)
        if text is not None and text != want[prompt]:
            with lock:
                wrong.append((prompt, text))

    proc = psutil.Process(server.proc.pid)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(run, plan[:20]))
        rss_20 = proc.memory_info().rss
        list(pool.map(run, plan[20:]))
    assert wait_until(lambda: server.metrics()["lmforge_active_sequences"] == 0, 10)
    rss_200 = proc.memory_info().rss
    m = server.metrics()
    print(
        f"{leaving} of 200 left mid-stream; RSS after 20: {rss_20 / 2**20:.0f} MiB, "
        f"after 200: {rss_200 / 2**20:.0f} MiB;"
        f" mean decode batch {m['lmforge_decode_rows_total'] / m['lmforge_decode_steps_total']:.2f}"
    )
    assert server.proc.poll() is None and httpx.get(url + "/health").status_code == 200
    assert not wrong, wrong[:3]
    assert m["lmforge_queue_depth"] == 0
    assert m["lmforge_requests_cancelled_total"] <= leaving
    assert m['lmforge_requests_total{endpoint="/v1/completions",status="200"}'] == 200
    assert abs(rss_200 - rss_20) <= 0.10 * rss_20
