"""Prompt cache files (`lmforge run --prompt-cache FILE`): a saved prefix loaded by a fresh engine
gives the logits of a fresh prefill (1e-5), on ONNX Runtime (fp32 and int4) and llama.cpp; the
second run prefills only the new part and prints what plain runs print; files of another model,
another version, truncated or damaged ones, and paths that cannot be written end in one line and
exit 2 with the file untouched; a save killed at any moment leaves the old file or the new one."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lmforge.generate import PrefixCache, SequenceState, _open_cache, stream_generate
from lmforge.prompt_cache import _tensor_digest, read_prompt_cache, write_prompt_cache
from lmforge.runtime.ort import OrtEngine
from lmforge.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from tests.test_errors import assert_user_error, run_cli
from tests.test_speculative import _close, _code_prompt

PROMPT = "Explain in two sentences what a prompt cache is."
LONGER = PROMPT + " Then give one example of where it helps."


def _engine(kind, default_onnx, int4_folder, default_model_path):
    if kind == "llamacpp":
        pytest.importorskip("llama_cpp")
        from lmforge.runtime.llamacpp import LlamaCppEngine

        return LlamaCppEngine(default_model_path, threads=2, kv_type="f32")  # f32: exact comparisons
    return OrtEngine(default_onnx if kind == "ort" else int4_folder, threads=2)


@pytest.mark.parametrize("kind", ["ort", "ort-int4", "llamacpp"])
def test_a_loaded_cache_gives_a_fresh_prefills_logits(kind, tmp_path, default_onnx, int4_folder, default_model_path):
    """Saved by one engine, loaded by another of the same model (as a second process would):
    the next prompt's first logits equal a fresh prefill's; generated tokens are in the file
    only where decoding writes what prefill would (fp32 ONNX)."""
    engines = (_engine(kind, default_onnx, int4_folder, default_model_path) for _ in range(3))
    ids = Tokenizer.from_folder(default_onnx).encode(_code_prompt())
    saver, path = next(engines), tmp_path / "cache.safetensors"
    prefix = PrefixCache()
    reply = [r.token for r in stream_generate(saver, None, ids[:60], SamplingParams(max_tokens=16), (), prefix)]
    kept = 60 + 15 if kind == "ort" else 60  # the last token sampled was never fed
    assert prefix.tokens == (ids[:60] + reply)[:kept]
    assert write_prompt_cache(path, saver, prefix) == kept
    del saver, prefix
    engine = next(engines)
    second = ids[:60] + reply + ids[130:150]
    loaded = read_prompt_cache(path, engine, len(second) + 8)
    assert loaded.tokens == (ids[:60] + reply)[:kept]
    state = SequenceState(None, second, SamplingParams(max_tokens=8), ())
    cache, n = _open_cache(engine, state, loaded)
    assert n == kept and loaded.reused == kept
    logits = engine.prefill(cache, [second[n:]])[0]
    fresh = next(engines)
    _close(logits, fresh.prefill(fresh.new_cache(1, 200), [second])[0])


def _reused(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"prompt cache: reused (\d+) of (\d+) tokens from .*; saved (\d+)", stderr)
    assert m, stderr
    return int(m[1]), int(m[2]), int(m[3])


def _shared(model, a: str, b: str) -> int:
    """The prompt tokens a run of `b` takes from a cache `a` left: the common prefix, two short of b."""
    x, y = model.prompt_ids(a), model.prompt_ids(b)
    n = 0
    while n < min(len(x), len(y) - 2) and x[n] == y[n]:
        n += 1
    return n


@pytest.mark.parametrize("form", ["int4", "gguf"])
def test_cli_second_run_prefills_only_the_new_part(form, tmp_path, int4_folder, default_model_path):
    """ONNX Runtime (cpu-int4) and llama.cpp (its default f16 cache): the text equals a run
    without the cache, greedy; the file then holds the second prompt."""
    from lmforge.model import load

    model = int4_folder if form == "int4" else default_model_path
    path = tmp_path / "prompt.cache"
    common = ("--max-tokens", "24", "--threads", "2")
    first = run_cli("run", model, "-p", PROMPT, "--prompt-cache", path, "-v", *common)
    assert first.returncode == 0, first.stderr
    reused, whole, saved = _reused(first.stderr)
    assert reused == 0 and saved == whole > 10  # replies are decoded one row at a time: not kept here
    second = run_cli("run", model, "-p", LONGER, "--prompt-cache", path, "-v", *common)
    plain = run_cli("run", model, "-p", LONGER, *common)
    assert second.returncode == 0 and plain.returncode == 0, second.stderr + plain.stderr
    assert second.stdout == plain.stdout and len(second.stdout.split()) > 10
    reused, whole, saved = _reused(second.stderr)
    assert reused == _shared(load(model), PROMPT, LONGER) > 10 and saved == whole > reused
    with safe_open(path, "np") as f:
        assert f.get_tensor("tokens").tolist() == load(model).prompt_ids(LONGER)


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory, int4_folder):
    """A good prompt cache file of the int4 form (PROMPT), and its bytes."""
    path = tmp_path_factory.mktemp("saved") / "good.cache"
    r = run_cli("run", int4_folder, "-p", PROMPT, "--max-tokens", "4", "--threads", "2", "--prompt-cache", path)
    assert r.returncode == 0, r.stderr
    return path, path.read_bytes()


def _bad_file(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _refused(model, path, digest, *needles):
    r = run_cli("run", model, "-p", LONGER, "--max-tokens", "4", "--threads", "2", "--prompt-cache", path)
    assert_user_error(r, *needles)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the file was overwritten"
    assert not list(path.parent.glob(".*")), "a temporary file stayed"


def _rewritten(path, **metadata) -> tuple[dict, bytes]:
    """The tensors of cache file `path` written again with its metadata updated."""
    with safe_open(path, "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, **metadata})
    return tensors, path.read_bytes()


def test_bad_cache_files_are_refused_and_kept(tmp_path, saved_cache, int4_folder, default_onnx, tiny_factory):
    good_path, good = saved_cache
    size = len(good)
    for name, data, needle in (
        ("truncated", good[: size // 2], "not a complete prompt cache"),
        ("header-only", good[:100], "not a complete prompt cache"),
        ("empty", b"", "not a complete prompt cache"),
        ("garbage", os.urandom(4096), "not a complete prompt cache"),
        ("flipped", good[:-50] + bytes(b ^ 0xFF for b in good[-50:]), "checksum"),
    ):
        _refused(int4_folder, *_bad_file(tmp_path, name, data), needle, "remove it")
    version = tmp_path / "version"
    version.write_bytes(good)
    _refused(int4_folder, version, hashlib.sha256(_rewritten(version, version="2")[1]).hexdigest(), "version '2'")
    other = tmp_path / "other-model"  # another model's file: a tiny Llama with the same tokenizer
    tiny = tiny_factory(("llama", "float32", False, None))
    r = run_cli("run", tiny, "-p", PROMPT, "--max-tokens", "2", "--prompt-cache", other)
    assert r.returncode == 0, r.stderr
    _refused(int4_folder, other, hashlib.sha256(other.read_bytes()).hexdigest(), "another model", "remove it")
    fp32 = tmp_path / "fp32"  # the same model in another form: other weights, other KV
    r = run_cli("run", default_onnx, "-p", PROMPT, "--max-tokens", "2", "--threads", "2", "--prompt-cache", fp32)
    assert r.returncode == 0, r.stderr
    _refused(int4_folder, fp32, hashlib.sha256(fp32.read_bytes()).hexdigest(), "model_digest")
    _refused(default_onnx, good_path, hashlib.sha256(good).hexdigest(), "another model")
    nan = tmp_path / "nan"  # well formed, its checksum recomputed, a NaN in its KV
    with safe_open(good_path, "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k != "tokens")
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    save_file(tensors, nan, metadata={**meta, "sha256": _tensor_digest(tensors)})
    _refused(int4_folder, nan, hashlib.sha256(nan.read_bytes()).hexdigest(), "NaN")


def test_paths_that_cannot_be_written_are_refused_before_generating(tmp_path, int4_folder):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for path, needle in (
        (tmp_path / "missing" / "c.cache", "No such file"),
        (a_file / "c.cache", "Not a directory"),
        ("/proc/c.cache", "cannot write"),
        (tmp_path, "is a folder"),
        ("", "is empty"),
    ):
        r = run_cli("run", int4_folder, "-p", PROMPT, "--max-tokens", "4", "--prompt-cache", path)
        assert_user_error(r, "--prompt-cache", needle)  # nothing on stdout: no text was generated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_killed_save_leaves_the_old_file_or_the_new_one(tmp_path, saved_cache, int4_folder):
    """Killed while its complete temporary file waits to replace FILE: FILE is the old file; the
    next run removes the leftover and saves its own."""
    path = tmp_path / "kept.cache"
    path.write_bytes(saved_cache[1])
    env = {**os.environ, "LMFORGE_TEST_SLOW_REPLACE": "30"}
    cmd = [sys.executable, "-m", "lmforge", "run", str(int4_folder), "-p", LONGER, "--max-tokens", "4"]
    out = subprocess.DEVNULL
    proc = subprocess.Popen([*cmd, "--prompt-cache", str(path)], env=env, stdout=out, stderr=out)
    tmp = tmp_path / f".kept.cache.tmp-{proc.pid}"
    deadline = time.time() + 120
    while not tmp.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.exists() and path.read_bytes() == saved_cache[1]
    r = run_cli("run", int4_folder, "-p", LONGER, "--max-tokens", "4", "--prompt-cache", path, "-v")
    assert r.returncode == 0, r.stderr
    assert _reused(r.stderr)[0] > 10 and not tmp.exists()
    with safe_open(path, "np") as f:
        assert len(f.get_tensor("tokens")) == _reused(r.stderr)[2]


def test_a_full_disk_at_save_time_leaves_the_old_file(tmp_path, saved_cache, int4_folder):
    """RLIMIT_FSIZE below the file's size: one line, exit 2, the old file whole, no leftover."""
    import resource

    path = tmp_path / "full.cache"
    path.write_bytes(saved_cache[1])
    limit = len(saved_cache[1]) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "run", str(int4_folder), "-p", LONGER, "--max-tokens", "4"]
        + ["--prompt-cache", str(path)],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert r.returncode == 2 and "cannot write --prompt-cache" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert path.read_bytes() == saved_cache[1] and sorted(tmp_path.iterdir()) == [path]


def test_tensor_layout_is_checked(tmp_path, default_onnx):
    """A file whose metadata matches but whose tensors do not fit (a rewritten checksum) is refused."""
    from lmforge.prompt_cache import PromptCacheError, _tensor_digest

    engine = OrtEngine(default_onnx, threads=2)
    prefix = PrefixCache()
    list(stream_generate(engine, None, list(range(100, 120)), SamplingParams(max_tokens=2), (), prefix))
    path = tmp_path / "c.cache"
    write_prompt_cache(path, engine, prefix)
    with safe_open(path, "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["past_key_values.0.key"] = np.zeros((3, 5, 64), np.float32)
    save_file(tensors, str(path), metadata={**meta, "sha256": _tensor_digest(tensors)})
    with pytest.raises(PromptCacheError, match="is damaged .*past_key_values.0.key"):
        read_prompt_cache(path, engine, 64)


def test_any_damaged_byte_is_refused(tmp_path, default_onnx):
    """A byte changed anywhere (header length, header JSON, metadata, token ids, KV) is one
    PromptCacheError, never another exception and never a cache that loads."""
    import random

    from lmforge.prompt_cache import PromptCacheError

    engine = OrtEngine(default_onnx, threads=2)
    prefix = PrefixCache()
    list(stream_generate(engine, None, list(range(100, 106)), SamplingParams(max_tokens=2), (), prefix))
    path = tmp_path / "c.cache"
    write_prompt_cache(path, engine, prefix)
    good = path.read_bytes()
    header = int.from_bytes(good[:8], "little") + 8
    rng = random.Random(5)
    spots = [rng.randrange(header) for _ in range(150)] + [rng.randrange(header, len(good)) for _ in range(50)]
    for spot in spots:
        data = bytearray(good)
        data[spot] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        if data[spot] in b" \t\n\r" and good[spot] in b" \t\n\r":
            continue  # JSON whitespace for JSON whitespace: the same file
        with pytest.raises(PromptCacheError):
            read_prompt_cache(path, engine, 16)
