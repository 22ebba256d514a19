"""ONNX Runtime engine over a folder lmforge wrote.

The KV cache is one buffer per layer and per K/V of shape (batch, kv_heads, capacity, head_dim),
bound with I/O binding as both GroupQueryAttention's past input and its present output, so the
op writes new keys in place (past/present buffer sharing). Capacity is sized to the request
(prompt + max tokens) and grows geometrically if a row outruns it; nothing is allocated for the
full context up front. Rows are right-aligned at position 0; each keeps its own length.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.export.folder import GENAI_FILE, LOGITS_TO_KEEP, META_FILE, MODEL_FILE
from lmforge.runtime.engine import Cache, Engine

# --device -> (execution provider, the pip package that brings it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
}


def is_onnx_folder(path: Path) -> bool:
    """A folder lmforge wrote, or one made for onnxruntime-genai (which lmforge also runs)."""
    return path.is_dir() and ((path / META_FILE).exists() or (path / GENAI_FILE).exists())


def meta_from_genai(folder: Path) -> dict:
    """lmforge's folder metadata derived from onnxruntime-genai's genai_config.json and graph."""
    import onnx

    cfg = json.loads((folder / GENAI_FILE).read_text())["model"]
    dec = cfg["decoder"]
    graph = onnx.load(str(folder / dec["filename"]), load_external_data=False).graph
    past = next(i for i in graph.input if i.name.startswith("past_key_values"))
    dtype = "float16" if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float32"
    eos = cfg["eos_token_id"]
    return {
        "model_file": dec["filename"],
        "n_layers": dec["num_hidden_layers"],
        "n_kv_heads": dec["num_key_value_heads"],
        "head_dim": dec["head_size"],
        "vocab_size": cfg["vocab_size"],
        "context_length": cfg["context_length"],
        "eos_token_ids": eos if isinstance(eos, list) else [eos],
        "full_logits": True,
        "dtype": dtype,
        "files": {},
    }


def folder_meta(folder: Path) -> dict:
    """The metadata of an ONNX folder (lmforge's, or derived from onnxruntime-genai's config), its
    files checked against the sizes it records; a user error for a folder that is not complete."""
    meta_path = folder / META_FILE
    if not meta_path.exists() and not (folder / GENAI_FILE).exists():
        raise LmforgeError(f"{folder} is not an ONNX folder lmforge wrote (no {META_FILE}); convert the model first")
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else meta_from_genai(folder)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise LmforgeError(f"{folder} has a damaged configuration ({e.__class__.__name__}); convert it again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
        raise LmforgeError(f"{meta_path} is not an lmforge folder description; convert the model again")
    for name, size in meta.get("files", {}).items():
        path = folder / name
        if not path.exists():
            raise LmforgeError(f"{folder} lacks {name}; the folder is incomplete: convert the model again")
        if path.stat().st_size != size:
            raise LmforgeError(f"{path} has {path.stat().st_size} bytes, expected {size}; convert the model again")
    return meta


def provider_for(device: str) -> str:
    """The execution provider name for `device`, or a user error naming the package to install."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise LmforgeError(f"unknown device {device!r}; choose one of: {', '.join(PROVIDERS)}")
    provider, package = PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise LmforgeError(
            f"device {device!r} needs ONNX Runtime's {provider}, which this install lacks; "
            f"run: pip install {package} (in place of onnxruntime)"
        )
    return provider


_CACHE_KEYS = itertools.count()
SHRINK_AFTER = 1024  # positions: prefill runs over a longer context free their arena memory at the end


def _zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero array in its own anonymous memory map: untouched pages take no memory, and the
    whole map is unmapped when the array goes (the C heap would keep or fragment it)."""
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _grown_capacity(engine: OrtEngine, capacity: int, total: int) -> int:
    """The capacity a cache of `capacity` positions grows to for `total`: doubled (at least
    `total`), at most the model's context; a user error past the context."""
    if total > engine.context_length:
        raise LmforgeError(
            f"sequence of {total} tokens exceeds the model's context of "
            f"{engine.context_length}; shorten the prompt or lower max tokens"
        )
    return min(max(total, 2 * capacity), engine.context_length)


class KVCache(Cache):
    """Per-layer K/V buffers (batch, kv_heads, capacity, head_dim) and each row's length."""

    def __init__(self, engine: OrtEngine, batch_size: int, capacity: int):
        self.engine = engine
        self.batch_size = batch_size
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self.capacity = 0
        self.buffers: list = []
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        import onnxruntime as ort

        e = self.engine
        shape = (self.batch_size, e.n_kv_heads, capacity, e.head_dim)
        new = []
        self.key = next(_CACHE_KEYS)  # a fresh identity whenever the buffers change
        for i in range(2 * e.n_layers):
            arr = np.zeros(shape, dtype=e.np_dtype)
            if self.capacity:
                arr[:, :, : self.capacity] = self.buffers[i].numpy()
            new.append(ort.OrtValue.ortvalue_from_numpy(arr, e.ort_device, 0))
        self.buffers, self.capacity = new, capacity

    def reserve(self, total: int) -> None:
        """Make room for `total` positions per row, doubling as needed."""
        if total > self.capacity:
            self._grow(_grown_capacity(self.engine, self.capacity, total))


class KVPool:
    """A fixed number of KV rows for continuous batching.

    One numpy buffer per layer and K/V, (rows, kv_heads, capacity, head_dim), and one length per
    row. Any run of consecutive rows is a cache that `prefill`/`decode` accept (`rows(start, stop)`):
    its OrtValues share the numpy memory (a contiguous slice along the batch axis, no copy on the
    CPU), so a batch can decode only its active prefix and a newcomer can prefill straight into
    its slot. Capacity is shared by all rows and doubles on demand, up to `max_capacity`. The
    buffers are anonymous memory maps: pages no row has reached take no memory, and a replaced
    buffer goes back to the system at once."""

    def __init__(self, engine: OrtEngine, n_rows: int, capacity: int = 256, max_capacity: int | None = None):
        if engine.ort_device != "cpu":  # OrtValues share numpy memory only on the CPU
            raise ValueError("KVPool needs the CPU provider")
        self.engine = engine
        self.n_rows = n_rows
        self.max_capacity = min(max_capacity or engine.context_length, engine.context_length)
        self.lengths = np.zeros(n_rows, dtype=np.int64)
        self.capacity = 0
        self.arrays: list[np.ndarray] = []  # 2 * n_layers x (rows, kv_heads, capacity, head_dim)
        self.generation = 0  # bumped whenever the arrays are replaced: views rebuild their OrtValues
        self._views: dict[tuple[int, int], KVRows] = {}
        self.resize(max(1, capacity))

    def resize(self, capacity: int) -> None:
        """Replace the buffers with ones of `capacity` positions, keeping what fits of the rows
        in use (only their used positions are copied)."""
        e = self.engine
        self.lengths = np.minimum(self.lengths, capacity)
        shape = (self.n_rows, e.n_kv_heads, capacity, e.head_dim)
        new = []
        for old in self.arrays or [None] * (2 * e.n_layers):
            arr = _zeros(shape, e.np_dtype)
            for row in np.flatnonzero(self.lengths) if old is not None else ():
                n = self.lengths[row]
                arr[row, :, :n] = old[row, :, :n]
            new.append(arr)
        self.arrays, self.capacity = new, capacity
        self.generation += 1
        self._views.clear()  # old views hold OrtValues over the old buffers: let them go

    @property
    def nbytes(self) -> int:
        """Bytes the K/V buffers span (pages no row has reached are not resident)."""
        return self.n_rows * self.capacity * self.engine.kv_bytes_per_position

    def reserve(self, total: int) -> None:
        """Make room for `total` positions per row, doubling as needed (at most `max_capacity`)."""
        if total > self.capacity:
            grown = _grown_capacity(self.engine, self.capacity, total)  # a user error past the context
            if total > self.max_capacity:
                raise ValueError(f"{total} positions exceed this pool's maximum of {self.max_capacity}")
            self.resize(min(grown, self.max_capacity))

    def rows(self, start: int, stop: int) -> KVRows:
        """Rows start..stop-1 as a cache for `OrtEngine.prefill`/`decode` (the same object for
        the same rows, so the engine's I/O binding is reused from step to step)."""
        assert 0 <= start < stop <= self.n_rows
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = KVRows(self, start, stop)
        return view

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` (its used positions) into row `dst`; `src` becomes empty."""
        n = int(self.lengths[src])
        for arr in self.arrays:  # (rows, kv_heads, capacity, head_dim)
            arr[dst, :, :n] = arr[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def clear_row(self, row: int) -> None:
        """Forget row `row` (positions past a row's length are never read)."""
        self.lengths[row] = 0

    def take_row(self, other: KVPool, src: int, dst: int) -> None:
        """Copy row `src` of another pool (its used positions) into row `dst` of this one."""
        n = int(other.lengths[src])
        self.reserve(n)
        for mine, theirs in zip(self.arrays, other.arrays):
            mine[dst, :, :n] = theirs[src, :, :n]
        self.lengths[dst] = n

    def read_positions(self, row: int, start: int, stop: int) -> np.ndarray:
        """A copy of row `row`'s positions start..stop-1, every layer's K and V:
        (2 * n_layers, kv_heads, stop - start, head_dim), in its own memory map (freed whole)."""
        assert stop <= self.lengths[row]
        out = _zeros(
            (len(self.arrays), self.engine.n_kv_heads, stop - start, self.engine.head_dim), self.engine.np_dtype
        )
        for part, arr in zip(out, self.arrays):
            part[...] = arr[row, :, start:stop]
        return out

    def write_prefix(self, row: int, blocks: list[np.ndarray]) -> None:
        """Fill row `row` from position 0 with `blocks` (each as `read_positions` returns them, in
        order) and set its length to their positions."""
        n = sum(b.shape[2] for b in blocks)
        self.reserve(n)
        pos = 0
        for b in blocks:
            m = b.shape[2]
            for arr, part in zip(self.arrays, b):
                arr[row, :, pos : pos + m] = part
            pos += m
        self.lengths[row] = n


class KVRows(Cache):
    """Consecutive rows of a KVPool with KVCache's interface (batch_size, lengths, buffers, key,
    reserve), so OrtEngine runs them unchanged. Lengths read and write the pool's."""

    def __init__(self, pool: KVPool, start: int, stop: int):
        self.pool, self.start, self.stop = pool, start, stop
        self.batch_size = stop - start
        self._generation = -1
        self._buffers: list = []
        self.key = -1

    @property
    def lengths(self) -> np.ndarray:
        return self.pool.lengths[self.start : self.stop].copy()

    @lengths.setter
    def lengths(self, value: np.ndarray) -> None:
        self.pool.lengths[self.start : self.stop] = value

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def buffers(self) -> list:
        self._refresh()
        return self._buffers

    def _refresh(self) -> None:
        """New OrtValues (and a new key for the engine's binding) once the pool was resized."""
        import onnxruntime as ort

        if self._generation != self.pool.generation:
            device = self.pool.engine.ort_device
            self._buffers = [
                ort.OrtValue.ortvalue_from_numpy(a[self.start : self.stop], device, 0) for a in self.pool.arrays
            ]
            self._generation = self.pool.generation
            self.key = next(_CACHE_KEYS)

    def reserve(self, total: int) -> None:
        self.pool.reserve(total)
        self._refresh()


@dataclass
class _Session:
    """One InferenceSession of an OrtEngine's graph, its I/O binding and the key of the cache
    whose buffers that binding holds."""

    session: object
    io: object
    bound: int | None = None


class OrtEngine(Engine):
    """An InferenceSession over `folder/model.onnx` with an in-place KV cache."""

    def __init__(
        self,
        folder: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        full_logits: bool = False,
        session_config: dict[str, str] | None = None,
    ):
        """Open `folder` on `device` with `threads` intra-op threads; `full_logits` picks the graph
        that returns every position's logits (evaluation) instead of the last position's;
        `session_config` adds ONNX Runtime session config entries (e.g. no spinning threads)."""
        import onnxruntime as ort

        folder = Path(folder)
        meta = folder_meta(folder)
        self.folder, self.meta, self.device = folder, meta, device
        self.n_layers, self.n_kv_heads, self.head_dim = meta["n_layers"], meta["n_kv_heads"], meta["head_dim"]
        self.vocab_size = meta["vocab_size"]
        self.context_length = min(meta["context_length"], meta.get("max_positions") or meta["context_length"])
        self.eos_token_ids = tuple(meta["eos_token_ids"])
        model_file = meta.get("model_file", MODEL_FILE)
        if full_logits and not meta.get("full_logits"):
            if "full_file" not in meta:
                raise LmforgeError(f"{folder} has no graph with every position's logits; convert the model again")
            model_file = meta["full_file"]
        self.full_logits = full_logits or bool(meta.get("full_logits"))
        self.np_dtype = np.float16 if meta["dtype"] == "float16" else np.float32
        self.ort_device = "cuda" if device == "cuda" else "cpu"
        self.model_path, self.threads = folder / model_file, threads
        self.session = self._open(session_config)
        self.io = self.session.io_binding()
        # further sessions of the same graph with other thread settings (`add_session`): each with
        # its own binding; `use(i)` picks the one the next passes run on (0: the first)
        self.sessions: list[_Session] = [_Session(self.session, self.io)]
        inputs = {i.name for i in self.session.get_inputs()}
        self.needs_positions = "position_ids" in inputs
        # verify k drafted tokens in one pass: a graph that returns the last n positions' logits
        # (lmforge's model.onnx since format 3) or every position's
        self._keeps = LOGITS_TO_KEEP in inputs and not self.full_logits
        self.supports_verify = self._keeps or self.full_logits
        # MatMulNBits' int8 compute (accuracy_level 4) rounds one row (decode) differently from
        # several (prefill, verify): verified tokens then need not be the ones plain decoding picks
        quant = meta.get("quant", {"accuracy_level": 4})  # a folder not ours: assume its builder's int8
        self.exact_verify = self.supports_verify and (quant is None or quant.get("accuracy_level", 0) < 4)
        self._bound = None  # key of the cache whose buffers the binding holds
        self.passes = 0  # forward passes run (the server's SessionChooser tells decode cycles by it)
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
        # On the CPU the logits go into a buffer we own, kept while decode steps keep its shape:
        # reading them back through get_outputs() would wrap all 2 * n_layers + 1 outputs (~150 us
        # a step)
        self._logits_buf: tuple[np.ndarray, object] | None = None
        # a prefill over a long context takes large activations from ONNX Runtime's arena; giving
        # them back at the end of that run keeps the arena from staying at its peak
        self._shrink_options = ort.RunOptions()
        self._shrink_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def _open(self, session_config: dict[str, str] | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        try:
            return ort.InferenceSession(str(self.model_path), options, providers=[provider_for(self.device)])
        except LmforgeError:
            raise
        except Exception as e:
            raise LmforgeError(f"ONNX Runtime cannot load {self.folder}: {str(e).splitlines()[0][:200]}") from None

    def add_session(self, session_config: dict[str, str]) -> int:
        """Open the same graph again with other session config entries (e.g. threads that spin);
        returns its index for `use`. Same kernels, same thread count: the same numbers."""
        session = self._open(session_config)
        self.sessions.append(_Session(session, session.io_binding()))
        return len(self.sessions) - 1

    def use(self, index: int) -> None:
        """Run the next passes on session `index` (its binding remembers which cache it holds)."""
        target = self.sessions[index]
        if target.session is not self.session:
            for entry in self.sessions:  # park the current binding's cache key with its session
                if entry.session is self.session:
                    entry.bound = self._bound
            self.session, self.io, self._bound = target.session, target.io, target.bound

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        """An empty cache for `batch_size` rows sized for `capacity` positions per row."""
        return KVCache(self, batch_size, min(capacity, self.context_length))

    def new_pool(self, n_rows: int, capacity: int = 256, max_capacity: int | None = None) -> KVPool:
        """A pool of `n_rows` KV rows for continuous batching (see KVPool), growing to at most
        `max_capacity` positions per row (default: the context)."""
        return KVPool(self, n_rows, min(capacity, self.context_length), max_capacity)

    @property
    def kv_bytes_per_position(self) -> int:
        """K and V bytes one position of one row takes over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * np.dtype(self.np_dtype).itemsize

    def release(self) -> None:
        """Drop the I/O binding's hold on the last cache's buffers and the kept logits buffer, so
        memory a finished sequence used can go back to the system."""
        for entry in self.sessions:
            entry.io.clear_binding_inputs()
            entry.io.clear_binding_outputs()
            entry.bound = None
        self._bound = None
        self._logits_buf = None

    def _forward(
        self, cache: KVCache, input_ids: np.ndarray, new_lengths: np.ndarray, reuse: bool = False, keep: int = 1
    ) -> np.ndarray:
        """One forward pass: rows append `new_lengths` tokens of `input_ids` (right-padded);
        returns the graph's logits (B, S|keep, V) (the full graph's, or the last `keep` positions'),
        in a buffer the next call overwrites if `reuse`."""
        totals = cache.lengths + new_lengths
        cache.reserve(int(totals.max()))
        mask = (np.arange(int(totals.max()))[None, :] < totals[:, None]).astype(np.int64)
        io = self.io
        if self._bound != cache.key:  # KV buffers change only when a cache grows
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            io.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
            for i in range(self.n_layers):
                for j, kv in enumerate(("key", "value")):
                    buf = cache.buffers[2 * i + j]
                    io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buf)
                    io.bind_ortvalue_output(f"present.{i}.{kv}", buf)
            self._bound = cache.key
        out = None
        if self.ort_device == "cpu":
            out = self._logits_out(
                (input_ids.shape[0], input_ids.shape[1] if self.full_logits else keep, self.vocab_size), reuse
            )
            io.bind_ortvalue_output("logits", out[1])
        else:
            io.bind_output("logits", "cpu")
        io.bind_cpu_input("input_ids", input_ids)
        io.bind_cpu_input("attention_mask", mask)
        if self._keeps:
            io.bind_cpu_input(LOGITS_TO_KEEP, np.array([keep], dtype=np.int64))
        if self.needs_positions:  # rows continue from their own lengths; padding repeats the last one
            pos = cache.lengths[:, None] + np.minimum(np.arange(input_ids.shape[1])[None, :], new_lengths[:, None] - 1)
            io.bind_cpu_input("position_ids", pos.astype(np.int64))
        long_prefill = input_ids.shape[1] > 1 and int(totals.max()) > SHRINK_AFTER
        self.session.run_with_iobinding(io, self._shrink_options if long_prefill else None)
        self.passes += 1
        cache.lengths = totals
        return out[0] if out is not None else io.get_outputs()[0].numpy()

    def _logits_out(self, shape: tuple[int, ...], reuse: bool) -> tuple[np.ndarray, object]:
        """A logits array of `shape` and its OrtValue: with `reuse`, the last single-position
        one (decode steps) when the shape matches, and kept for the next step; else a fresh one."""
        import onnxruntime as ort

        out = self._logits_buf
        if not (reuse and out is not None and out[0].shape == shape):
            arr = np.empty(shape, dtype=self._logits_dtype)
            out = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
            if reuse and shape[1] == 1:
                self._logits_buf = out
        return out

    def _run(self, cache: KVCache, input_ids: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """`_forward`, keeping each row's last new position: float32 (B, V)."""
        logits = self._forward(cache, input_ids, new_lengths, reuse=True)
        if self.full_logits:  # fancy indexing copies
            return logits[np.arange(len(new_lengths)), np.maximum(new_lengths - 1, 0)].astype(np.float32, copy=False)
        return np.array(logits[:, -1], dtype=np.float32)  # a copy: decode steps reuse the logits buffer

    def prefill(self, cache: KVCache, token_ids: list[list[int]]) -> np.ndarray:
        """Append each row's prompt; returns (batch, vocab) logits of each row's last token."""
        if len(token_ids) != cache.batch_size:
            raise ValueError("one token list per cache row")
        n = np.array([len(t) for t in token_ids], dtype=np.int64)
        if (n == 0).any():
            raise LmforgeError("empty prompt: give at least one token")
        ids = np.zeros((len(token_ids), int(n.max())), dtype=np.int64)
        for r, t in enumerate(token_ids):
            ids[r, : len(t)] = t
        return self._run(cache, ids, n)

    def score(self, token_ids: list[int]) -> np.ndarray:
        """Logits (S, vocab) at every position of one sequence, from an empty cache; needs the
        full-logits graph (OrtEngine(..., full_logits=True))."""
        if not self.full_logits:
            raise ValueError("score() needs the engine opened with full_logits=True")
        ids = np.asarray([token_ids], dtype=np.int64)
        logits = self._forward(self.new_cache(1, len(token_ids)), ids, np.array([len(token_ids)]))
        return logits[0].astype(np.float32, copy=False)

    def decode(self, cache: KVCache, token_ids: list[int]) -> np.ndarray:
        """Append one token per row; returns (batch, vocab) logits."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        return self._run(cache, ids, np.ones(len(ids), dtype=np.int64))

    def verify(self, cache: KVCache, token_ids: list[int]) -> np.ndarray:
        """Append k tokens to a one-row cache in one pass; returns float32 logits (k, vocab), row
        i the next-token logits after token i (speculative decoding checks its drafts on them)."""
        if not self.supports_verify:
            raise LmforgeError(f"{self.folder}'s graph returns one position's logits; convert the model again")
        k = len(token_ids)
        ids = np.asarray([token_ids], dtype=np.int64)
        logits = self._forward(cache, ids, np.array([k], dtype=np.int64), keep=k)
        return np.array(logits[0, -k:], dtype=np.float32)

    def truncate(self, cache: KVCache, row: int, length: int) -> None:
        """Forget row `row`'s positions from `length` on (rejected drafts): positions past a row's
        length are never read, so this is exact and free."""
        assert 0 <= length <= cache.lengths[row]
        lengths = cache.lengths.copy()
        lengths[row] = length
        cache.lengths = lengths

    # ---- a one-row cache as tensors, for prompt cache files (lmforge.prompt_cache) ---------------
    def state_identity(self) -> tuple[list[Path], dict[str, str]]:
        """The files whose bytes make this model's KV (graphs and weights), and what else the KV
        depends on: a saved cache is loaded only where both match."""
        files = [self.folder / name for name in sorted(self.meta.get("files") or {})]
        import onnxruntime as ort

        info = {"engine": "ort", "device": self.device, "dtype": np.dtype(self.np_dtype).name}
        info["onnxruntime"] = ort.__version__  # another version's kernels may round the KV otherwise
        shape = {k: str(getattr(self, k)) for k in ("n_layers", "n_kv_heads", "head_dim", "vocab_size")}
        return files or sorted(self.folder.glob("*.onnx*")), {**info, **shape}

    def _kv_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.n_layers) for kv in ("key", "value")]

    def kv_tensors(self, cache: KVCache) -> dict[str, np.ndarray]:
        """Row 0's positions in use, by the graph's input names: (kv_heads, length, head_dim) each."""
        n = int(cache.lengths[0])
        return {name: np.ascontiguousarray(buf.numpy()[0, :, :n]) for name, buf in zip(self._kv_names(), cache.buffers)}

    def cache_from_kv(self, tensors: dict[str, np.ndarray], length: int, capacity: int) -> KVCache:
        """A one-row cache holding `tensors` (as `kv_tensors` returns them) as its first `length`
        positions, with room for `capacity`; ValueError when they do not fit this model."""
        names = self._kv_names()
        want = (self.n_kv_heads, length, self.head_dim)
        for name in names:
            t = tensors.get(name)
            if t is None or t.shape != want or t.dtype != self.np_dtype:
                raise ValueError(f"{name} is not {self.np_dtype.__name__} of shape {want}")
        if set(tensors) != set(names):
            raise ValueError(f"unexpected tensors {sorted(set(tensors) - set(names))[:3]}")
        import onnxruntime as ort

        cache = self.new_cache(1, max(length, capacity))
        for k, name in enumerate(names):
            arr = np.zeros((1, self.n_kv_heads, cache.capacity, self.head_dim), dtype=self.np_dtype)
            arr[0, :, :length] = tensors[name]
            cache.buffers[k] = ort.OrtValue.ortvalue_from_numpy(arr, self.ort_device, 0)
        cache.lengths[0] = length
        return cache
