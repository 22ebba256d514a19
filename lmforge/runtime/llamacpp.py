"""llama.cpp engine over llama-cpp-python's low-level C API (extra `llamacpp`).

Same protocol as the ONNX Runtime engine: `new_cache` / `prefill` / `decode`, logits out, and
sampling stays in lmforge (`generate_step`). Cache rows are llama.cpp sequence ids in one
context; the context is sized to the request (rows x capacity) and reused while big enough.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from lmforge.errors import CheckpointError, LmforgeError, UnsupportedArchitectureError
from lmforge.runtime.engine import Cache, Engine

DEVICES = ("cpu", "cuda")
KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml_type ids
_quiet_logger = None  # keeps the ctypes callback alive while llama.cpp holds it


_last_error = [""]  # llama.cpp's latest warning or error line, for our messages


def _import():
    try:
        import llama_cpp
    except ImportError:
        raise LmforgeError(
            "the llama.cpp engine needs llama-cpp-python; run: pip install 'lmforge[llamacpp]'"
        ) from None
    except (OSError, RuntimeError) as e:  # the package is there but its shared library does not load
        raise LmforgeError(
            f"llama-cpp-python is installed but does not load ({str(e).splitlines()[0][:160]}); reinstall it"
        ) from None
    return llama_cpp


def supports_gpu_offload() -> bool:
    """Whether the installed llama-cpp-python is a GPU (e.g. CUDA) build; a user error when it is missing."""
    return bool(_import().llama_supports_gpu_offload())


def _keep_errors(level: int, text: bytes, user) -> None:
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR
        _last_error[0] = text.decode(errors="replace").strip()


def _silence(llama_cpp) -> None:
    """Route llama.cpp's log lines (its loader prints hundreds on stderr) to nowhere, keeping
    the latest warning or error to explain a failure."""
    global _quiet_logger
    if _quiet_logger is None:
        _quiet_logger = llama_cpp.llama_log_callback(_keep_errors)
        llama_cpp.llama_log_set(_quiet_logger, ctypes.c_void_p(0))


def _why() -> str:
    """' (llama.cpp: <its last complaint>)', or '' when it said nothing."""
    reason, _last_error[0] = _last_error[0], ""
    return f" (llama.cpp: {reason[:160]})" if reason else ""


def check_before_load(path: Path) -> None:
    """A CheckpointError unless the GGUF's structure and the metadata llama.cpp sizes the model
    by are sound: llama.cpp asserts (aborting the process) on values such as a negative epsilon.
    Families lmforge reads get its full reader's checks (shapes against hyper-parameters too)."""
    from lmforge.arch import get_gguf_arch
    from lmforge.checkpoint.gguf import GGUFCheckpoint
    from lmforge.checkpoint.gguf_format import parse
    from lmforge.checkpoint.validate import check_gguf_keys, check_gguf_vocab, check_llamacpp_types

    meta, entries, mm = parse(path)
    mm.close()
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"{path} has no general.architecture; it is not a model GGUF")
    check_gguf_keys(meta, arch, path)
    check_gguf_vocab(meta, path)
    check_llamacpp_types(entries, path)
    try:
        get_gguf_arch(arch, lambda key, default=None: meta.get(f"{arch}.{key}", default))
    except UnsupportedArchitectureError:
        return  # llama.cpp may know it; its generic keys were checked above
    GGUFCheckpoint(path)  # its checks are the point; the memory map closes with it


class LlamaCppCache(Cache):
    """Rows of one llama.cpp context (sequence ids 0..batch_size-1) and each row's length."""

    def __init__(self, engine: LlamaCppEngine, batch_size: int, capacity: int):
        self.engine = engine
        self.batch_size = batch_size
        self.capacity = capacity
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self.generation = engine._generation


class LlamaCppEngine(Engine):
    """A GGUF file in llama.cpp. One cache is live at a time: `new_cache` clears the context."""

    # one-row decodes write KV unlike a prefill of the same tokens, even with an f32 cache (the
    # default Q4_1 model: next logits 2.5% apart, relative): a kept prefix cache holds only what
    # prefill wrote (the engines default to `exact_verify` here)
    decoded_kv_exact = False

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        n_gpu_layers: int | None = None,
        n_batch: int = 512,
        kv_type: str = "f16",
    ):
        """Open the GGUF at `path`; `device` cuda offloads `n_gpu_layers` (default all) to the
        GPU of a CUDA build of llama.cpp; `threads` for prompt and generation (default: all cores);
        `kv_type` f16 (llama.cpp's default), f32 (exact comparisons: also turns flash attention
        off, whose CPU kernel rounds to f16) or q8_0 for the KV cache."""
        llama_cpp = _import()
        self._lib = llama_cpp
        if device not in DEVICES:
            raise LmforgeError(
                f"the llama.cpp engine runs on {' or '.join(DEVICES)}, not {device!r}; "
                "use --engine ort for other devices"
            )
        if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise LmforgeError(
                "this llama-cpp-python was built without GPU support; reinstall it with "
                'CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python --no-binary llama-cpp-python'
            )
        if kv_type not in KV_TYPES:
            raise LmforgeError(f"unknown KV cache type {kv_type!r}; choose one of: {', '.join(KV_TYPES)}")
        self.kv_type, self.kv_type_name = KV_TYPES[kv_type], kv_type
        # an f16 cache (flash attention) rounds a batch of positions unlike one: only an f32 cache
        # makes verified tokens exactly those of plain decoding
        self.exact_verify = kv_type == "f32"
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"{path} does not exist; give a .gguf file")
        check_before_load(path)
        _silence(llama_cpp)
        _last_error[0] = ""
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = (n_gpu_layers if n_gpu_layers is not None else 999) if device == "cuda" else 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise LmforgeError(
                f"llama.cpp cannot load {path}{_why()}; is it a complete GGUF file of a supported model?"
            )
        self.path, self.device = path, device
        self.threads = threads or os.cpu_count() or 1
        self.n_batch = n_batch
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.context_length = int(llama_cpp.llama_model_n_ctx_train(self.model))
        eos = [llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)]
        self.eos_token_ids = tuple(dict.fromkeys(int(t) for t in eos if t >= 0))
        self.ctx = None
        self._ctx_rows = self._ctx_capacity = 0
        self._generation = 0
        self._batch = None
        self._batch_size = 0

    # ---- context and batch management ---------------------------------------------------------
    def _context(self, rows: int, capacity: int) -> None:
        """Make the context hold `rows` sequences of `capacity` positions each (recreated if smaller)."""
        lib = self._lib
        if self.ctx is not None and rows <= self._ctx_rows and capacity <= self._ctx_capacity:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            return
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        capacity = min(self.context_length, -(-capacity // 256) * 256)  # whole pages, fewer re-creations
        params = lib.llama_context_default_params()
        params.n_ctx = rows * capacity
        params.n_seq_max = rows
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True
        params.type_k = params.type_v = self.kv_type
        if self.kv_type == KV_TYPES["f32"]:
            params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise LmforgeError(
                f"llama.cpp cannot make a context of {rows} rows x {capacity} tokens{_why()}; "
                "ask for fewer rows or tokens"
            )
        self._ctx_rows, self._ctx_capacity = rows, capacity

    def _llama_batch(self, n: int):
        lib = self._lib
        if n > self._batch_size:
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
            self._batch = lib.llama_batch_init(n, 0, max(1, self._ctx_rows))
            self._batch_size = n
        return self._batch

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> LlamaCppCache:
        """An empty cache of `batch_size` rows for `capacity` positions each; earlier caches die."""
        capacity = min(capacity, self.context_length)
        self._context(batch_size, capacity)
        self._generation += 1
        return LlamaCppCache(self, batch_size, self._ctx_capacity)

    def cache_is_live(self, cache: LlamaCppCache) -> bool:
        """Whether `cache` is this engine's newest (a later new_cache or score cleared it)."""
        return cache.engine is self and cache.generation == self._generation and self.ctx is not None

    def _check_live(self, cache: LlamaCppCache) -> None:
        if not self.cache_is_live(cache):
            raise LmforgeError("this cache belongs to an earlier request; make a new one with new_cache()")

    def _room(self, cache: LlamaCppCache, totals: np.ndarray) -> np.ndarray:
        """`totals` (each row's length after a step), a user error when they do not fit `cache`."""
        self._check_live(cache)
        if totals.max() > cache.capacity:
            raise LmforgeError(
                f"sequence of {int(totals.max())} tokens exceeds this cache's {cache.capacity} positions; "
                "make the cache with a larger capacity"
            )
        return totals

    def _run(self, cache: LlamaCppCache, rows: list[list[int]]) -> np.ndarray:
        """Append each row's tokens (llama.cpp batches of at most n_batch tokens); returns the
        float32 logits (rows, vocab) of each row's last token."""
        lib = self._lib
        totals = self._room(cache, cache.lengths + np.array([len(r) for r in rows]))
        flat = [(r, i, t) for r, ids in enumerate(rows) for i, t in enumerate(ids)]
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start : start + self.n_batch]
            batch = self._llama_batch(len(chunk))
            batch.n_tokens = len(chunk)
            last = {}
            for k, (r, i, t) in enumerate(chunk):
                batch.token[k] = t
                batch.pos[k] = int(cache.lengths[r]) + i
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = r
                is_last = i == len(rows[r]) - 1
                batch.logits[k] = is_last
                if is_last:
                    last[r] = k
            rc = lib.llama_decode(self.ctx, batch)
            if rc == 1:
                raise LmforgeError(
                    f"llama.cpp found no room in its KV cache for {len(chunk)} tokens{_why()}; "
                    "make the cache with a larger capacity"
                )
            if rc != 0:
                raise LmforgeError(f"llama.cpp failed to decode a batch (code {rc}){_why()}")
            for r, k in last.items():
                ptr = lib.llama_get_logits_ith(self.ctx, k)
                out[r] = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))
        cache.lengths = totals
        return out

    def score(self, token_ids: list[int]) -> np.ndarray:
        """Logits (S, vocab) at every position of one sequence, from an empty cache (as
        llama-perplexity reads them); earlier caches die."""
        lib = self._lib
        ids = [int(t) for t in token_ids]
        self.new_cache(1, len(ids))
        out = np.empty((len(ids), self.vocab_size), dtype=np.float32)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            batch = self._llama_batch(len(chunk))
            batch.n_tokens = len(chunk)
            for k, t in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = t, start + k, 1, True
                batch.seq_id[k][0] = 0
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise LmforgeError(f"llama.cpp failed to decode a batch (code {rc}){_why()}")
            logits = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(len(chunk), self.vocab_size))
            out[start : start + len(chunk)] = logits
        return out

    def prefill(self, cache: LlamaCppCache, token_ids: list[list[int]]) -> np.ndarray:
        """Append each row's prompt; returns (batch, vocab) logits of each row's last token."""
        if len(token_ids) != cache.batch_size:
            raise ValueError("one token list per cache row")
        if any(len(t) == 0 for t in token_ids):
            raise LmforgeError("empty prompt: give at least one token")
        return self._run(cache, [list(map(int, t)) for t in token_ids])

    def decode(self, cache: LlamaCppCache, token_ids: list[int]) -> np.ndarray:
        """Append one token per row; returns (batch, vocab) logits."""
        if len(token_ids) != cache.batch_size:
            raise ValueError("one token per cache row")
        return self._run(cache, [[int(t)] for t in token_ids])

    supports_verify = True

    def verify(self, cache: LlamaCppCache, token_ids: list[int]) -> np.ndarray:
        """Append k tokens to a one-row cache in one llama_batch with logits at every position;
        returns float32 logits (k, vocab), row i the next-token logits after token i."""
        lib, k = self._lib, len(token_ids)
        if not 0 < k <= self.n_batch:
            raise LmforgeError(f"verify takes 1 to {self.n_batch} tokens (n_batch), got {k}; draft fewer tokens")
        base = int(cache.lengths[0])
        totals = self._room(cache, cache.lengths + k)
        batch = self._llama_batch(k)
        batch.n_tokens = k
        for i, t in enumerate(token_ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(t), base + i, 1, True
            batch.seq_id[i][0] = 0
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise LmforgeError(f"llama.cpp failed to decode a batch (code {rc}){_why()}")
        cache.lengths = totals
        return np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(k, self.vocab_size)).copy()

    def truncate(self, cache: LlamaCppCache, row: int, length: int) -> None:
        """Remove row `row`'s positions from `length` on from llama.cpp's KV cache (seq_rm)."""
        assert 0 <= length <= cache.lengths[row]
        self._check_live(cache)
        if not self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), row, length, -1):
            raise LmforgeError(f"llama.cpp cannot remove positions {length}.. of a sequence{_why()}")
        cache.lengths[row] = length

    # ---- a one-row cache as tensors, for prompt cache files (lmforge.prompt_cache) ---------------
    def state_identity(self) -> tuple[list[Path], dict[str, str]]:
        """The GGUF file, and what else the saved sequence state depends on (llama.cpp's own
        state format changes between versions)."""
        n_layers = int(self._lib.llama_model_n_layer(self.model))
        info = {"engine": "llamacpp", "device": self.device, "dtype": self.kv_type_name, "n_layers": str(n_layers)}
        version = getattr(self._lib, "__version__", "unknown")
        return [self.path], {**info, "vocab_size": str(self.vocab_size), "llama_cpp": version}

    def kv_tensors(self, cache: LlamaCppCache) -> dict[str, np.ndarray]:
        """Row 0's KV as llama.cpp's sequence state (llama_state_seq_get_data): a byte copy of its
        cells, so restoring it is exact."""
        lib = self._lib
        self._check_live(cache)
        size = lib.llama_state_seq_get_size(self.ctx, 0)
        blob = np.empty(size, dtype=np.uint8)
        n = lib.llama_state_seq_get_data(self.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0)
        return {"llama_state_seq": blob[:n]}

    def cache_from_kv(self, tensors: dict[str, np.ndarray], length: int, capacity: int) -> LlamaCppCache:
        """A one-row cache (earlier caches die) restored from `kv_tensors`' state, holding
        `length` positions, with room for `capacity`; ValueError when llama.cpp refuses it."""
        lib = self._lib
        blob = tensors.get("llama_state_seq")
        if set(tensors) != {"llama_state_seq"} or blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError("it holds no llama.cpp sequence state")
        cache = self.new_cache(1, max(length, capacity))
        blob = np.ascontiguousarray(blob)
        ok = lib.llama_state_seq_set_data(self.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), blob.size, 0)
        memory = lib.llama_get_memory(self.ctx)
        if not ok or lib.llama_memory_seq_pos_max(memory, 0) != length - 1:
            lib.llama_memory_clear(memory, True)
            raise ValueError(f"llama.cpp cannot restore its {length} positions{_why()}")
        cache.lengths[0] = length
        return cache

    def close(self) -> None:
        """Free the context, batch and model (also done when the engine is collected)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass
