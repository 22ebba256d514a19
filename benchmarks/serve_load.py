"""`lmforge serve` (continuous batching, cpu-int4 of the default model) against llama-cpp-python's
OpenAI server (`python -m llama_cpp.server`, one request at a time) on the same Q4_1 GGUF.

1, 4 and 8 concurrent streaming clients; each sends requests back to back, every request a
/v1/completions stream of exactly --tokens tokens (EOS banned with logit_bias, greedy). Every
server runs with --threads threads. llama.cpp runs twice: with OMP_WAIT_POLICY=PASSIVE (what
keeps it from collapsing when anything else runs) and with OpenMP's default (spinning; faster
on a quiet machine); lmforge is compared with the better of the two at each load. The servers
are measured interleaved, --rounds times (the best round counts: the machine is shared and noise
only slows). Prints aggregate tokens/s, p50/p95 time to first token, the 8-client / 1-client
throughput ratio of each server, and lmforge / best llama.cpp at each load.

    python benchmarks/serve_load.py [--clients 1,4,8] [--tokens 64] [--rounds 3] [--threads 2]

Needs llama-cpp-python's server extras (sse-starlette, starlette-context, pydantic-settings).
Writes benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from results_io import save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time, in a small village,",
    "The history of the Roman Empire begins",
    "Here is a recipe for a chocolate cake:",
    "The three laws of thermodynamics are",
    "def quicksort(items):",
    "My favourite places to visit in Europe are",
    "The weather today is",
    "A short guide to learning the piano:",
]
EOS_BIAS = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    name: str, cmd: list[str], port: int, env: dict, log_dir: Path, ready: str = "/v1/models"
) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}); see {log_dir / (name + '.log')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not start")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[float, int]:
    """(time to first token, tokens received) of one streamed completion."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": EOS_BIAS,
    }
    t0 = time.perf_counter()
    first, n, finish = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("text"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
            finish = choice.get("finish_reason") or finish
    if finish != "length":
        raise RuntimeError(f"{url}: a request ended with {finish!r} after {n} pieces")
    return first, tokens  # exactly `tokens` tokens (finish_reason "length"); pieces may merge characters


async def load(url: str, clients: int, tokens: int, per_client: int) -> dict:
    async def client_loop(i: int, client: httpx.AsyncClient) -> list[float]:
        return [(await one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], tokens))[0] for k in range(per_client)]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, PROMPTS[0], 8)  # warm-up
        t0 = time.perf_counter()
        ttfts = [t for ts in await asyncio.gather(*(client_loop(i, client) for i in range(clients))) for t in ts]
        wall = time.perf_counter() - t0
    p95 = statistics.quantiles(ttfts, n=20, method="inclusive")[18] if len(ttfts) > 1 else ttfts[0]
    return {
        "clients": clients,
        "requests": len(ttfts),
        "tokens_per_s": clients * per_client * tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": p95,
        "wall_s": wall,
    }


def main():
    from lmforge.model import cached_onnx
    from lmforge.registry import known_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16, help="requests per load level (at least 2 per client)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    gguf = known_model_path("smollm2-135m")
    int4 = cached_onnx("smollm2-135m", "cpu-int4", progress=False)
    peers = {"llama.cpp PASSIVE": "PASSIVE", "llama.cpp default": None}  # OMP_WAIT_POLICY
    ports = {name: free_port() for name in ["lmforge", *peers]}
    cmds = {
        "lmforge": [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(int4),
            "--port",
            str(ports["lmforge"]),
            "--threads",
            str(args.threads),
            "--max-batch",
            str(max(levels)),
            "--name",
            "m",
        ]
    }
    envs = {"lmforge": dict(os.environ)}
    for name, policy in peers.items():
        # --interrupt_requests False: queue concurrent requests (its default cuts the running stream)
        cmds[name] = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(ports[name]),
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            "2048",
            "--model_alias",
            "m",
            "--verbose",
            "False",
            "--interrupt_requests",
            "False",
        ]
        envs[name] = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            envs[name]["OMP_WAIT_POLICY"] = policy
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {
            name: start(name, cmd, ports[name], envs[name], Path(tmp), "/health" if name == "lmforge" else "/v1/models")
            for name, cmd in cmds.items()
        }
        try:
            for rnd in range(args.rounds):
                for c in levels:
                    order = list(cmds)[(rnd + c) % len(cmds) :] + list(cmds)[: (rnd + c) % len(cmds)]
                    for name in order:
                        per_client = max(2, -(-args.requests // c))
                        r = asyncio.run(load(f"http://127.0.0.1:{ports[name]}", c, args.tokens, per_client))
                        results.setdefault((name, c), []).append(r)
                        print(
                            f"round {rnd + 1} {name:<17} {c} clients: {r['tokens_per_s']:6.1f} tok/s, "
                            f"TTFT p50 {r['ttft_p50'] * 1000:5.0f} ms p95 {r['ttft_p95'] * 1000:5.0f} ms",
                            flush=True,
                        )
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    peer = {c: max((best[(n, c)] for n in peers), key=lambda r: r["tokens_per_s"]) for c in levels}
    lo, hi = min(levels), max(levels)
    lines = [
        f"# Serving under load: SmolLM2-135M, {args.tokens}-token streamed completions, {args.threads} threads",
        "",
        f"`python benchmarks/serve_load.py --clients {args.clients} --tokens {args.tokens} --rounds {args.rounds} "
        f"--threads {args.threads}`: lmforge serve (cpu-int4, continuous batching, --max-batch {hi}) and "
        "llama-cpp-python's server (the Q4_1 GGUF, requests queued), the latter with OMP_WAIT_POLICY=PASSIVE and "
        f"with OpenMP's default; measured interleaved, best of {args.rounds} rounds per cell. Every request streams "
        f"exactly {args.tokens} tokens (EOS banned). Clients and servers share the machine's cores; lmforge serve "
        "opens ONNX Runtime without spinning threads (its counterpart of PASSIVE).",
        "",
        "| server | clients | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | vs best llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in levels:
        for name in cmds:
            r = best[(name, c)]
            lines.append(
                f"| {name} | {c} | {r['tokens_per_s']:.1f} | {r['ttft_p50'] * 1000:.0f} | "
                f"{r['ttft_p95'] * 1000:.0f} | {r['tokens_per_s'] / peer[c]['tokens_per_s']:.2f}x |"
            )
    lines.append("")
    for name in cmds:
        ratio = best[(name, hi)]["tokens_per_s"] / best[(name, lo)]["tokens_per_s"]
        lines.append(f"- {name}: {hi}-client / {lo}-client throughput **{ratio:.2f}x**")
    ratio = best[("lmforge", hi)]["tokens_per_s"] / best[("lmforge", lo)]["tokens_per_s"]
    ahead = best[("lmforge", hi)]["tokens_per_s"] / peer[hi]["tokens_per_s"]
    lines += [
        "",
        f"Targets: {hi}-client >= 3x 1-client: {'met' if ratio >= 3 else 'NOT met'} ({ratio:.2f}x); "
        f"ahead of llama-cpp-python's server (its better setting) at {hi} clients: "
        f"{'met' if ahead > 1 else 'NOT met'} ({ahead:.2f}x).",
    ]
    print()
    save("serve_load", "\n".join(lines))


if __name__ == "__main__":
    main()
