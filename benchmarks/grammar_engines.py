"""Grammar engines for constrained decoding, measured side by side: llguidance, xgrammar, outlines-core.

For each engine and each vocabulary:
- vocabulary setup: the engine's tokenizer object (LLTokenizer, TokenizerInfo, Vocabulary);
- a realistic JSON schema (nested object, strings with maxLength/pattern, integers with ranges, an enum,
  an array, a boolean): compile until the first token mask is computed (llguidance compiles lazily, so
  the first mask is part of its compile), then the walk of a valid document token by token, a fresh
  matcher for each of --walks walks, timing every full next-token mask (a bitmask of the vocabulary;
  median, mean and p99) and checking that each of the document's tokens is allowed before it is consumed;
- a 200-property schema (strings with maxLength, integers with min/max, enums, booleans, nested
  objects; every tenth property optional): first compile (cold) and the same schema again (xgrammar
  hits its compiler cache; llguidance and outlines-core have none and compile again);
- features (once, on the real vocabulary): what their APIs offer and whether each really works.
Vocabularies: SmolLM2's tokenizer (49,152 tokens), and a synthetic 150,000-token vocabulary (no larger
tokenizer can be downloaded here): those 49,152 tokens plus 100,848 word pieces of WikiText-2 (test) and
Python's pydoc topics as raw bytes, with a greedy longest-match tokenizer for the document.
Every (engine, vocabulary) runs in its own process, --rounds rounds interleaved (the machine is shared);
figures are the median over rounds, with the range (min-max) beside it. A compile over 5 s runs in
the first round only.

    pip install xgrammar outlines-core   # the two peers (not in the dev extra: xgrammar pulls triton)
    python benchmarks/grammar_engines.py [--rounds 3] [--threads 2] [--walks 10] [--timeout 240]

Writes benchmarks/results/grammar_engines.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from results_io import WIKITEXT, save  # noqa: E402  (benchmarks/ is on the path of a script run from it)

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("llguidance", "xgrammar", "outlines-core")
PACKAGES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}
SYNTHETIC_SIZE = 150_000
SLOW_S = 5.0  # a compile slower than this is measured in the first round only

# ---- grammars and texts -------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "01234"},
    "tags": ["mathematics", "analytical engine", "notes"],
    "active": True,
}
# One broken keyword each: an engine that enforces it rejects the document.
INVALID = {"integer min/max": {"age": 999}, "string maxLength": {"name": "A" * 60}, "enum": {"role": "owner"}}
REGEX, REGEX_TEXT = r"[A-Z][a-z]{2,8}-[0-9]{3}", "Abc-123"
LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n'
GBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"\n'
CFG_TEXT = "(1+23)-4"


def large_schema(n: int = 200) -> dict:
    """An object of `n` properties cycling through five kinds; every tenth is optional."""
    kinds = {
        "string": lambda i: {"type": "string", "maxLength": 16 + i % 48},
        "integer": lambda i: {"type": "integer", "minimum": -i, "maximum": 1000 + 7 * i},
        "enum": lambda i: {"type": "string", "enum": [f"v{i}_{j}" for j in range(4)]},
        "boolean": lambda i: {"type": "boolean"},
        "object": lambda i: {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}, "label": {"type": "string"}},
            "required": ["id", "label"],
            "additionalProperties": False,
        },
    }
    props = {}
    for i in range(n):
        kind, make = list(kinds.items())[i % len(kinds)]
        props[f"field_{i:03d}_{kind}"] = make(i)
    required = [name for i, name in enumerate(props) if i % 10]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def texts() -> dict[str, str]:
    """Every text the engines consume, as json.dumps writes it (separators ", " and ": ")."""
    out = {"document": json.dumps(DOCUMENT), "regex": REGEX_TEXT, "cfg": CFG_TEXT}
    out.update({f"invalid {k}": json.dumps({**DOCUMENT, **v}) for k, v in INVALID.items()})
    return out


# ---- vocabularies (parent process) ---------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + n): b for n, b in enumerate(shifted)}


def real_vocab() -> dict:
    """SmolLM2's tokenizer: raw bytes of every token (special ones as their text), tokenizer.json."""
    from lmforge.model import cached_onnx
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(cached_onnx("smollm2-135m", "cpu-int4", progress=False))
    specials = sorted(tok.hf.get_added_tokens_decoder())
    dec = _byte_decoder()
    tokens = [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    tokens = [t.encode() if i in specials else bytes(dec[c] for c in t) for i, t in enumerate(tokens)]
    return {
        "name": f"SmolLM2 ({len(tokens):,})",
        "tokens": tokens,
        "specials": specials,
        "eos": list(tok.eos_ids),
        "ids": {name: tok.encode(text) for name, text in texts().items()},
        "tokenizer_json": tok.hf.to_str(),
        "tokenizer": "SmolLM2-135M-Instruct's byte-level BPE, its tokenizer.json",
    }


def synthetic_vocab(base: dict, size: int = SYNTHETIC_SIZE) -> dict:
    """`base` plus word pieces (whole words with and without a leading space, then their substrings
    of 2-12 characters, most frequent first) of WikiText-2 test and pydoc topics, as UTF-8 bytes."""
    import pydoc_data.topics

    corpus = WIKITEXT.read_text(encoding="utf-8") + "\n".join(pydoc_data.topics.topics.values())
    words = collections.Counter(re.findall(r" ?\w+| ?[^\w\s]+", corpus))
    pieces = collections.Counter()
    for word, n in words.items():
        w = word.strip()
        for a in range(len(w)):
            for b in range(a + 2, min(len(w), a + 12) + 1):
                pieces[w[a:b]] += n
    have = set(base["tokens"])
    extra = []
    for piece, _ in [*words.most_common(), *pieces.most_common()]:
        raw = piece.encode()
        if raw not in have:
            have.add(raw)
            extra.append(raw)
            if len(base["tokens"]) + len(extra) == size:
                break
    tokens = base["tokens"] + extra
    ids = {
        name: greedy_tokenize(text.encode(), token_index(tokens, base["specials"])) for name, text in texts().items()
    }
    return dict(base, name=f"synthetic ({len(tokens):,})", tokens=tokens, ids=ids, tokenizer_json=None)


def token_index(tokens: list[bytes], specials: list[int]) -> dict[bytes, int]:
    """bytes -> id of every ordinary token."""
    skip = set(specials)
    return {t: i for i, t in enumerate(tokens) if i not in skip}


def greedy_tokenize(data: bytes, index: dict[bytes, int], longest: int = 64) -> list[int]:
    """Longest match first, left to right (every single byte is a token)."""
    ids, i = [], 0
    while i < len(data):
        n = next(n for n in range(min(longest, len(data) - i), 0, -1) if data[i : i + n] in index)
        ids.append(index[data[i : i + n]])
        i += n
    return ids


# ---- engines (child process): compile(schema) -> grammar, start(grammar) -> matcher, mask, consume -----


class RawTokenizer:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, EOS/BOS/special ids, and an encoder."""

    def __init__(self, vocab: dict):
        self.tokens = vocab["tokens"]
        self.eos_token_id, self.bos_token_id = vocab["eos"][0], None
        self.special_token_ids = vocab["specials"]
        self.index = token_index(vocab["tokens"], vocab["specials"])

    def __call__(self, data: bytes) -> list[int]:
        return greedy_tokenize(data, self.index)


class Llguidance:
    def __init__(self, vocab: dict, threads: int):
        import llguidance as llg

        self.llg = llg
        source = vocab["tokenizer_json"] or llg.TokenizerWrapper(RawTokenizer(vocab))
        self.tok = llg.LLTokenizer(source, n_vocab=len(vocab["tokens"]), eos_token=vocab["eos"])
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile(self, schema: dict):
        return self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=self.options)

    def start(self, grammar):
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def mask(self, m, bits: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token)

    def regex(self, regex: str):
        return self.llg.LLMatcher.grammar_from_regex(regex)

    def lark(self, text: str):
        return self.llg.LLMatcher.grammar_from_lark(text)

    def gbnf(self, text: str):
        return self.llg.grammar_from("gbnf", text)

    def rollback(self, m, n: int) -> None:
        assert m.rollback(n)

    def check_draft(self, m, draft: list[int]) -> int:
        return m.validate_tokens(draft)

    api = {
        "draft": "validate_tokens(), try_consume_tokens(); LLExecutor masks for a draft sequence in one call",
        "rollback": "rollback(n), reset()",
    }


class Xgrammar:
    def __init__(self, vocab: dict, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        n = len(vocab["tokens"])
        if vocab["tokenizer_json"]:  # what xgrammar's docs do: its from_huggingface
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(vocab["tokenizer_json"]))
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=n, stop_token_ids=vocab["eos"])
        else:  # an empty token is a special one to xgrammar
            skip = set(vocab["specials"])
            raw = [b"" if i in skip else t for i, t in enumerate(vocab["tokens"])]
            info = xgr.TokenizerInfo(raw, xgr.VocabType.RAW, vocab_size=n, stop_token_ids=vocab["eos"])
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def start(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def mask(self, m, bits: np.ndarray) -> None:
        m.fill_next_token_bitmask(bits[None])

    def consume(self, m, token: int) -> bool:
        return m.accept_token(token)

    def regex(self, regex: str):
        return self.compiler.compile_regex(regex)

    def lark(self, text: str):
        return self.compiler.compile_lark(text)

    def gbnf(self, text: str):
        return self.compiler.compile_grammar(text)

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def check_draft(self, m, draft: list[int]) -> int:
        n = 0
        while n < len(draft) and m.accept_token(draft[n]):
            n += 1
        m.rollback(n)
        return n

    api = {
        "draft": "traverse_draft_tree() fills the masks of a draft tree; accept_token() + rollback()",
        "rollback": "rollback(n), reset(), fork()",
    }


class OutlinesCore:
    def __init__(self, vocab: dict, threads: int):
        import outlines_core

        self.oc = outlines_core
        eos, skip = vocab["eos"][0], set(vocab["specials"])
        table: dict[bytes, list[int]] = {}
        for i, t in enumerate(vocab["tokens"]):
            if i not in skip:
                table.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, table)

    def compile(self, schema: dict):
        return self.regex(self.oc.json_schema.build_regex_from_schema(json.dumps(schema)))

    def regex(self, regex: str):
        return self.oc.Index(regex, self.vocabulary)

    def start(self, grammar):
        return self.oc.Guide(grammar)

    def mask(self, m, bits: np.ndarray) -> None:
        m.write_mask_into(bits.ctypes.data, bits.size, 4)

    def consume(self, m, token: int) -> bool:
        m.advance(token, return_tokens=False)
        return True

    def lark(self, text: str):
        raise NotImplementedError("outlines_core has no grammar API: Index takes a regex only")

    gbnf = lark

    def rollback(self, m, n: int) -> None:
        m.rollback_state(n)

    def check_draft(self, m, draft: list[int]) -> int:
        return len(draft) if m.accepts_tokens(draft) else 0

    api = {
        "draft": "accepts_tokens() (yes/no for a whole draft)",
        "rollback": "rollback_state(n), at most Guide(max_rollback=32) tokens",
    }


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


# ---- measuring (child process) --------------------------------------------------------------------


def _allowed(bits: np.ndarray, token: int) -> bool:
    return bool((int(bits[token >> 5]) >> (token & 31)) & 1)


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def compile_ms(engine, schema: dict, bits: np.ndarray) -> float:
    """Milliseconds from the schema to a started matcher's first mask."""
    t0 = time.perf_counter()
    engine.mask(engine.start(engine.compile(schema)), bits)
    return (time.perf_counter() - t0) * 1e3


def walk(engine, grammar, ids: list[int], bits: np.ndarray, vocab: dict, times: list[int]) -> dict:
    """One fresh matcher through `ids`, every mask timed into `times` (ns); what the masks got wrong."""
    m = engine.start(grammar)
    forbidden, specials = 0, 0
    others = [s for s in vocab["specials"] if s not in vocab["eos"]]
    for token in ids:
        t0 = time.perf_counter_ns()
        engine.mask(m, bits)
        times.append(time.perf_counter_ns() - t0)
        forbidden += not _allowed(bits, token)
        specials = max(specials, sum(_allowed(bits, s) for s in others))
        if not engine.consume(m, token):
            raise RuntimeError(f"token {token} refused by consume")
    engine.mask(m, bits)
    return {"forbidden": forbidden, "specials": specials, "eos_at_end": _allowed(bits, vocab["eos"][0])}


def accepts(engine, grammar, ids: list[int], bits: np.ndarray) -> bool:
    """Whether every token of `ids` is allowed in turn (and the consumer agrees)."""
    m = engine.start(grammar)
    for token in ids:
        engine.mask(m, bits)
        if not _allowed(bits, token):
            return False
        try:
            if not engine.consume(m, token):
                return False
        except Exception:
            return False
    return True


def features(engine, vocab: dict, bits: np.ndarray) -> dict:
    """Each capability tried for real: 'yes ...', 'no ...' or the exception."""
    ids, out = vocab["ids"], {}
    grammar = engine.compile(SCHEMA)
    for name in INVALID:
        ok = accepts(engine, grammar, ids[f"invalid {name}"], bits)
        out[f"JSON Schema {name}"] = "not enforced" if ok else "enforced"
    for name, make, source, text in [
        ("regex", engine.regex, REGEX, "regex"),
        ("Lark", engine.lark, LARK, "cfg"),
        ("GBNF", engine.gbnf, GBNF, "cfg"),
    ]:
        try:
            out[name] = "yes" if accepts(engine, make(source), ids[text], bits) else "compiles, rejects valid text"
        except Exception as e:
            out[name] = f"no ({_error(e)})"
    doc = ids["document"]
    try:
        m = engine.start(grammar)
        for t in doc[:12]:
            engine.consume(m, t)
        engine.rollback(m, 6)
        ok = all(engine.consume(m, t) for t in doc[6:20])
        out["rollback"] = f"{'yes' if ok else 'wrong state after it'}: {engine.api['rollback']}"
    except Exception as e:
        out["rollback"] = f"no ({_error(e)})"
    try:
        m = engine.start(grammar)
        for t in doc[:5]:
            engine.consume(m, t)
        good = engine.check_draft(m, doc[5:13])
        bad = engine.check_draft(m, doc[5:8] + [doc[0]] + doc[9:13])
        verdict = "yes" if good == 8 and bad < 8 else f"wrong: {good} of 8 valid, {bad} of 8 with a bad 4th"
        out["draft tokens"] = f"{verdict}: {engine.api['draft']}"
    except Exception as e:
        out["draft tokens"] = f"no ({_error(e)})"
    return out


def mask_walks(engine, vocab: dict, bits: np.ndarray, walks: int) -> dict:
    """Mask median and p99 (us) over `walks` walks of the document, and the worst of each check."""
    grammar, ids, times, checks = engine.compile(SCHEMA), vocab["ids"]["document"], [], []
    for _ in range(walks):
        checks.append(walk(engine, grammar, ids, bits, vocab, times))
    return {
        "mask_median_us": statistics.median(times) / 1e3,
        "mask_mean_us": statistics.fmean(times) / 1e3,
        "mask_p99_us": float(np.percentile(times, 99)) / 1e3,
        "tokens": len(ids),
        "forbidden": max(c["forbidden"] for c in checks),
        "specials": max(c["specials"] for c in checks),
        "eos_at_end": all(c["eos_at_end"] for c in checks),
    }


def child(args) -> None:
    """One engine on one vocabulary; every figure is appended to args.out as a JSON line at once,
    so that what was measured before a timeout survives it."""
    vocab = pickle.loads(Path(args.vocab).read_bytes())
    bits = np.zeros((len(vocab["tokens"]) + 31) // 32, dtype=np.int32)  # (ceil(V / 32),) one bit per token

    with open(args.out, "a") as out:

        def put(**figures):
            out.write(json.dumps(figures) + "\n")
            out.flush()

        def attempt(name, fn):
            """fn()'s result, or None with the exception recorded as 'error NAME'."""
            put(step=name)
            try:
                return fn()
            except Exception as e:
                put(**{f"error {name}": _error(e)})

        t0 = time.perf_counter()
        if attempt("import", lambda: importlib.import_module(PACKAGES[args.child])) is None:
            return
        put(import_ms=(time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        engine = attempt("setup", lambda: ADAPTERS[args.child](vocab, args.threads))
        if engine is None:
            return
        put(setup_ms=(time.perf_counter() - t0) * 1e3)
        if (ms := attempt("compile", lambda: compile_ms(engine, SCHEMA, bits))) is not None:
            put(compile_ms=ms)
            if (walked := attempt("mask", lambda: mask_walks(engine, vocab, bits, args.walks))) is not None:
                put(**walked)
        if not args.skip_large:
            big = large_schema()
            if (ms := attempt("large", lambda: compile_ms(engine, big, bits))) is not None:
                put(large_ms=ms)
                if ms < SLOW_S * 1e3 and (again := attempt("large again", lambda: compile_ms(engine, big, bits))):
                    put(large_again_ms=again)
        if args.features and (found := attempt("features", lambda: features(engine, vocab, bits))) is not None:
            put(features=found)


# ---- driving and reporting (parent process) ----------------------------------------------------------


def run_child(engine: str, vocab_path: Path, args, skip_large: bool, with_features: bool) -> dict:
    """The figures of one child process; a crash or timeout is recorded with the step it stopped in."""
    out = vocab_path.with_suffix(f".{engine}.jsonl")
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", engine, "--vocab", str(vocab_path), "--out", str(out)]
    cmd += ["--threads", str(args.threads), "--walks", str(args.walks)]
    cmd += ["--skip-large"] * skip_large + ["--features"] * with_features
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    failure = None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        if r.returncode:
            failure = f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:160]}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {args.timeout} s"
    got: dict = {}
    for line in out.read_text().splitlines() if out.exists() else []:
        got.update(json.loads(line))
    if failure:
        got[f"error {got.get('step', 'start')}"] = failure
    return got


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min-max)' of per-round figures, or the one figure."""
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def cell(runs: list[dict], key: str, error_key: str, fmt: str = "{:.1f}") -> str:
    """One table cell: the spread of `key` over rounds, else the first failure of its step."""
    values = [r[key] for r in runs if key in r]
    errors = [r[f"error {error_key}"] for r in runs if f"error {error_key}" in r]
    if values:
        return spread(values, fmt)
    if errors:
        return f"failed: {errors[0]}"
    return "not repeated (no cache, slow)" if key == "large_again_ms" and any("large_ms" in r for r in runs) else "-"


def median_of(runs: dict, engine: str, vocabulary: str, key: str) -> float | None:
    values = [r[key] for r in runs[(engine, vocabulary)] if key in r]
    return statistics.median(values) if values else None


def summary(runs: dict, vocabs: dict, feats: dict) -> str:
    """The paragraph under the tables: the order of the engines on the largest vocabulary, how compile
    grows with the vocabulary, and what each engine could not do."""
    small, large = (v["name"] for v in vocabs.values())
    ranked = []
    for key, what, unit in [
        ("compile_ms", "schema compile", "ms"),
        ("large_ms", "200-property compile", "ms"),
        ("mask_median_us", "median mask", "us"),
        ("mask_p99_us", "p99 mask", "us"),
    ]:
        got = sorted((x, e) for e in ENGINES if (x := median_of(runs, e, large, key)) is not None)
        ranked.append(f"{what} " + " < ".join(f"{e} {x:.3g} {unit}" for x, e in got))
    growth = []
    for e in ENGINES:
        a, b = median_of(runs, e, small, "large_ms"), median_of(runs, e, large, "large_ms")
        if a and b:
            growth.append(f"{e} x{b / a:.1f}")
    lacks = [f"{e}: {k} {v}" for e, f in feats.items() for k, v in f.items() if not v.startswith(("yes", "enforced"))]
    return (
        f"On the {large} vocabulary: {'; '.join(ranked)}. From {small} to {large} tokens the 200-property "
        f"compile grows {', '.join(growth)}. xgrammar and outlines-core do their work at compile time (xgrammar "
        f"precomputes token masks per grammar position and caches compiled grammars; outlines-core builds a "
        f"regex DFA x vocabulary index), so their masks are cheapest, and their compile grows with schema and "
        f"vocabulary; llguidance compiles lazily and computes each mask on the fly. Missing or failed: "
        f"{'; '.join(lacks) or 'nothing'}."
    )


def report(runs: dict, vocabs: dict, args, wall_s: float) -> str:
    imports = []
    for e in ENGINES:
        ms = [r["import_ms"] for (engine, _), rs in runs.items() if engine == e for r in rs if "import_ms" in r]
        imports.append(f"{e} {spread(ms, '{:.0f}')} ms")
    lines = [
        "# Grammar engines: " + ", ".join(f"{e} {version(PACKAGES[e])}" for e in ENGINES),
        "",
        f"{args.rounds} rounds, each engine and vocabulary in its own process, interleaved; median (min-max) over "
        f"rounds. {args.threads} threads, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {wall_s:.0f} s in all. Setup = the engine's vocabulary object, after the "
        f"import ({', '.join(imports)}). Compile = schema to the first token mask of a started matcher (llguidance "
        f"builds its lexer lazily, so its first mask belongs to its compile). Mask = one full next-token bitmask, "
        f"over {args.walks} walks of a {len(json.dumps(DOCUMENT))}-byte document per round (a fresh matcher each "
        f"walk). 200-property schema: once in the first round when slower than {SLOW_S:.0f} s. SmolLM2's "
        f"tokenizer goes in as each engine's docs show (llguidance: tokenizer.json; xgrammar: "
        f"TokenizerInfo.from_huggingface, which leaves added special tokens as ordinary text; outlines-core: a "
        f"Vocabulary of raw bytes without the special tokens); the synthetic vocabulary as raw bytes with the "
        f"special tokens marked (llguidance: TokenizerWrapper; xgrammar: TokenizerInfo, empty special tokens).",
        "",
        "| engine | vocabulary | setup ms | schema compile ms | mask median us | mask mean us | mask p99 us "
        "| 200-prop compile ms | 200-prop again ms | masks wrong |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (engine, vname), rs in runs.items():
        wrong = {f"{r['forbidden']} document tokens forbidden" for r in rs if r.get("forbidden")}
        wrong |= {f"{r['specials']} special tokens allowed" for r in rs if r.get("specials")}
        wrong |= {"EOS not allowed at end" for r in rs if r.get("eos_at_end") is False}
        cells = [
            cell(rs, "setup_ms", "setup", "{:.0f}"),
            cell(rs, "compile_ms", "compile"),
            cell(rs, "mask_median_us", "mask", "{:.2f}"),
            cell(rs, "mask_mean_us", "mask", "{:.2f}"),
            cell(rs, "mask_p99_us", "mask"),
            cell(rs, "large_ms", "large"),
            cell(rs, "large_again_ms", "large again", "{:.2f}"),
            "; ".join(sorted(wrong)) or "none",
        ]
        lines.append(f"| {engine} | {vname} | " + " | ".join(cells) + " |")
    feats = {}
    for (engine, _), rs in runs.items():
        for r in rs:
            if "features" in r or "error features" in r:
                feats[engine] = r.get("features") or {"error": r["error features"]}
    names = list(dict.fromkeys(k for f in feats.values() for k in f))
    lines += ["", "Features (tried on the SmolLM2 vocabulary):", "", "| feature | " + " | ".join(feats) + " |"]
    lines += ["| --- |" + " --- |" * len(feats)]
    lines += [f"| {n} | " + " | ".join(f.get(n, "-").replace("|", "/") for f in feats.values()) + " |" for n in names]
    lines += ["", "Vocabularies: " + "; ".join(f"{v['name']}: {v['tokenizer']}" for v in vocabs.values()) + "."]
    lines += ["", summary(runs, vocabs, feats)]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="each engine runs in this many processes, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--walks", type=int, default=10, help="walks of the document per process")
    ap.add_argument("--timeout", type=int, default=240, help="seconds for one engine process")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--skip-large", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--features", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    started = time.perf_counter()
    real = real_vocab()
    synthetic = synthetic_vocab(real)
    synthetic["tokenizer"] = (
        f"SmolLM2's {len(real['tokens']):,} tokens plus {len(synthetic['tokens']) - len(real['tokens']):,} word "
        f"pieces of WikiText-2 test and pydoc topics (raw bytes; no 150k tokenizer can be downloaded here), "
        f"document tokenized greedily longest-match ({len(synthetic['ids']['document'])} tokens against "
        f"{len(real['ids']['document'])} with SmolLM2's BPE)"
    )
    runs = {(e, v["name"]): [] for v in (real, synthetic) for e in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key, v in (("real", real), ("synthetic", synthetic)):
            paths[key] = Path(tmp) / f"{key}.pkl"
            paths[key].write_bytes(pickle.dumps(v))
        for rnd in range(args.rounds):
            order = ENGINES[rnd % len(ENGINES) :] + ENGINES[: rnd % len(ENGINES)]  # each engine goes first once
            for key, v in (("real", real), ("synthetic", synthetic)):
                for engine in order:
                    done = runs[(engine, v["name"])]
                    slow = any(r.get("large_ms", 0) > SLOW_S * 1e3 or "error large" in r for r in done)
                    got = run_child(engine, paths[key], args, skip_large=slow, with_features=not rnd and key == "real")
                    done.append(got)
                    figures = {k: round(x, 2) for k, x in got.items() if isinstance(x, float)}
                    print(f"[round {rnd + 1}/{args.rounds}] {engine} on {v['name']}: {figures}", flush=True)
    vocabs = {"real": real, "synthetic": synthetic}
    text = report(runs, vocabs, args, time.perf_counter() - started)
    data = {"args": vars(args), "runs": [{"engine": e, "vocabulary": v, "rounds": rs} for (e, v), rs in runs.items()]}
    save("grammar_engines", text, data)


if __name__ == "__main__":
    main()
