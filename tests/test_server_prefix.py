"""The server's prompt-prefix KV cache (issue 13, item 3): the block store against a plain model
of it (LRU order, the byte budget, keys that are the tokens themselves); at the scheduler, a
prompt that reuses cached blocks gets the logits and KV a fresh prefill gives (pool and lane); and
through a real `lmforge serve`, a 6-turn chat and 4 clients sharing a long system prompt get the
replies `Model.chat` gives and a server with `--prefix-cache-mb 0` gives, while /metrics shows
the reuse."""

from __future__ import annotations

import random
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from lmforge.server.prefix import PrefixStore
from tests.test_errors import assert_user_error, run_cli
from tests.test_server import NAME, Server

# ---- the store against a plain model of it -------------------------------------------------------


class ModelStore:
    """What PrefixStore should hold: {whole-block token prefix: value}, least recently used first."""

    def __init__(self, budget_blocks: int, block: int):
        self.budget, self.block = budget_blocks, block
        self.blocks: OrderedDict[tuple, int] = OrderedDict()

    def path(self, tokens) -> list[tuple]:
        out = []
        for end in range(self.block, len(tokens) + 1, self.block):
            if tuple(tokens[:end]) not in self.blocks:
                break
            out.append(tuple(tokens[:end]))
        return out

    def touch(self, path) -> None:
        for key in reversed(path):
            self.blocks.move_to_end(key)

    def lookup(self, tokens) -> list[int]:
        path = self.path(tokens)
        self.touch(path)
        return [self.blocks[k] for k in path]

    def insert(self, tokens, values) -> None:
        path = self.path(tokens)
        self.touch(path)
        for end in range((len(path) + 1) * self.block, len(tokens) + 1, self.block):
            if len(path) + 1 > self.budget:
                break
            while len(self.blocks) + 1 > self.budget:
                self.blocks.popitem(last=False)
            path.append(tuple(tokens[:end]))
            self.blocks[path[-1]] = next(values)
        self.touch(path)


def stored_prefixes(store: PrefixStore) -> list[tuple]:
    """Every block's whole token prefix, least recently used first."""
    out = []
    for node in store.lru.values():
        parts = []
        while node is not None:
            parts.insert(0, node.key[1])
            node = node.parent
        out.append(sum(parts, ()))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_store_matches_a_plain_model(seed):
    """Random inserts and lookups of prompts over a 3-token alphabet (so prefixes share blocks and
    differ deep inside them): the same blocks in the same LRU order as the model, every block's
    KV the one written for that exact prefix, the byte budget never exceeded."""
    rng = random.Random(seed)
    block, budget_blocks = 4, rng.choice([1, 3, 8, 20])
    per_block = 2 * 2 * block * 2 * 4  # (2 * n_layers, kv_heads, block, head_dim) float32
    store, model = PrefixStore(budget_blocks * per_block, block), ModelStore(budget_blocks, block)
    counter = iter(range(1, 10**9))
    written = {}  # value -> the prefix it was written for

    def read_for(tokens):
        def read(start, stop):
            value = next(counter)
            written[value] = tuple(tokens[:stop])
            return np.full((2, 2, stop - start, 2), value, dtype=np.float32)

        return read

    model_values = iter(range(1, 10**9))  # the store asks for exactly the blocks the model adds, in order
    for step in range(400):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 8 * block))]
        if rng.random() < 0.5:
            store.insert(tokens, read_for(tokens))
            model.insert(tokens, model_values)
        else:
            n, blocks = store.lookup(tokens)
            want = model.lookup(tokens)
            assert n == len(want) * block and len(blocks) == len(want), step
            for i, b in enumerate(blocks):
                assert b.shape == (2, 2, block, 2)
                assert written[int(b[0, 0, 0, 0])] == tuple(tokens[: (i + 1) * block]), "a block of another prefix"
        assert store.nbytes <= store.budget
        assert stored_prefixes(store) == list(model.blocks), step
        assert store.match(tokens) == len(model.path(tokens)) * block
    assert len(store.nodes) == len(model.blocks) > 0


class Colliding(int):
    """A token whose hash is always 0: every tuple of them has the same hash."""

    def __hash__(self):
        return 0


def test_store_keys_are_the_tokens_not_their_hash():
    store = PrefixStore(1 << 20, block=4)
    first, second = [Colliding(t) for t in (1, 2, 3, 4)], [Colliding(t) for t in (4, 3, 2, 1)]
    assert hash(tuple(first)) == hash(tuple(second))
    store.insert(first, lambda a, b: np.full((2, 1, b - a, 1), 1.0))
    assert store.lookup(second) == (0, [])
    store.insert(second, lambda a, b: np.full((2, 1, b - a, 1), 2.0))
    (n1, (b1,)), (n2, (b2,)) = store.lookup(first), store.lookup(second)
    assert n1 == n2 == 4 and b1[0, 0, 0, 0] == 1.0 and b2[0, 0, 0, 0] == 2.0
    assert store.lookup([Colliding(t) for t in (1, 2, 3, 5)]) == (0, [])


# ---- the scheduler: reused prefixes give a fresh prefill's logits and KV -------------------------


class Recorder:
    """The engine, with every one-row prefill's logits and resulting KV recorded."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def prefill(self, cache, token_ids):
        logits = self.engine.prefill(cache, token_ids)
        if cache.batch_size == 1:
            n = int(cache.lengths[0])
            kv = [a[cache.start, :, :n].copy() for a in cache.pool.arrays]
            self.calls.append((n - len(token_ids[0]), logits[0].copy(), kv))
        return logits


def _serve_alone(sched, engine, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of `prompt` through `sched`, stepped by hand until it finishes."""
    from lmforge.sampling import SamplingParams
    from lmforge.server.batching import Handle

    got = []
    h = Handle(None, prompt, SamplingParams(max_tokens=n), (), engine.vocab_size, got.append)
    sched.waiting.append(h)
    while not h.done:
        sched.step()
    return [d.token for d in got]


def _fresh(engine, prompt):
    cache = engine.new_cache(1, len(prompt))
    logits = engine.prefill(cache, [prompt])[0]
    return logits, [b.numpy()[0, :, : len(prompt)] for b in cache.buffers]


def test_reused_prefix_gives_a_fresh_prefills_logits_and_kv(reference):
    """On the default model's cpu-int4 folder: prompts that share blocks with earlier ones, short
    (a one-row prefill in a pool row) and long (the lane, in chunks, over the cached blocks), get
    logits and KV within 1e-5 of a fresh prefill of the whole prompt, and each greedy reply equals
    the prompt generated alone."""
    from lmforge.generate import greedy_tokens
    from lmforge.server.batching import BatchScheduler

    engine = Recorder(reference.engine)
    rng = np.random.default_rng(1)
    base = rng.integers(100, 40000, 700).tolist()
    # (prompt, max tokens): the long ones' sequences do not fit a pool row (256 positions): the lane
    cases = [(base[:100], 6), (base[:90] + [11, 12, 13, 14, 15], 6), (base, 6), (base[:650] + [7] * 30, 6)]
    sched = BatchScheduler(engine, max_batch=2, kv_budget_bytes=(2 * 256 + 1024) * engine.kv_bytes_per_position)
    assert sched.budget.pool_capacity == 256
    reused = []
    for prompt, n in cases:
        engine.calls.clear()
        tokens = _serve_alone(sched, engine, prompt, n)
        past, logits, kv = engine.calls[0]
        reused.append(past)
        want_logits, want_kv = _fresh(reference.engine, prompt)
        np.testing.assert_allclose(engine.calls[-1][1], want_logits, rtol=0, atol=1e-5)
        for got_kv, want in zip(engine.calls[-1][2], want_kv):
            np.testing.assert_allclose(got_kv, want, rtol=0, atol=1e-5)
        assert tokens == greedy_tokens(reference.engine, prompt, n)
    # none; 2 blocks of the first (its third reaches past the second's prompt less two tokens);
    # the first's 3 blocks; 20 blocks of the third (640 of the 650 tokens they share)
    assert reused == [0, 64, 96, 640]
    assert sched.prefix.nbytes == len(sched.prefix.nodes) * 32 * engine.kv_bytes_per_position


def test_reuse_ends_its_pass_as_one_pass_would(reference):
    """ONNX Runtime computes the last query of a pass of 128j + 1 tokens as a decode step does
    (logits ~0.5 apart on the default model): a prompt reuses fewer blocks where the rest would
    end unlike one pass of the whole prompt, so the logits still equal a fresh prefill's (1e-5)."""
    from lmforge.server.batching import BatchScheduler

    engine = Recorder(reference.engine)
    base = np.random.default_rng(3).integers(100, 40000, 500).tolist()
    sched = BatchScheduler(engine, max_batch=2)
    _serve_alone(sched, engine, base[:300], 2)  # stores 9 blocks (288 tokens)
    # 321 tokens: reusing 288 or 192 leaves 33 or 129 (a lone last query, unlike one pass of 321)
    # -> 160 where it shares 200; 385 = 3 * 128 + 1 ends on a lone query: the rest must too -> 256
    for prompt, past in ((base[:200] + base[300:421], 160), (base[:385], 256), (base[:330], 320)):
        engine.calls.clear()
        _serve_alone(sched, engine, prompt, 2)
        assert engine.calls[0][0] == past
        np.testing.assert_allclose(engine.calls[0][1], _fresh(reference.engine, prompt)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gemma3"])
def test_float_forms_reuse_the_reply_too(arch, tiny_factory, tmp_path):
    """On a float ONNX form (decoded KV equals a prefill's to float rounding) a sequence stores its
    reply's blocks as it leaves: the next turn reuses them, with a fresh prefill's logits and KV
    (1e-5) and the greedy tokens of the prompt alone; five architectures."""
    from lmforge.export.convert import convert
    from lmforge.generate import greedy_tokens
    from lmforge.runtime.ort import OrtEngine
    from lmforge.server.batching import BatchScheduler

    real = OrtEngine(convert(tiny_factory((arch, "float32", False, None)), tmp_path / "m", progress=False))
    assert real.exact_verify
    engine = Recorder(real)
    sched = BatchScheduler(engine, max_batch=2)
    first = np.random.default_rng(2).integers(3, real.vocab_size, 70).tolist()
    reply = _serve_alone(sched, engine, first, 40)  # 70 + 39 positions in its row as it leaves: 3 blocks
    second = first + reply + [5, 6, 7, 8, 9, 10]
    engine.calls.clear()
    assert _serve_alone(sched, engine, second, 8) == greedy_tokens(real, second, 8)
    past, logits, kv = engine.calls[0]
    assert past == 96  # past the first prompt's 70 tokens: 26 of the reply's came from the cache
    want_logits, want_kv = _fresh(real, second)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-5)
    for got_kv, want in zip(kv, want_kv):
        np.testing.assert_allclose(got_kv, want, rtol=0, atol=1e-5)


# ---- a real server -----------------------------------------------------------------------------

SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one or two short sentences. The bakery "
    "opens at seven, closes at six, sells bread, cakes and coffee, and takes orders by phone."
)
TURNS = [
    "What time do you open?",
    "And when do you close?",
    "What did I ask you first?",
    "Do you sell coffee?",
    "Can I order by phone?",
    "Summarize what you told me.",
]
RULES = " ".join(f"Rule {i}: answer question {i} about the {w} politely." for i, w in enumerate(["map"] * 40))


@pytest.fixture(scope="module")
def server_off(int4_folder, tmp_path_factory):
    """The `server` fixture's server with the prefix cache off."""
    flags = ("--name", NAME, "--max-batch", 4, "--threads", 2, "--prefix-cache-mb", 0)
    s = Server(int4_folder, *flags, log=tmp_path_factory.mktemp("serve") / "serve-off.log")
    yield s
    s.stop()


def _chat(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _prefix_metrics(server) -> tuple[float, float, float, float]:
    m = server.metrics()
    return tuple(
        m[f"lmforge_prefix_cache_{k}"] for k in ("lookups_total", "hits_total", "reused_tokens_total", "bytes")
    )


def test_six_turn_chat_reuses_the_conversation_and_replies_alike(server, server_off, reference):
    messages = [{"role": "system", "content": SYSTEM}]
    for turn, question in enumerate(TURNS):
        messages.append({"role": "user", "content": question})
        before = _prefix_metrics(server)
        on, off = _chat(server.url, messages, 24), _chat(server_off.url, messages, 24)
        after = _prefix_metrics(server)
        assert on == off == reference.chat(messages, max_tokens=24), turn
        assert after[0] == before[0] + 1
        if turn:  # the previous turn's prompt is cached: at least its whole blocks but the last
            n_prev = len(reference.prompt_ids(messages=messages[:-2]))
            assert after[1] == before[1] + 1 and after[2] - before[2] >= n_prev // 32 * 32 - 32, turn
        assert 0 < after[3] <= 256 * 2**20
        messages.append({"role": "assistant", "content": on})
    assert _prefix_metrics(server_off) == (0, 0, 0, 0)


def test_clients_sharing_a_long_system_prompt_reuse_it(server, server_off, reference):
    """Four concurrent clients, one ~500-token system prompt (past the 256-token prefill chunk: the
    first prefills it in the lane, the others reuse its blocks)."""
    conversations = [
        [{"role": "system", "content": RULES}, {"role": "user", "content": q}]
        for q in ("What is rule 3?", "Name two rules.", "How many rules are there?", "Say hello.")
    ]
    assert len(reference.prompt_ids(messages=conversations[0])) > 256
    want = [reference.chat(c, max_tokens=16) for c in conversations]
    before = _prefix_metrics(server)
    with ThreadPoolExecutor(4) as pool:
        on = list(pool.map(lambda c: _chat(server.url, c, 16), conversations))
        off = list(pool.map(lambda c: _chat(server_off.url, c, 16), conversations))
    after = _prefix_metrics(server)
    assert on == want and off == want
    assert after[0] - before[0] == 4 and after[1] - before[1] == 3 and after[2] - before[2] >= 3 * 480


def test_prefix_cache_budget_must_not_be_negative():
    assert_user_error(run_cli("serve", NAME, "--prefix-cache-mb", "-1"), "--prefix-cache-mb")


# ---- one sequence at a time (llama.cpp, or ONNX Runtime with --max-batch 1) ----------------------


def _serve_in_turn(sched, model, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt through `sched` (started), one after the other: the replies' texts."""
    import queue

    from lmforge.sampling import SamplingParams
    from lmforge.server.batching import Handle

    texts = []
    for prompt in prompts:
        out: queue.SimpleQueue = queue.SimpleQueue()
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        ids = model.prompt_ids(prompt, raw=True)
        assert sched.submit(Handle(model.tokenizer, ids, params, model.eos_token_ids, model.engine.vocab_size, out.put))
        pieces = [out.get(timeout=60)]
        while pieces[-1].finish_reason is None:
            pieces.append(out.get(timeout=60))
        texts.append("".join(d.text for d in pieces))
    return texts


@pytest.mark.parametrize("engine", ["llamacpp", "ort"])
def test_serial_scheduler_starts_from_the_last_sequences_cache(engine, default_model_path, int4_folder):
    """A follow-up prompt starts from the previous sequence's cache and gets the reply a fresh
    model gives; with a budget below the kept cache's size (ONNX Runtime) nothing is reused."""
    from lmforge.model import load
    from lmforge.server.batching import SerialScheduler
    from lmforge.server.metrics import Metrics

    if engine == "llamacpp":
        pytest.importorskip("llama_cpp")
    model = load(default_model_path if engine == "llamacpp" else int4_folder, engine=engine, threads=1)
    fresh = load(default_model_path if engine == "llamacpp" else int4_folder, engine=engine, prefix_reuse=False)
    story = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    prompts = [story, story + " every morning walked to the harbor and", "The capital of France is"]
    want = [fresh.generate(p, raw=True, max_tokens=12) for p in prompts]
    budgets = [None, 1] if engine == "ort" else [None]
    for budget in budgets:
        metrics = Metrics()
        sched = SerialScheduler(model.engine, metrics, prefix_cache_bytes=budget).start()
        try:
            assert _serve_in_turn(sched, model, prompts, 12) == want
        finally:
            sched.close()
        reused = metrics.prefix_reused
        assert metrics.prefix_lookups == 3 and (reused > 0 if budget is None else reused == 0), (budget, reused)
