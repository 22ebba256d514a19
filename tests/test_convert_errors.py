"""Bad input around conversion and running: one line, exit code 2, nothing half-written."""

import shutil
import signal
import subprocess
import sys
import time

import pytest

from lmforge.export.convert import convert
from tests.test_errors import assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiny_llama(tiny_factory):
    return tiny_factory(("llama", "float32", False, None))


def test_unknown_target(tiny_llama, tmp_path):
    assert_user_error(
        run_cli("convert", tiny_llama, "-o", tmp_path / "out", "--target", "tpu-int3"),
        "unknown target 'tpu-int3'",
        "cpu-fp32",
    )
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", tiny_llama, "-o", out).returncode == 0
    (out / "keep.txt").write_text("stale")
    assert_user_error(run_cli("convert", tiny_llama, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "stale"
    r = run_cli("convert", tiny_llama, "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()


def test_force_never_replaces_what_lmforge_did_not_write(tiny_llama, tmp_path):
    """--force replaces a previous output only: never a folder of the user's, the source, the
    current folder or a file."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert_user_error(run_cli("convert", tiny_llama, "-o", mine, "--force"), "not a folder lmforge wrote")
    assert (mine / "thesis.tex").read_text() == "precious"
    assert_user_error(run_cli("convert", tiny_llama, "-o", ".", "--force", cwd=tmp_path), "current folder")
    assert_user_error(run_cli("convert", tiny_llama, "-o", tiny_llama, "--force"), "the source")
    assert_user_error(run_cli("convert", tiny_llama, "-o", tiny_llama.parent, "--force"), "the source")
    (tmp_path / "file.onnx").write_text("x")
    assert_user_error(run_cli("convert", tiny_llama, "-o", tmp_path / "file.onnx", "--force"), "is a file")
    assert (tiny_llama / "config.json").exists() and (mine / "thesis.tex").exists()


def test_output_parent_missing(tiny_llama, tmp_path):
    assert_user_error(run_cli("convert", tiny_llama, "-o", tmp_path / "no" / "such" / "out"), "does not exist")


def test_killed_conversion_leaves_nothing_complete(default_model_path, tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "convert", "smollm2-135m", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    data = None
    while time.time() < deadline:  # wait until weights are being written
        tmp = list(tmp_path.glob(".model.tmp-*"))
        data = tmp[0] / "model.onnx.data" if tmp else None
        if data and data.exists() and data.stat().st_size > 20_000_000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert data is not None, "conversion never started writing"
    assert not out.exists()
    assert list(tmp_path.glob(".model.tmp-*"))  # the leftover is hidden and marked temporary
    r = run_cli("convert", "smollm2-135m", "-o", out)
    assert r.returncode == 0, r.stderr
    assert (out / "lmforge.json").exists() and not list(tmp_path.glob(".model.tmp-*"))


def test_missing_external_data(tiny_llama, tmp_path):
    out = convert(tiny_llama, tmp_path / "m", progress=False)
    (out / "model.onnx.data").unlink()
    assert_user_error(run_cli("run", out, "-p", "hi"), "lacks model.onnx.data", "convert")
    shutil.copy(out / "model.onnx", out / "model.onnx.data")  # present but wrong size
    assert_user_error(run_cli("run", out, "-p", "hi"), "expected", "convert")


def test_cuda_without_onnxruntime_gpu(tiny_llama, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    out = convert(tiny_llama, tmp_path / "m", progress=False)
    assert_user_error(run_cli("run", out, "-p", "hi", "--device", "cuda"), "pip install onnxruntime-gpu")


def test_tokenizer_longer_than_the_embedding(tiny_llama, tmp_path):
    """A tokenizer with ids past the embedding's rows (another model's tokenizer) is refused before
    anything is written: llama.cpp would refuse the file when loading it."""
    import json

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    rows = json.loads((src / "config.json").read_text())["vocab_size"]
    tok = json.loads((src / "tokenizer.json").read_text())
    extra = {"content": "<|extra|>", "single_word": False, "lstrip": False, "rstrip": False}
    tok["added_tokens"].append({"id": rows + 3, **extra, "normalized": False, "special": True})
    (src / "tokenizer.json").write_text(json.dumps(tok))
    assert_user_error(run_cli("convert", src, "-o", tmp_path / "m.gguf", "--gguf", "f32"), "does not belong")
    assert not (tmp_path / "m.gguf").exists()
