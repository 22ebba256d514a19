"""Prompt-prefix reuse in `lmforge serve` (cpu-int4 of the default model): the same server with
its prefix cache on (the default, 256 MiB) and off (`--prefix-cache-mb 0`), each in its own
process, measured in interleaved rounds (the order alternates), greedy.

(i) A 6-turn chat about a passage of Python's documentation (`pydoc_data.topics`): each turn
sends the whole conversation so far, whose replies are the server's own; TTFT per turn. The
conversation starts with the round's number, so no round reuses another's blocks.
(ii) 8 clients sharing a ~1,000-token system prompt (another passage), each sending --requests
questions back to back, replies of exactly --tokens tokens (EOS banned): aggregate streamed tok/s,
TTFT p50/p99. The system prompt is new each round: its first prefill is in every figure.

Every reply of the cache-on server must equal the cache-off server's, token for token.

    python benchmarks/serve_prefix.py [--rounds 3] [--tokens 64] [--clients 8] [--requests 2]

Writes benchmarks/results/serve_prefix.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from results_io import save  # noqa: E402  (benchmarks/ is on the path of a script run from it)
from serve_load import EOS_BIAS, free_port, pct, start, stream_chat  # noqa: E402

TURNS = [
    "What does the for statement iterate over?",
    "When does the else clause of that statement run?",
    "And what happens to it after a break, going back to your first answer?",
    "Can the loop body change the target variable? Use what you said before.",
    "How does this relate to the iterator you mentioned in the first answer?",
    "Summarize our whole conversation in three sentences.",
]
QUESTIONS = [
    "What does a bare raise do?",
    "What is the from clause for?",
    "What is an active exception?",
    "How is __cause__ set?",
    "How is __context__ set?",
    "What does __suppress_context__ do?",
    "Can raise take a class instead of an instance?",
    "What happens when no exception is active?",
    "Give an example of exception chaining.",
    "What does raise ... from None do?",
    "Where is the traceback attached?",
    "What is __traceback__?",
    "Summarize the text in one sentence.",
    "What is a RuntimeError used for here?",
    "Explain implicit chaining.",
    "What is the difference between cause and context?",
]
SERVERS = {"on": [], "off": ["--prefix-cache-mb", "0"]}


def servers(args) -> tuple[dict, dict]:
    """(commands, ports) of the two servers."""
    from lmforge.model import cached_onnx

    folder = cached_onnx("smollm2-135m", args.target, progress=False)
    ports = {name: free_port() for name in SERVERS}
    base = [sys.executable, "-m", "lmforge", "serve", str(folder), "--threads", str(args.threads), "--name", "m"]
    cmds = {
        name: [*base, "--max-batch", str(args.clients), "--port", str(ports[name]), *extra]
        for name, extra in SERVERS.items()
    }
    return cmds, ports


def shared_prompt(url: str, tokens: int = 1000) -> str:
    """The first ~`tokens` tokens of the `raise` and `try` statements' documentation."""
    import pydoc_data.topics as topics

    text = topics.topics["raise"] + "\n" + topics.topics["try"]
    ids = httpx.post(url + "/tokenize", json={"content": text}, timeout=60).json()["tokens"][:tokens]
    return httpx.post(url + "/detokenize", json={"tokens": ids}, timeout=60).json()["content"]


def _ttft(r: dict) -> float:
    if not r["times"]:
        raise RuntimeError(f"an empty reply (finish {r['finish']!r})")
    return r["times"][0] - r["t0"]


async def chat_session(url: str, tag: int, tokens: int) -> list[dict]:
    """The 6-turn chat: per turn its prompt tokens, TTFT and reply."""
    import pydoc_data.topics as topics

    messages = [{"role": "system", "content": f"Session {tag}. Answer from this text.\n" + topics.topics["for"]}]
    turns = []
    async with httpx.AsyncClient(timeout=900) as client:
        for question in TURNS:
            messages.append({"role": "user", "content": question})
            body = {"model": "m", "messages": messages, "max_tokens": tokens, "temperature": 0}
            r = await stream_chat(client, url, {**body, "stream_options": {"include_usage": True}})
            turns.append({"prompt_tokens": r["usage"]["prompt_tokens"], "ttft": _ttft(r), "text": r["text"]})
            messages.append({"role": "assistant", "content": r["text"]})
    return turns


async def shared_load(url: str, system: str, clients: int, per_client: int, tokens: int) -> dict:
    """`clients` concurrent clients, each asking `per_client` questions under `system`."""

    async def client_loop(i: int, client: httpx.AsyncClient) -> list[dict]:
        out = []
        for k in range(per_client):
            question = QUESTIONS[(i * per_client + k) % len(QUESTIONS)]
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            body = {"model": "m", "messages": messages, "max_tokens": tokens, "temperature": 0, "logit_bias": EOS_BIAS}
            out.append(await stream_chat(client, url, body))
        return out

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    flat = [r for rs in replies for r in rs]
    ttfts = [_ttft(r) for r in flat]
    return {
        "tokens_per_s": len(flat) * tokens / wall,
        "ttft_p50": pct(ttfts, 50),
        "ttft_p99": pct(ttfts, 99),
        "wall_s": wall,
        "texts": [r["text"] for r in flat],
    }


def measure(args) -> tuple[dict, dict, dict]:
    """Both workloads on both servers, interleaved: ({server: [chat turns per round]},
    {server: [shared-prompt result per round]}, the cache-on server's prefix metrics)."""
    cmds, ports = servers(args)
    args.load = [os.getloadavg()[0]]
    chats: dict[str, list] = {n: [] for n in cmds}
    shared: dict[str, list] = {n: [] for n in cmds}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        try:
            for name, cmd in cmds.items():
                procs[name] = start(name, cmd, ports[name], dict(os.environ), Path(tmp))
            urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
            doc = shared_prompt(urls["on"])
            for rnd in range(args.rounds):
                order = list(cmds) if rnd % 2 == 0 else list(cmds)[::-1]
                for name in order:
                    turns = asyncio.run(chat_session(urls[name], rnd, args.tokens))
                    chats[name].append(turns)
                    print(
                        f"round {rnd + 1} chat   {name:<3}: TTFT per turn (ms) "
                        + " ".join(f"{t['ttft'] * 1000:5.0f}" for t in turns),
                        flush=True,
                    )
                for name in order:
                    r = asyncio.run(
                        shared_load(urls[name], f"Round {rnd}. {doc}", args.clients, args.requests, args.tokens)
                    )
                    shared[name].append(r)
                    print(
                        f"round {rnd + 1} shared {name:<3}: {r['tokens_per_s']:6.1f} tok/s, TTFT p50 "
                        f"{r['ttft_p50'] * 1000:5.0f} p99 {r['ttft_p99'] * 1000:5.0f} ms",
                        flush=True,
                    )
            args.load.append(os.getloadavg()[0])
            metrics = {
                line.split()[0]: float(line.split()[1])
                for line in httpx.get(urls["on"] + "/metrics").text.splitlines()
                if line.startswith("lmforge_prefix_cache")
            }
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(10)
    return chats, shared, metrics


def report(args, chats: dict, shared: dict, metrics: dict) -> None:
    same_chat = all([t["text"] for t in a] == [t["text"] for t in b] for a, b in zip(chats["on"], chats["off"]))
    same_shared = all(a["texts"] == b["texts"] for a, b in zip(shared["on"], shared["off"]))
    best = {n: [min(r[i]["ttft"] for r in chats[n]) for i in range(len(TURNS))] for n in chats}
    lines = [
        f"# Prompt-prefix reuse in `lmforge serve`: SmolLM2-135M {args.target}, {args.threads} threads",
        "",
        f"`python benchmarks/serve_prefix.py --rounds {args.rounds} --tokens {args.tokens} --clients "
        f"{args.clients} --requests {args.requests} --threads {args.threads}`: the same server with its prefix "
        f"cache on (default, 256 MiB) and off (`--prefix-cache-mb 0`), `--max-batch {args.clients}`, greedy, "
        f"interleaved rounds (order alternating), each figure its best of {args.rounds} rounds; clients and servers "
        f"share the machine's cores (1-minute load average {args.load[0]:.1f} at the start, {args.load[1]:.1f} at "
        "the end).",
        "",
        f"## (i) 6-turn chat (replies up to {args.tokens} tokens; each turn resends the conversation)",
        "",
        "| turn | prompt tokens | TTFT on ms | TTFT off ms | on / off |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for i in range(len(TURNS)):
        n = chats["on"][0][i]["prompt_tokens"]
        on, off = best["on"][i], best["off"][i]
        lines.append(f"| {i + 1} | {n} | {on * 1000:.0f} | {off * 1000:.0f} | {on / off:.2f} |")
    ratio = best["on"][-1] / best["off"][-1]
    lines += [
        "",
        f"Turn 6: TTFT with the cache {ratio:.0%} of without (target <= 25%); replies identical on and off: "
        f"{'yes' if same_chat else 'NO'}.",
        "",
        f"## (ii) {args.clients} clients sharing a ~1,000-token system prompt ({args.requests} requests each, "
        f"{args.tokens}-token replies)",
        "",
        "| prefix cache | tok/s | TTFT p50 ms | TTFT p99 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    top = {
        n: {k: (max if k == "tokens_per_s" else min)(r[k] for r in shared[n]) for k in shared[n][0] if k != "texts"}
        for n in shared
    }
    for n in ("on", "off"):
        r = top[n]
        lines.append(f"| {n} | {r['tokens_per_s']:.1f} | {r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} |")
    lines += [
        "",
        f"On / off: {top['on']['tokens_per_s'] / top['off']['tokens_per_s']:.2f}x tok/s, TTFT p50 "
        f"{top['on']['ttft_p50'] / top['off']['ttft_p50']:.2f}x; replies identical: {'yes' if same_shared else 'NO'}.",
        "",
        "The cache-on server's counters at the end: "
        + ", ".join(f"{k.removeprefix('lmforge_prefix_cache_')} {v:.0f}" for k, v in metrics.items())
        + ".",
    ]
    data = {
        "chat_best_ttft": best,
        "chat_prompt_tokens": [t["prompt_tokens"] for t in chats["on"][0]],
        "turn6_ratio": ratio,
        "shared_best": top,
        "identical": {"chat": same_chat, "shared": same_shared},
        "metrics": metrics,
    }
    print()
    save("serve_prefix" if args.target == "cpu-int4" else f"serve_prefix-{args.target}", "\n".join(lines), data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the shared-prompt workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--target",
        default="cpu-int4",
        help="the form served (cpu-fp32: decoded KV equals a prefill's, so replies are reused too)",
    )
    args = ap.parse_args()
    report(args, *measure(args))


if __name__ == "__main__":
    main()
