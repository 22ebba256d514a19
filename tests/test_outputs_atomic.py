"""Outputs are never mixed or partial (issue 17): `convert --force` killed at random moments
leaves the old complete folder or the new complete one; leftovers of killed runs go with the
next run; read-only and full destinations (a path under /proc, RLIMIT_FSIZE in the child) end
in one line and exit 2 with nothing partial, for convert (ONNX, GGUF, HF), batch and the cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.export.convert import convert
from lmforge.model import NO_TEMPLATE_RAW
from tests import fuzzing, tiny
from tests.test_errors import assert_user_error

PROC = Path("/proc")  # exists; nothing can be created in it


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two tiny llamas with the same tokenizer and different weights (A: the fuzz seed, B: seed 1)."""
    root = tmp_path_factory.mktemp("atomic")
    a, _ = fuzzing.build_seeds(root)
    b = tiny.build(root / "seed-b", "llama", tokenizers={"bpe": root / "tok"}, seed=1)
    return a, b


def digest(folder: Path) -> dict[str, str]:
    """{file: sha256} of an output folder, lmforge.json's timing and paths left out."""
    out = {}
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.name == "lmforge.json":
            meta = json.loads(data)
            data = json.dumps({k: v for k, v in meta.items() if k != "seconds"}).encode()
        out[f.name] = hashlib.sha256(data).hexdigest()
    return out


def cli(*args, env=None, limit: int | None = None, timeout=300):
    """`lmforge ARGS` in a child process; `limit`: its RLIMIT_FSIZE in bytes."""

    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "lmforge", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
        timeout=timeout,
    )


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.slow
def test_force_killed_at_20_moments_never_leaves_a_mixed_folder(sources, tmp_path):
    out = tmp_path / "out"
    refs = {}
    for name, src in zip("AB", sources):  # each source's complete output, for reference
        convert(src, tmp_path / f"ref-{name}", progress=False)
        refs[name] = digest(tmp_path / f"ref-{name}")
    assert refs["A"] != refs["B"] and set(refs["A"]) == set(refs["B"])
    convert(sources[0], out, progress=False)
    env = {**os.environ, "LMFORGE_TEST_SLOW_REPLACE": "0.4"}  # 0.4 s before and after the swap
    rng, seen = random.Random(17), []
    for i in range(20):
        cmd = [sys.executable, "-m", "lmforge", "convert", str(sources[i % 2]), "-o", str(out), "--force"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = tmp_path / f".out.tmp-{proc.pid}" / "lmforge.json"  # written last: the replacement begins
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.0))  # a moment before, during or after the replacement
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = digest(out) if out.exists() else None
        assert state in (refs["A"], refs["B"]), f"kill {i}: a mixed or missing output {state}"
        seen.append("A" if state == refs["A"] else "B")
    print("states after the kills:", "".join(seen))
    assert set(seen) == {"A", "B"}  # kills fell before and after the swap
    r = cli("convert", sources[0], "-o", out, "--force")
    assert r.returncode == 0, r.stderr
    assert digest(out) == refs["A"]
    assert hidden(tmp_path) == [], "leftovers of killed runs stay"


def test_leftovers_of_killed_runs_are_removed(sources, tmp_path):
    """A GGUF conversion killed mid-write leaves a hidden temporary file; the next run removes it."""
    out = tmp_path / "m.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its temporary files are stale
    (tmp_path / f".m.gguf.tmp-{pid}").write_bytes(b"GGUF" + b"\0" * 1000)
    (tmp_path / f".onnx.tmp-{pid}").mkdir()
    (tmp_path / f".onnx.tmp-{pid}" / "model.onnx.data").write_bytes(b"\0" * 1000)
    r = cli("convert", sources[0], "-o", out, "--gguf", "q8_0")
    assert r.returncode == 0, r.stderr
    r = cli("convert", sources[0], "-o", tmp_path / "onnx")
    assert r.returncode == 0, r.stderr
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("form", [[], ["--gguf", "q8_0"], ["--hf"]], ids=["onnx", "gguf", "hf"])
def test_unwritable_destination(form, sources, tmp_path):
    r = cli("convert", sources[0], "-o", PROC / "lmforge-out", *form)
    assert_user_error(r, "cannot write")


@pytest.mark.parametrize("form", [[], ["--gguf", "q8_0"], ["--hf"]], ids=["onnx", "gguf", "hf"])
def test_full_destination(form, sources, tmp_path):
    """The disk fills (RLIMIT_FSIZE 64 KiB: the weights do not fit): one line, nothing left."""
    out = tmp_path / "out"
    r = cli("convert", sources[0], "-o", out, *form, limit=64 << 10)
    assert_user_error(r, "cannot write")
    assert "too large" in r.stderr.lower()
    assert sorted(os.listdir(tmp_path)) == []


def test_full_destination_keeps_the_old_output(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources[0], out, progress=False)
    before = digest(out)
    r = cli("convert", sources[1], "-o", out, "--force", limit=64 << 10)
    assert_user_error(r, "File too large")
    assert digest(out) == before and hidden(tmp_path) == []


def test_batch_to_a_full_or_unwritable_destination(sources, tmp_path):
    model = convert(sources[0], tmp_path / "m", progress=False)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"Say {i}", "max_tokens": 4}) + "\n" for i in range(20)))
    assert_user_error(cli("batch", model, inp, "-o", PROC / "out.jsonl"), "cannot write")
    out = tmp_path / "out.jsonl"
    r = cli("batch", model, inp, "-o", out, limit=700)
    # this tiny model has no chat template: the rows ran as raw text, which batch says once first
    said = r.stderr.splitlines()
    assert said[0] == f"lmforge: warning: {NO_TEMPLATE_RAW}", r.stderr
    r.stderr = "\n".join(said[1:])
    assert_user_error(r, "cannot write", "File too large")
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < len(data) <= 700  # whole records only, no torn line
    done = [json.loads(line) for line in data.splitlines()]
    assert [d["id"] for d in done] == list(range(len(done)))
    r = cli("batch", model, inp, "-o", out)  # rerun with room: resumes after the last record
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == list(range(20))


def test_cache_unwritable_or_full(sources, tmp_path):
    r = cli("run", sources[0], "-p", "hi", "--max-tokens", "2", env={"LMFORGE_HOME": str(PROC / "lmforge-home")})
    assert_user_error(r, "cannot write", "LMFORGE_HOME")
    home = tmp_path / "home"
    r = cli("run", sources[0], "-p", "hi", "--max-tokens", "2", env={"LMFORGE_HOME": str(home)}, limit=64 << 10)
    assert_user_error(r, "File too large", "LMFORGE_HOME")
    leftovers = [p for p in (home / "onnx").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_replace_without_an_atomic_exchange(tmp_path, monkeypatch):
    """Where renameat2 is missing, the old output is parked under a hidden name first; a kill
    between the two renames leaves it there, and the next writer puts it back whole."""
    from lmforge.export import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    for version in ("old", "new"):
        with atomic.atomic_folder(out) as tmp:
            (tmp / "weights").write_text(version)
            (tmp / "tokenizer.json").write_text(version)
    assert {f.name: f.read_text() for f in out.iterdir()} == {"weights": "new", "tokenizer.json": "new"}
    assert hidden(tmp_path) == []
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    out.rename(tmp_path / f".out.old-{dead}")  # as a kill between the renames leaves it
    atomic.clean_stale(out)
    assert (out / "weights").read_text() == "new" and hidden(tmp_path) == []


def test_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    """Without renameat2, a failure of the rename that puts the new folder at OUT (after the old
    one was parked) leaves OUT the old complete output, not missing until a later write."""
    import errno

    from lmforge.errors import LmforgeError
    from lmforge.export import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic.atomic_folder(out) as tmp:
        (tmp / "weights").write_text("old")
    real = os.replace

    def failing(src, dst):
        if ".tmp-" in str(src):  # the new folder to OUT: as a full or failing disk refuses it
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises((OSError, LmforgeError)):
        with atomic.atomic_folder(out) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old" and hidden(tmp_path) == []


def test_stale_cleaning_reads_the_name_literally(tmp_path):
    """OUT named with glob characters (`m?`) does not take another output's parked folder
    (`.mx.old-PID` of a killed write to `mx`) nor remove its temporaries."""
    from lmforge.export import atomic

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    parked, temp = tmp_path / f".mx.old-{dead}", tmp_path / f".mx.tmp-{dead}"
    parked.mkdir()
    (parked / "weights").write_text("mx")
    temp.mkdir()
    for name in ("m?", "m*", "[m]x"):
        atomic.clean_stale(tmp_path / name)
        assert not (tmp_path / name).exists() and parked.is_dir() and temp.is_dir(), name
    atomic.clean_stale(tmp_path / "mx")  # its own writer's leftovers: restored and removed
    assert (tmp_path / "mx" / "weights").read_text() == "mx" and hidden(tmp_path) == []
