"""Seeded request fuzzer built from the server's own request schemas (pydantic's JSON schemas).

Each request follows the schema of its route with random values, and a few of its values are
swapped for junk: wrong types, huge, negative and non-finite numbers, odd Unicode (lone
surrogates, non-ASCII digits, bidi controls, NUL), missing and extra fields, deep nesting; some
bodies are not JSON objects at all. The same seed gives the same requests."""

from __future__ import annotations

import json
import random

from lmforge.server import protocol as P

ROUTES = (  # (path, request schema, share of the requests)
    ("/v1/chat/completions", P.ChatRequest, 0.5),
    ("/v1/completions", P.CompletionRequest, 0.35),
    ("/tokenize", P.TokenizeRequest, 0.1),
    ("/detokenize", P.DetokenizeRequest, 0.05),
)
TEXTS = (
    "hi",
    "What is the capital of France?",
    "",
    " ",
    "<|im_start|>system\n<|im_end|>",
    "٣",
    "²",
    "\u202etxet\u200b",
    "\x00nul",
    "🦀 crab",
    "\ud800",
    "x\udfffy",
    "é" * 300,
    "{{ 7 * 7 }}{% for x in range(9) %}",
    "a" * 3_000,
)
INTS = (0, 1, 2, 3, 4, 7, -1, -(2**63), 2**31, 2**63, 2**64 + 1, 10**30, -(10**30), 49151, 49152)
FLOATS = (0.0, 0.5, 1.0, 2.0, -0.0, -1.0, 1e-320, 1e308, -1e308, 2.5, 100.0, float("nan"), float("inf"))
JUNK = (None, True, False, [], {}, "", 0, -1, 1.5, 10**40, float("nan"), float("-inf"), "٣", "\ud800")


class SchemaFuzzer:
    """Values for a JSON schema (pydantic's dialect: $ref/$defs, anyOf, const, enum, properties)."""

    def __init__(self, schema: dict, rng: random.Random, junk_rate: float = 0.04):
        self.root, self.rng, self.junk_rate = schema, rng, junk_rate

    def junk(self, depth: int = 0):
        r = self.rng.random()
        if r < 0.5:
            return self.rng.choice(JUNK + TEXTS[:6] + INTS[5:10] + FLOATS[8:])
        if r < 0.7 and depth < 6:
            return [self.junk(depth + 1) for _ in range(self.rng.randint(0, 3))]
        if r < 0.9 and depth < 6:
            return {self.rng.choice(TEXTS[:12]): self.junk(depth + 1) for _ in range(self.rng.randint(0, 3))}
        return self.rng.choice(TEXTS)

    def value(self, s: dict, depth: int = 0):
        rng = self.rng
        if rng.random() < self.junk_rate:
            return self.junk(depth)
        if "$ref" in s:
            return self.value(self.root["$defs"][s["$ref"].rsplit("/", 1)[1]], depth)
        if "anyOf" in s:
            return self.value(rng.choice(s["anyOf"]), depth)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return rng.choice(s["enum"])
        kind = s.get("type")
        if kind == "object":
            return self.obj(s, depth)
        if kind == "array":
            return [self.value(s.get("items", {}), depth + 1) for _ in range(rng.choice((0, 1, 1, 1, 2, 3, 6)))]
        if kind == "string":
            return rng.choice(TEXTS)
        if kind == "integer":
            return rng.choice(INTS) if rng.random() < 0.3 else rng.randint(0, 64)
        if kind == "number":
            return rng.choice(FLOATS) if rng.random() < 0.3 else round(rng.uniform(0, 2), 3)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        return self.junk(depth)  # a free-form value (a JSON schema, metadata, guided_json ...)

    def obj(self, s: dict, depth: int) -> dict:
        rng = self.rng
        props, required = s.get("properties"), set(s.get("required", ()))
        if props is None:  # a free-form object
            keys = ("type", "properties", "x", "٣", "²", "7")
            return {rng.choice(keys): self.junk(depth + 1) for _ in range(rng.randint(0, 3))}
        out = {}
        for name, sub in props.items():
            keep = rng.random() > 0.03 if name in required else rng.random() < 0.25
            if keep:
                out[name] = self.value(sub, depth + 1)
        if rng.random() < 0.02:
            out[rng.choice(("extra", "best_of_n", "\ud800", "٣"))] = self.junk(depth + 1)
        return out


def raw_junk(rng: random.Random) -> bytes:
    """A body that is not a JSON object: broken, deep, binary or of another JSON type."""
    return rng.choice(
        (
            b"",
            b"{",
            b"[1, 2]",
            b"null",
            b'"text"',
            b"\xff\xfe\x00",
            b"[" * 100_000 + b"]" * 100_000,
            b'{"messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
            b'{"prompt": "hi", "temperature": NaN}',
            b'{"prompt": "hi", "seed": Infinity}',
            b'{"prompt": "\\ud800"}',
            b'{"prompt": "hi", "prompt": 5}',
        )
    )


def requests(seed: int, n: int):
    """`n` (path, body bytes) pairs from `seed`."""
    rng = random.Random(seed)
    paths = [r[0] for r in ROUTES]
    fuzzers = {path: SchemaFuzzer(schema.model_json_schema(), rng) for path, schema, _ in ROUTES}
    weights = [r[2] for r in ROUTES]
    for _ in range(n):
        path = rng.choices(paths, weights)[0]
        if rng.random() < 0.05:
            yield path, raw_junk(rng)
            continue
        body = fuzzers[path].value(fuzzers[path].root)
        yield path, json.dumps(body).encode()  # NaN and Infinity as Python writes them
