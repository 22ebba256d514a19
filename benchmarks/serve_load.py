"""`lmforge serve` (continuous batching, cpu-int4 of the default model) against llama.cpp's own
`llama-server` (parallel slots, continuous batching; built by benchmarks/llama_server.py from
the llama.cpp that llama-cpp-python vendors) and llama-cpp-python's server (one request at a
time), all on the same Q4_1 GGUF / its exact int4 transcode, all with --threads threads.

Workloads: N concurrent streaming clients, each sending chat requests back to back; every reply
is exactly --tokens tokens (EOS banned with logit_bias) at temperature 0.7. "short": a one-line
question; "mixed": half the clients send ~1,000-token prompts (each one different from its first
words, so no server reuses a cached prefix). Reported per cell: aggregate streamed tokens/s, TTFT
p50/p99 and inter-token latency (gaps between streamed chunks) p50/p99. Servers are measured
interleaved, --rounds rounds in alternating order; each cell keeps its best round (noise on a
shared machine only slows). llama-cpp-python's server serves one request at a time: it runs the
short workload up to 8 clients only.

    python benchmarks/serve_load.py [--clients 1,8,16,32] [--mixed 16] [--tokens 64] [--rounds 2]

Writes benchmarks/results/serve_load.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from llama_server import find_or_build  # noqa: E402  (benchmarks/ is on the path of a script run from it)
from results_io import save  # noqa: E402

QUESTIONS = [
    "Tell me a story about a dragon.",
    "How do I bake bread at home?",
    "What is the history of the Roman Empire?",
    "Explain how a rainbow forms.",
    "Write a poem about the sea.",
    "What should I pack for a hiking trip?",
    "Why is the sky blue?",
    "Give me tips for learning the piano.",
]
EOS_BIAS = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>
WORDS = (
    "river mountain city garden winter summer music letter window forest market harbor castle engine "
    "paper silver yellow quiet sudden gentle ancient modern simple careful bright distant narrow"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def long_prompt(i: int, words: int = 720) -> str:
    """A ~1,000-token request (SmolLM2's tokenizer) that differs from its first words on."""
    rng = random.Random(i)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Note {i}: summarize this text. {body}"


READY = {"llama-cpp-python": "/v1/models"}  # the others answer /health once the model is loaded


def start(name: str, cmd: list[str], port: int, env: dict, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}); see {log_dir / (name + '.log')}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{READY.get(name, '/health')}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not start")


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed chat completion of `body` (stream set here): {"t0": when it was sent, "times":
    when each chunk with content arrived, "text", "finish" (its finish reason), "usage" (when
    the body asks for it)}."""
    t0 = time.perf_counter()
    out = {"t0": t0, "times": [], "text": "", "finish": None, "usage": None}
    async with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            out["usage"] = chunk.get("usage") or out["usage"]
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                out["times"].append(time.perf_counter())
                out["text"] += choices[0]["delta"]["content"]
            out["finish"] = choices[0].get("finish_reason") or out["finish"]
    return out


async def one_request(client: httpx.AsyncClient, url: str, content: str, tokens: int) -> tuple[float, list[float]]:
    """(time to first token, gaps between streamed chunks) of one streamed chat reply of exactly
    `tokens` tokens."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "temperature": 0.7,
        "logit_bias": EOS_BIAS,
    }
    r = await stream_chat(client, url, body)
    times, finish = r["times"], r["finish"]
    if finish != "length" or not times:
        raise RuntimeError(f"{url}: a reply ended with {finish!r} after {len(times)} chunks")
    return times[0] - r["t0"], [b - a for a, b in zip(times, times[1:])]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def load(url: str, clients: int, tokens: int, per_client: int, mixed: bool) -> dict:
    def content(i: int, k: int) -> str:
        if mixed and i % 2:
            return long_prompt(1000 * i + k + int(time.time() * 1000) % 100000)
        return QUESTIONS[(i + k) % len(QUESTIONS)]

    async def client_loop(i: int, client: httpx.AsyncClient) -> list:
        return [await one_request(client, url, content(i, k), tokens) for k in range(per_client)]

    # a connection per request: llama-server closes kept-alive connections after a few requests
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        await one_request(client, url, QUESTIONS[0], 8)  # warm-up
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client_loop(i, client) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = [t for t, _ in results]
    gaps = [g for _, gs in results for g in gs]
    return {
        "clients": clients,
        "stream_tps": statistics.median(len(gs) / sum(gs) for _, gs in results if gs),  # one reply's own rate
        "requests": len(results),
        "tokens_per_s": len(results) * tokens / wall,
        "ttft_p50": pct(ttfts, 50),
        "ttft_p99": pct(ttfts, 99),
        "itl_p50": pct(gaps, 50),
        "itl_p99": pct(gaps, 99),
        "wall_s": wall,
    }


def servers(args, levels: list[int]) -> tuple[dict, dict, dict]:
    """(commands, environments, ports) of the servers to compare."""
    from lmforge.model import cached_onnx
    from lmforge.registry import known_model_path

    gguf = known_model_path("smollm2-135m")
    int4 = cached_onnx("smollm2-135m", "cpu-int4", progress=False)
    slots, t = str(max(levels)), str(args.threads)
    names = ["lmforge", "llama-server", "llama-server PASSIVE", "llama-cpp-python"]
    ports = {name: free_port() for name in names}
    cmds = {
        "lmforge": [sys.executable, "-m", "lmforge", "serve", str(int4), "--threads", t, "--max-batch", slots],
        "llama-cpp-python": [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", t]
        + ["--n_threads_batch", t, "--n_ctx", "4096", "--verbose", "False", "--interrupt_requests", "False"],
    }
    cmds["lmforge"] += ["--name", "m", "--port", str(ports["lmforge"])]
    cmds["llama-cpp-python"] += ["--model_alias", "m", "--port", str(ports["llama-cpp-python"])]
    binary = None if args.no_llama_server else find_or_build()
    if binary is not None:
        # one unified KV cache of ctx cells shared by the slots (as lmforge's budget is shared)
        ctx = str(max(8192, max(levels) * 1280 if args.mixed else max(levels) * 256))
        cmds["llama-server"] = [str(binary), "-m", str(gguf), "-t", t, "-tb", t, "-np", slots, "-c", ctx]
        cmds["llama-server PASSIVE"] = list(cmds["llama-server"])
        for name in ("llama-server", "llama-server PASSIVE"):
            cmds[name] += ["--kv-unified", "--port", str(ports[name]), "--alias", "m"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    envs = {name: env for name in cmds}
    # llama.cpp's OpenMP threads spin by default: faster on a quiet machine, collapsing when anything
    # else runs; PASSIVE makes them sleep (what lmforge's ONNX Runtime threads do)
    envs["llama-server PASSIVE"] = {**env, "OMP_WAIT_POLICY": "PASSIVE"}
    keep = [n for n in names if n in cmds and (n == "lmforge" or n in args.peers.split(","))]
    return {n: cmds[n] for n in keep}, envs, ports


def cells(names: list[str], levels: list[int], mixed: int) -> list[tuple[str, int, bool]]:
    """(server, clients, mixed) of every measurement in one round."""
    out = []
    for c in levels:
        out += [(n, c, False) for n in names if n != "llama-cpp-python" or c <= 8]
    if mixed:
        out += [(n, mixed, True) for n in names if n != "llama-cpp-python"]
    return out


def measure(args, levels: list[int]) -> tuple[dict, dict, list[float]]:
    """Every cell's rounds, the commands, and `lmforge bench`'s decode rate of the same folder
    (run after each round's 1-client cells, the servers idle)."""
    from lmforge.model import cached_onnx

    cmds, envs, ports = servers(args, levels)
    results: dict[tuple[str, int, bool], list[dict]] = {}
    bench: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        try:
            for name, cmd in cmds.items():
                procs[name] = start(name, cmd, ports[name], envs[name], Path(tmp))
            plan = cells(list(cmds), levels, args.mixed)
            for rnd in range(args.rounds):
                groups = {}
                for cell in plan:
                    groups.setdefault(cell[1:], []).append(cell)
                for group in groups.values():
                    for name, c, mixed in group if rnd % 2 == 0 else group[::-1]:  # alternate the order
                        per_client = max(2, -(-args.requests // c))
                        url = f"http://127.0.0.1:{ports[name]}"
                        r = asyncio.run(load(url, c, args.tokens, per_client, mixed))
                        results.setdefault((name, c, mixed), []).append(r)
                        print(
                            f"round {rnd + 1} {name:<16} {c:>2} clients{' mixed' if mixed else '      '}: "
                            f"{r['tokens_per_s']:6.1f} tok/s, TTFT p50 {r['ttft_p50'] * 1000:5.0f} "
                            f"p99 {r['ttft_p99'] * 1000:5.0f} ms, ITL p50 {r['itl_p50'] * 1000:4.0f} "
                            f"p99 {r['itl_p99'] * 1000:5.0f} ms",
                            flush=True,
                        )
                    if group[0][1:] == (1, False):
                        bench.append(bench_decode(args, cached_onnx("smollm2-135m", "cpu-int4", progress=False)))
                        print(f"round {rnd + 1} lmforge bench decode: {bench[-1]:6.1f} tok/s", flush=True)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
    return results, cmds, bench


def bench_decode(args, folder) -> float:
    """`lmforge bench`'s decode tok/s on the same folder and threads, in its own process."""
    cmd = [sys.executable, "-m", "lmforge", "bench", str(folder), "--threads", str(args.threads)]
    cmd += ["--prompt-tokens", "32", "--gen-tokens", str(args.tokens), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)[0]["decode_mean"]


def report(args, levels: list[int], results: dict, cmds: dict, bench: list[float]) -> None:
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    peers = [n for n in cmds if n.startswith("llama-server")] or ["llama-cpp-python"]

    def peer(c: int, mixed: bool) -> dict | None:
        rows = [best[(n, c, mixed)] for n in peers if (n, c, mixed) in best]
        return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None

    lines = [
        f"# Serving: SmolLM2-135M, {args.tokens}-token streamed chat replies, {args.threads} threads",
        "",
        f"`python benchmarks/serve_load.py --clients {args.clients} --mixed {args.mixed} --tokens {args.tokens} "
        f"--rounds {args.rounds} --threads {args.threads}`. lmforge serve: cpu-int4, `--max-batch {max(levels)}`; "
        f"llama-server: the Q4_1 GGUF, `-t {args.threads} -np {max(levels)} --kv-unified`, with its default "
        "OpenMP wait policy and with `OMP_WAIT_POLICY=PASSIVE`; llama-cpp-python's server: the same GGUF, "
        "one request at a time (short "
        f"workload, up to 8 clients). Temperature 0.7, EOS banned (every reply exactly {args.tokens} tokens); "
        "mixed: half the clients send ~1,000-token prompts. Interleaved, best of "
        f"{args.rounds} rounds per cell; clients and servers share the machine's cores. The last column is the "
        f"server's tok/s over the better of {' / '.join(peers)} in that cell.",
        "",
        "| workload | clients | server | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | vs peer |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, c, mixed), r in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][1], list(cmds).index(kv[0][0]))):
        ref = peer(c, mixed)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {'mixed' if mixed else 'short'} | {c} | {name} | {r['tokens_per_s']:.1f} | "
            f"{r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} | "
            f"{r['itl_p50'] * 1000:.1f} | {r['itl_p99'] * 1000:.1f} | {ratio} |"
        )
    single = best.get(("lmforge", 1, False))
    if single and bench:
        lines += [
            "",
            f"Single stream: lmforge's server streamed a reply at {single['stream_tps']:.1f} tok/s (median per "
            f"reply, best round, 1 client; sampling at temperature 0.7 included); `lmforge bench` decoded the same "
            f"folder at {max(bench):.1f} tok/s (greedy, best of {len(bench)}, run between the rounds' 1-client "
            f"cells): {single['stream_tps'] / max(bench):.2f}x.",
        ]
    data = [{"server": n, "mixed": m, **r} for (n, c, m), r in best.items()]
    if bench:
        data.append({"server": "lmforge bench", "decode_tok_s": bench})
    print()
    save("serve_load", "\n".join(lines), data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,8,16,32")
    ap.add_argument("--mixed", type=int, default=16, help="clients of the mixed workload (0: none)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4, help="requests per load level (at least 2 per client)")
    ap.add_argument("--no-llama-server", action="store_true", help="leave llama.cpp's llama-server out")
    ap.add_argument(
        "--peers",
        default="llama-server,llama-server PASSIVE,llama-cpp-python",
        help="the peers to run, comma-separated (on a loaded machine spinning llama-server crawls: leave it out)",
    )
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    results, cmds, bench = measure(args, levels)
    report(args, levels, results, cmds, bench)


if __name__ == "__main__":
    main()
