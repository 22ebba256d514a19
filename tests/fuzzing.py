"""Seeded mutations of model files (GGUF, safetensors, config.json, tokenizer.json) and a
harness that runs each variant through what a user would run on it: `inspect` (open the
checkpoint, its summary and tokenizer), `convert` (to GGUF) and the first forward step of
llama.cpp (in a child process, so an abort is caught and counted) and of ONNX Runtime.

Each variant ends in one outcome: "error" (a one-line LmforgeError: the promised behaviour for
a damaged file), "worked" (the damage did not matter, e.g. a flipped weight byte),
"traceback" (any other exception: a bug), "abort" (the engine's process died) or "hang"
(more than HANG_S seconds). `tests/test_fuzz.py` runs a CI-sized sample; `benchmarks/fuzz.py`
the long run.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HANG_S = 30
ALIGN = 32
# GGUF value types: struct format of each scalar type, and the string and array types
SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


# ---- GGUF layout: the file as a list of parts that can be changed and written back ----------


@dataclass
class KV:
    key: str
    vtype: int
    raw: bytes  # the encoded value (for an array: element type, count and elements)
    offset: int = 0  # where the value starts in the original file


@dataclass
class TensorInfo:
    name: str
    dims: list[int]
    qtype: int
    offset: int
    at: int = 0  # where this info starts in the original file


@dataclass
class GGUFLayout:
    version: int
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)  # header/meta/tinfo/data spans


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in SCALAR_FMT:
        return pos + struct.calcsize(SCALAR_FMT[vtype])
    if vtype == STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    etype, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in SCALAR_FMT:
        return pos + n * struct.calcsize(SCALAR_FMT[etype])
    for _ in range(n):
        pos = _skip_value(buf, pos, etype)
    return pos


def parse_gguf(buf: bytes) -> GGUFLayout:
    """The parts of a valid GGUF (the seed); not a validating reader."""
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        vtype = struct.unpack_from("<I", buf, pos)[0]
        end = _skip_value(buf, pos + 4, vtype)
        kvs.append(KV(key, vtype, buf[pos + 4 : end], pos + 4))
        pos = end
    meta_end, tensors = pos, []
    for _ in range(n_tensors):
        at = pos
        n = struct.unpack_from("<Q", buf, pos)[0]
        name = buf[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        pos += 4 + 8 * n_dims
        qtype, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(TensorInfo(name, dims, qtype, offset, at))
    data_start = (pos + ALIGN - 1) // ALIGN * ALIGN
    regions = {"header": (0, 24), "meta": (24, meta_end), "tinfo": (meta_end, pos), "data": (data_start, len(buf))}
    return GGUFLayout(version, kvs, tensors, bytes(buf[data_start:]), regions)


def write_gguf(lay: GGUFLayout, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """The bytes of a layout, padded so that the data section stays aligned."""
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", lay.version, len(lay.tensors) if n_tensors is None else n_tensors,
                       len(lay.kvs) if n_kv is None else n_kv)  # fmt: skip
    for kv in lay.kvs:
        out += _string(kv.key) + struct.pack("<I", kv.vtype) + kv.raw
    for t in lay.tensors:
        out += _string(t.name) + struct.pack("<I", len(t.dims)) + struct.pack(f"<{len(t.dims)}Q", *t.dims)
        out += struct.pack("<IQ", t.qtype, t.offset)
    out += b"\0" * (-len(out) % ALIGN)
    return bytes(out + lay.data)


def encode(vtype: int, value) -> bytes:
    """A GGUF value of `vtype` (arrays: (element type, list))."""
    if vtype in SCALAR_FMT:
        return struct.pack(SCALAR_FMT[vtype], value)
    if vtype == STRING:
        return _string(value)
    etype, items = value
    return struct.pack("<IQ", etype, len(items)) + b"".join(encode(etype, x) for x in items)


def nested(depth: int) -> bytes:
    """An array holding an array ... `depth` deep, innermost one uint32."""
    raw = struct.pack("<IQI", 4, 1, 7)
    for _ in range(depth - 1):
        raw = struct.pack("<IQ", ARRAY, 1) + raw
    return raw


# ---- GGUF mutations --------------------------------------------------------------------------

INT_VALUES = (0, 1, 3, 7, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 10**9, 65)
FLOAT_VALUES = (0.0, -1e-5, -1.0, math.nan, math.inf, -math.inf, 1e30, 1e-45, 5.0)


def _substitute(rng: random.Random, lay: GGUFLayout) -> str:
    """Replace one numeric field (metadata scalar, tensor dim/type/offset) by an extreme value."""
    numeric = [kv for kv in lay.kvs if kv.vtype in SCALAR_FMT]
    if rng.random() < 0.6:
        kv = rng.choice(numeric)
        fmt = SCALAR_FMT[kv.vtype]
        if kv.vtype in (6, 12):
            value = rng.choice(FLOAT_VALUES)
        else:
            width = struct.calcsize(fmt) * 8
            signed = fmt[-1].islower() and fmt[-1] != "?"
            value = rng.choice(INT_VALUES) % (1 << width)
            if signed and value >= 1 << (width - 1):
                value -= 1 << width
            if kv.vtype == 7:
                value = bool(value)
        kv.raw = struct.pack(fmt, value)
        return f"subst {kv.key}={value}"
    t = rng.choice(lay.tensors)
    what = rng.choice(("dim", "qtype", "offset", "ndims"))
    if what == "dim":
        i = rng.randrange(len(t.dims))
        t.dims[i] = rng.choice((0, 1, 2, 31, 33, 2**31, 2**63, t.dims[i] * 2, t.dims[i] // 2 or 1))
    elif what == "qtype":
        t.qtype = rng.choice((0, 1, 2, 8, 12, 30, 39, 1000, 2**31))
    elif what == "offset":
        t.offset = rng.choice((0, 1, 32, t.offset + 32, t.offset - 32 if t.offset >= 32 else 64, 2**40, 2**64 - 32))
    else:
        t.dims = t.dims + [1] if rng.random() < 0.5 else t.dims[:1]
    return f"tensor {t.name} {what}"


def _retype(rng: random.Random, lay: GGUFLayout) -> str:
    """A value of the wrong type: a string or array where a number belongs, or the reverse."""
    kv = rng.choice(lay.kvs)
    choice = rng.randrange(5)
    if choice == 0:
        kv.vtype, kv.raw = STRING, encode(STRING, rng.choice(("abc", "12", "", "-1", "nan")))
    elif choice == 1:
        kv.vtype, kv.raw = ARRAY, encode(ARRAY, (4, [rng.randrange(100) for _ in range(rng.randrange(4))]))
    elif choice == 2:
        kv.vtype, kv.raw = 6, encode(6, rng.choice(FLOAT_VALUES))
    elif choice == 3:
        kv.vtype, kv.raw = 7, encode(7, True)
    else:
        kv.vtype, kv.raw = ARRAY, encode(ARRAY, (STRING, ["a", "b c", ""]))
    return f"retype {kv.key} -> {kv.vtype}"


def _structure(rng: random.Random, lay: GGUFLayout) -> str:
    """Keys or tensors removed, duplicated or added; arrays nested; counts that lie."""
    choice = rng.randrange(7)
    if choice == 0:
        kv = lay.kvs.pop(rng.randrange(len(lay.kvs)))
        return f"drop {kv.key}"
    if choice == 1:
        t = lay.tensors.pop(rng.randrange(len(lay.tensors)))
        return f"drop tensor {t.name}"
    if choice == 2:
        kv = rng.choice(lay.kvs)
        kv.vtype, kv.raw = ARRAY, nested(rng.choice((2, 3, 50, 5000, 100000)))
        return f"nest {kv.key}"
    if choice == 3:
        lay.tensors.append(TensorInfo(*[getattr(rng.choice(lay.tensors), f) for f in ("name", "dims", "qtype")], 0))
        return "duplicate tensor"
    if choice == 4:
        lay.tensors = []
        return "no tensors"
    if choice == 5:
        arch = next(kv for kv in lay.kvs if kv.key == "general.architecture").raw[8:].decode()
        key = rng.choice(("attention.sliding_window", "rope.scaling.factor", "expert_count", "vocab_size"))
        lay.kvs.append(KV(f"{arch}.{key}", 4, encode(4, rng.choice(INT_VALUES) % 2**32)))
        return f"add {key}"
    t = rng.choice(lay.tensors)
    t.name = rng.choice(("", "blk.99.attn_q.weight", "blk.0.unknown.weight", t.name + "\xff", "x" * 300))
    return "rename tensor"


def mutate_gguf(seed_bytes: bytes, lay: GGUFLayout, rng: random.Random) -> tuple[bytes, str]:
    """One seeded variant of the seed GGUF and a short label of what was done."""
    kind = rng.choices(("flip", "subst", "retype", "struct", "trunc", "count"), (3, 4, 2, 2, 1, 1))[0]
    if kind == "flip":
        region = rng.choice(("header", "meta", "tinfo", "data"))
        lo, hi = lay.regions[region]
        buf = bytearray(seed_bytes)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip {region}"
    if kind == "trunc":
        lo, hi = lay.regions[rng.choice(("header", "meta", "tinfo", "data"))]
        return seed_bytes[: rng.randrange(lo, hi)], "truncate"
    lay = GGUFLayout(
        lay.version,
        [KV(k.key, k.vtype, k.raw) for k in lay.kvs],
        [TensorInfo(t.name, list(t.dims), t.qtype, t.offset) for t in lay.tensors],
        lay.data,
    )
    if kind == "count":
        n_t, n_kv = rng.choice(((2**31, None), (None, 2**40), (0, None), (None, len(lay.kvs) + 1), (2**64 - 1, 0)))
        return write_gguf(lay, n_t, n_kv), f"counts {n_t} {n_kv}"
    label = {"subst": _substitute, "retype": _retype, "struct": _structure}[kind](rng, lay)
    return write_gguf(lay), label


# ---- safetensors / config.json / tokenizer.json mutations -------------------------------------


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _mutate_header(rng: random.Random, header: dict) -> str:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    begin, end = e["data_offsets"]
    choice = rng.randrange(9)
    if choice == 0:
        e["data_offsets"] = [-8, end]
    elif choice == 1:
        e["data_offsets"] = [end, begin]
    elif choice == 2:
        other = header[rng.choice(names)]["data_offsets"]
        e["data_offsets"] = [other[0], other[0] + end - begin]
    elif choice == 3:
        e["data_offsets"] = [begin, end + rng.choice((2, 4, 10**12))]
    elif choice == 4:
        e["dtype"] = rng.choice(("F16", "F64", "I8", "Q4", "", 5))
    elif choice == 5:
        e["shape"] = rng.choice(([], [0], [-1, 64], [10**9, 10**9], ["64"], [2**70], e["shape"][::-1] + [1]))
    elif choice == 6:
        del e[rng.choice(("dtype", "shape", "data_offsets"))]
    elif choice == 7:
        header[name] = rng.choice(([1, 2], "x", None, {}))
    else:
        e["data_offsets"] = [begin + 1, end + 1]
    return f"header {name} #{choice}"


def mutate_safetensors(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A variant of a safetensors file: its JSON header changed, its framing damaged, or cut."""
    n = struct.unpack_from("<Q", raw)[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    kind = rng.randrange(6)
    if kind == 0:
        body, label = json.dumps(list(header.items())).encode(), "header is a list"
    elif kind == 1:
        body, label = _deep(rng.choice((100, 10000, 200000))).encode(), "deep nesting"
    elif kind in (2, 3):
        label = _mutate_header(rng, header)
        body = json.dumps(header).encode()
    elif kind == 4:
        cut = rng.randrange(len(raw))
        return raw[:cut], f"truncate at {cut}"
    else:
        buf = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(0, min(len(buf), 8 + n + 64))] ^= 1 << rng.randrange(8)
        return bytes(buf), "flip header"
    return struct.pack("<Q", len(body)) + body + data, label


CONFIG_VALUES = (0, -1, 3, 7, 10**9, 2**31, 1e308, math.nan, math.inf, "64", None, [], {}, True, 1.5)


def mutate_config(cfg: dict, rng: random.Random) -> tuple[str, str]:
    """A variant of config.json's text (JSON with NaN/Infinity as Python writes them)."""
    kind = rng.randrange(6)
    if kind == 0:
        return json.dumps([cfg]), "config is a list"
    if kind == 1:
        return '{"a": ' + _deep(rng.choice((100, 100000))) + "}", "deep nesting"
    cfg = json.loads(json.dumps(cfg))
    key = rng.choice(list(cfg))
    if kind == 2:
        del cfg[key]
        return json.dumps(cfg), f"drop {key}"
    if kind == 3:
        key = rng.choice(("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings",
                          "rms_norm_eps", "rope_theta", "rope_scaling", "model_type"))  # fmt: skip
    cfg[key] = rng.choice(CONFIG_VALUES)
    return json.dumps(cfg), f"set {key}={cfg[key]!r}"


def mutate_tokenizer(tok: dict, rng: random.Random) -> tuple[str, str]:
    """A variant of tokenizer.json: damaged merges, vocabulary or model."""
    tok = json.loads(json.dumps(tok))
    model = tok["model"]
    kind = rng.randrange(5)
    if kind == 0 and model.get("merges"):
        i = rng.randrange(len(model["merges"]))
        model["merges"][i] = rng.choice(("nospace", "a b c", "", ["x"], 5, "\u2581zz \u2581qq"))
    elif kind == 1:
        model["vocab"] = rng.choice(([], "x", {"a": "b"}, {"a": -1}))
    elif kind == 2:
        tok["model"] = rng.choice((None, [], {"type": "Unknown"}))
    elif kind == 3:
        tok["added_tokens"] = [{"id": 10**9, "content": "x"}]
    else:
        return json.dumps(tok)[: rng.randrange(10, 1000)], "truncated"
    return json.dumps(tok), f"tokenizer #{kind}"


# ---- running a variant ------------------------------------------------------------------------


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def guarded(step, *args) -> tuple[str, str]:
    """(outcome, detail) of `step(*args)`: worked, error (an LmforgeError), hang, or traceback."""
    from lmforge.errors import LmforgeError

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        step(*args)
        return "worked", ""
    except LmforgeError as e:
        text = str(e)
        return ("error", text) if text and "\n" not in text else ("traceback", f"bad message {text[:200]!r}")
    except _Hang:
        return "hang", ""
    except Exception as e:  # noqa: BLE001 - any other exception is the bug the fuzzer looks for
        import traceback

        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "traceback", f"{e.__class__.__name__}: {str(e)[:120]} at {Path(tb.filename).name}:{tb.lineno}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def inspect_step(path: Path) -> None:
    """What `lmforge inspect` and a first use read: the checkpoint, its summary, its tokenizer."""
    from lmforge.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    json.dumps(ckpt.summary())
    tok = ckpt.tokenizer()
    tok.decode(tok.encode("Hello, world: 12 + 3"))
    ckpt.chat_template()


def convert_step(path: Path, out: Path) -> None:
    """`lmforge convert --gguf f16 --force`: every tensor read, dequantized and written."""
    from lmforge.export.gguf import convert_to_gguf

    convert_to_gguf(path, out, "f16", force=True, progress=False)


def engine_step(engine: str, path: Path, work: Path) -> None:
    """The first forward step: llama.cpp on a GGUF, or ONNX Runtime on its cpu-fp32 conversion."""
    if engine == "llamacpp":
        from lmforge.runtime.llamacpp import LlamaCppEngine

        e = LlamaCppEngine(path, threads=1)
    else:
        from lmforge.export.convert import convert
        from lmforge.runtime.ort import OrtEngine

        folder = convert(path, work / "onnx", "cpu-fp32", force=True, progress=False)
        e = OrtEngine(folder, threads=1)
    cache = e.new_cache(1, 16)
    e.prefill(cache, [[1, 5, 9]])
    e.decode(cache, [7])


def worker() -> None:
    """Child process loop: `ENGINE PATH WORK` lines in, one JSON outcome line out each."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the engines print goes to stderr, not into the answers
    for line in sys.stdin:
        engine, path, work = line.split("\t")
        outcome, detail = guarded(engine_step, engine, Path(path), Path(work.strip()))
        answers.write(json.dumps([outcome, detail]) + "\n")
        answers.flush()


def vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak resident memory of a process in KiB: /proc's VmHWM, which starts afresh at exec (unlike
    getrusage's ru_maxrss, which a child started by fork and exec inherits from its parent)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Worker:
    """A child process that runs engine steps; an abort or a hang kills only it, and it restarts."""

    def __init__(self):
        self.proc = None
        self.peak_kib = 0  # the largest VmHWM any worker process reached

    def _start(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.fuzzing import worker; worker()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip

    def run(self, engine: str, path: Path, work: Path) -> tuple[str, str]:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{engine}\t{path}\t{work}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], HANG_S + 5)
        line = self.proc.stdout.readline() if ready else None
        self.peak_kib = max(self.peak_kib, vm_hwm_kib(self.proc.pid))
        if line:
            return tuple(json.loads(line))
        if line is None:
            self.close()
            return "hang", f"{engine} step over {HANG_S} s"
        rc = self.proc.wait()
        self.proc = None
        return "abort", f"{engine} child exited {rc}"

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Tally:
    """Outcome counts per stage, the worst cases, and the run's peak memory."""

    counts: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    bad: list = field(default_factory=list)
    seconds: float = 0.0
    worker_peak_kib: int = 0

    def add(self, stage: str, outcome: str, detail: str, label: str) -> None:
        self.counts[(stage, outcome)] += 1
        if outcome in ("traceback", "abort", "hang"):
            self.bad.append((stage, outcome, label, detail))

    def failures(self) -> int:
        return sum(n for (_, outcome), n in self.counts.items() if outcome in ("traceback", "abort", "hang"))

    def peak_rss_mib(self) -> float:
        """The larger peak of this process (run the campaign in a fresh one) and of the workers."""
        return max(vm_hwm_kib(), self.worker_peak_kib) / 1024

    def table(self) -> str:
        stages = sorted({s for s, _ in self.counts})
        outcomes = ("error", "worked", "traceback", "abort", "hang")
        lines = [f"{'stage':<22}" + "".join(f"{o:>10}" for o in outcomes)]
        for s in stages:
            lines.append(f"{s:<22}" + "".join(f"{self.counts[(s, o)]:>10}" for o in outcomes))
        lines.append(f"variants: {dict(self.variants)}; peak RSS {self.peak_rss_mib():.0f} MiB; {self.seconds:.0f} s")
        return "\n".join(lines)


# ---- campaigns ----------------------------------------------------------------------------------


def build_seeds(root: Path) -> tuple[Path, Path]:
    """(tiny HF llama folder, its Q8_0 GGUF): 2 layers, hidden 64, a 2,000-token SentencePiece
    vocabulary trained here, weights from transformers; small, so each variant costs milliseconds.
    Also writes seed-gemma3.gguf (F16): Gemma 3's per-layer pattern, q/k norms and four norms."""
    from lmforge.export.gguf import convert_to_gguf
    from tests import tiny

    hf, gguf = root / "seed-hf", root / "seed.gguf"
    if not gguf.exists():
        sp = tiny.train_spm(root / "spm")
        tiny.spm_hf_tokenizer(sp, root / "spm-src").save_pretrained(root / "tok")
        tiny.build(hf, "llama", tokenizers={"bpe": root / "tok"})
        tiny.build(root / "seed-gemma3", "gemma3", tokenizers={"spm": root / "tok"})
        convert_to_gguf(root / "seed-gemma3", root / "seed-gemma3.gguf", "f16", progress=False)
        convert_to_gguf(hf, gguf, "q8_0", progress=False)
    return hf, gguf


def _engine_steps(tally: Tally, worker: Worker, prefix: str, gguf: Path, work: Path, ort: bool, label: str):
    tally.add(f"{prefix} llamacpp", *worker.run("llamacpp", gguf, work), label)
    if ort:
        tally.add(f"{prefix} ort", *worker.run("ort", gguf, work), label)


def run_gguf(seed: Path, n: int, base: int, work: Path, tally: Tally, worker: Worker, ort_every: int = 0) -> None:
    """`n` variants of the GGUF `seed` (and of the other seed-*.gguf beside it, in turn) through
    inspect, convert, and llama.cpp (every variant: its engine checks the file itself) and ONNX
    Runtime (every `ort_every`-th that opens)."""
    files = [seed, *sorted(seed.parent.glob("seed-*.gguf"))]
    seeds = [(f.stem, f.read_bytes(), parse_gguf(f.read_bytes())) for f in files]
    path, opened = work / "variant.gguf", 0
    for i in range(n):
        name, raw, lay = seeds[i % len(seeds)]
        data, label = mutate_gguf(raw, lay, random.Random(f"gguf-{base + i}"))
        label = f"#{base + i} {name}: {label}"
        path.write_bytes(data)
        tally.variants["gguf"] += 1
        outcome, detail = guarded(inspect_step, path)
        tally.add("gguf inspect", outcome, detail, label)
        if outcome == "worked":
            opened += 1
            tally.add("gguf convert", *guarded(convert_step, path, work / "out.gguf"), label)
        ort = outcome == "worked" and ort_every and opened % ort_every == 1 % ort_every
        _engine_steps(tally, worker, "gguf", path, work, bool(ort), label)


def _hf_variant(seed: Path, folder: Path, rng: random.Random) -> str:
    """Fill `folder` with the seed's files, one of them (weights, config, tokenizer) mutated."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    kind = rng.choices(("safetensors", "config", "tokenizer"), (6, 2, 1))[0]
    for f in seed.iterdir():
        if kind == "safetensors" and f.suffix == ".safetensors":
            data, label = mutate_safetensors(f.read_bytes(), rng)
            (folder / f.name).write_bytes(data)
        elif kind == "config" and f.name == "config.json":
            text, label = mutate_config(json.loads(f.read_text()), rng)
            (folder / f.name).write_text(text)
        elif kind == "tokenizer" and f.name == "tokenizer.json":
            text, label = mutate_tokenizer(json.loads(f.read_text()), rng)
            (folder / f.name).write_text(text)
        else:
            (folder / f.name).symlink_to(f)
    return f"{kind}: {label}"


def run_hf(seed: Path, n: int, base: int, work: Path, tally: Tally, worker: Worker, ort_every: int = 0) -> None:
    """`n` variants of the HF folder `seed` (safetensors header, config.json, tokenizer.json)
    through inspect, convert to GGUF, and the engines on what converts."""
    folder, opened = work / "variant-hf", 0
    for i in range(n):
        label = f"#{base + i} " + _hf_variant(seed, folder, random.Random(f"hf-{base + i}"))
        tally.variants[label.split(" ", 2)[1].rstrip(":")] += 1
        outcome, detail = guarded(inspect_step, folder)
        tally.add("hf inspect", outcome, detail, label)
        if outcome != "worked":
            continue
        opened += 1
        out = work / "out-hf.gguf"
        converted, detail = guarded(convert_step, folder, out)
        tally.add("hf convert", converted, detail, label)
        if converted == "worked":
            ort = ort_every and opened % ort_every == 1 % ort_every
            tally.add("hf llamacpp", *worker.run("llamacpp", out, work), label)
            if ort:
                tally.add("hf ort", *worker.run("ort", folder, work), label)


def campaign(root: Path, n_gguf: int, n_hf: int, base: int = 0, ort_every: int = 0) -> Tally:
    """Build the seeds under `root` and run both campaigns; returns the tally."""
    hf, gguf = build_seeds(root)
    work = root / "work"
    work.mkdir(exist_ok=True)
    tally, worker, started = Tally(), Worker(), time.perf_counter()
    try:
        run_gguf(gguf, n_gguf, base, work, tally, worker, ort_every)
        run_hf(hf, n_hf, base, work, tally, worker, ort_every)
    finally:
        tally.worker_peak_kib = worker.peak_kib
        worker.close()
    tally.seconds = time.perf_counter() - started
    return tally
