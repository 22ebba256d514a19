"""Hub sources through the real `huggingface_hub` client against a local Hub (tests/hub_server.py):
download + convert + run for each form, revision pinning, resume, offline mode, gated repos,
and refusals that happen before a single weight byte is served."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import FakeHub
from tests.test_errors import assert_user_error

ROOT = Path(__file__).resolve().parents[1]
SMOL_Q4_1 = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture(scope="module")
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def home(tmp_path):
    """Fresh HF and lmforge caches for one test."""
    return tmp_path


def lmforge(hub, home, *args, offline=False, token=None, cwd=None, background=False, env_extra=None):
    """`python -m lmforge ARGS` as a user runs it, with the Hub at the fake server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        LMFORGE_HOME=str(home / "lmforge"),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    if token:
        env["HF_TOKEN"] = token
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "lmforge", *map(str, args)]
    if background:  # the running process, for a test to stop
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd or home)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd or home)


def ok(r):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_files(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def tiny_llama(tiny_factory):
    return tiny_factory(("llama", "float32", False, None))


@pytest.fixture(scope="module")
def tiny_repo(hub, tiny_llama):
    """A safetensors repo as the Hub holds them: checkpoint, tokenizer, plus files lmforge must skip."""
    files = {**folder_files(tiny_llama), "README.md": b"# tiny", "pytorch_model.bin": b"PICKLE" * 100}
    files["original/consolidated.00.pth"] = b"PICKLE" * 100
    hub.add("tiny-org/tiny-llama", files)
    return tiny_llama


def run_text(hub, home, model, *extra, offline=False):
    r = ok(lmforge(hub, home, "run", model, "-p", "Hello", "--raw", "--max-tokens", "6", *extra, offline=offline))
    return r.stdout


def test_safetensors_repo_pull_convert_run(hub, home, tiny_repo):
    before = hub.weight_bytes
    r = ok(lmforge(hub, home, "pull", "tiny-org/tiny-llama"))
    snapshot = Path(r.stdout.strip().splitlines()[-1])
    fetched = sorted(p.name for p in snapshot.rglob("*"))
    expected = sorted(n for n in os.listdir(tiny_repo) if (tiny_repo / n).is_file())
    assert fetched == expected  # config, tokenizer, safetensors: no pickle, no README, no original/
    weights = sum((tiny_repo / n).stat().st_size for n in expected if n.endswith(".safetensors"))
    assert hub.weight_bytes - before == weights
    for name in expected:
        assert sha256(snapshot / name) == sha256(tiny_repo / name)
    ok(lmforge(hub, home, "pull", "tiny-org/tiny-llama"))  # the cache is reused
    assert hub.weight_bytes - before == weights
    # the Hub id gives what the local folder gives
    assert run_text(hub, home, "tiny-org/tiny-llama") == run_text(hub, home, tiny_repo)
    # the form run makes by default
    ok(lmforge(hub, home, "convert", "tiny-org/tiny-llama", "-o", home / "out", "--target", "cpu-int4"))
    assert run_text(hub, home, home / "out") == run_text(hub, home, tiny_repo)
    hub_json = json.loads(ok(lmforge(hub, home, "inspect", "tiny-org/tiny-llama", "--json")).stdout)
    local_json = json.loads(ok(lmforge(hub, home, "inspect", tiny_repo, "--json")).stdout)
    assert {**hub_json, "path": ""} == {**local_json, "path": ""}


@pytest.fixture(scope="module")
def gguf_repo(hub, default_model_path):
    hub.add(
        "gguf-org/SmolLM2-135M-Instruct-GGUF",
        {SMOL_Q4_1: default_model_path, "SmolLM2-135M-Instruct-Q8_0.gguf": b"GGUF" + b"\0" * 1000, "README.md": b"x"},
    )
    return default_model_path


def test_gguf_repo_quant_and_file(hub, home, gguf_repo):
    before = hub.weight_bytes
    r = ok(lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1"))
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.name == SMOL_Q4_1 and sha256(path) == sha256(gguf_repo)
    assert hub.weight_bytes - before == gguf_repo.stat().st_size  # that quant only
    same = ok(lmforge(hub, home, "pull", f"gguf-org/SmolLM2-135M-Instruct-GGUF/{SMOL_Q4_1}"))
    assert Path(same.stdout.strip().splitlines()[-1]) == path
    r = ok(
        lmforge(
            hub,
            home,
            *("run", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1", "-p", "What is the capital of France?"),
            *("--engine", "ort", "--target", "cpu-fp32", "--max-tokens", "12"),
        )
    )
    assert "Paris" in r.stdout  # FACTS.md: the fp32 path of the default model says so
    # two quants, none of them the default Q4_K_M: the user is told which exist
    r = lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF")
    assert_user_error(r, "Q4_K_M", SMOL_Q4_1, "Q8_0")
    assert_user_error(lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q5_K_S"), "no GGUF quant")


@pytest.fixture(scope="module")
def onnx_repo(hub, tiny_llama, tmp_path_factory):
    """An onnxruntime-genai repo: one folder per configuration, as microsoft/*-onnx repos hold them."""
    from lmforge.export.convert import convert

    folder = convert(tiny_llama, tmp_path_factory.mktemp("onnx") / "cpu-fp32", target="cpu-fp32", progress=False)
    files = {f"cpu_and_mobile/cpu-fp32/{n}": p for n, p in folder_files(folder).items()}
    files["cuda/cuda-fp16/genai_config.json"] = b"{}"
    files["cuda/cuda-fp16/model.onnx.data"] = b"\0" * 5000
    hub.add("onnx-org/tiny-llama-onnx", {**files, "README.md": b"x"})
    return folder


def test_onnx_repo_subfolder(hub, home, onnx_repo):
    before = hub.weight_bytes
    r = ok(lmforge(hub, home, "pull", "onnx-org/tiny-llama-onnx:cpu-fp32"))
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.name == "cpu-fp32" and sorted(folder_files(path)) == sorted(folder_files(onnx_repo))
    weights = sum(p.stat().st_size for p in folder_files(onnx_repo).values() if p.name.endswith((".onnx", ".data")))
    assert hub.weight_bytes - before == weights  # nothing of the cuda folder
    assert run_text(hub, home, "onnx-org/tiny-llama-onnx:cpu_and_mobile/cpu-fp32") == run_text(hub, home, onnx_repo)
    assert not (home / "lmforge" / "onnx").exists()  # an ONNX folder runs as it is: nothing converted
    # a repo of several folders, named without one: the user is told which exist
    assert_user_error(lmforge(hub, home, "run", "onnx-org/tiny-llama-onnx", "-p", "x"), "cuda/cuda-fp16")


@pytest.fixture(scope="module")
def two_revisions(hub, tiny_factory, tokenizer_folders, tmp_path_factory):
    """tiny-org/revs: commit A (tag v1) and commit B (main), with different weights."""
    from tests import tiny

    a = tiny_factory(("qwen2", "float32", False, None))
    b = tiny.build(tmp_path_factory.mktemp("rev-b"), "qwen2", tokenizers=tokenizer_folders, seed=7)
    commit_a = hub.add("tiny-org/revs", folder_files(a), refs=("v1",))
    commit_b = hub.add("tiny-org/revs", folder_files(b), refs=("main",))
    return {"a": (a, commit_a), "b": (b, commit_b)}


def test_revision_pinning(hub, home, two_revisions):
    (a, commit_a), (b, commit_b) = two_revisions["a"], two_revisions["b"]
    for model, commit, local in (
        ("tiny-org/revs", commit_b, b),
        ("tiny-org/revs@v1", commit_a, a),
        (f"tiny-org/revs@{commit_a}", commit_a, a),
    ):
        snapshot = Path(ok(lmforge(hub, home, "pull", model)).stdout.strip().splitlines()[-1])
        assert snapshot.name == commit
        assert sha256(snapshot / "model.safetensors") == sha256(local / "model.safetensors")
    assert run_text(hub, home, "tiny-org/revs@v1") == run_text(hub, home, a)
    assert run_text(hub, home, "tiny-org/revs") == run_text(hub, home, b)
    sources = {}  # converted forms are keyed by the source revision: one per commit
    for form in (home / "lmforge" / "onnx").iterdir():
        if form.is_dir():
            sources[form.name] = Path(json.loads((form / "lmforge.json").read_text())["source"]).name
    assert sorted(c for c in sources.values() if c in (commit_a, commit_b)) == sorted([commit_a, commit_b])
    assert all(c[:7] in name for name, c in sources.items() if c in (commit_a, commit_b))
    assert_user_error(lmforge(hub, home, "pull", "tiny-org/revs@v9"), "no revision 'v9'")


def test_download_cut_then_resumed(hub, home, gguf_repo):
    size = gguf_repo.stat().st_size
    key = f"gguf-org/SmolLM2-135M-Instruct-GGUF/{SMOL_Q4_1}"
    hub.cut[key] = size // 2  # the server closes the connection halfway through the file
    before, n_requests = hub.served.get(key, 0), len(hub.requests)
    path = Path(ok(lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1")).stdout.split()[-1])
    assert sha256(path) == sha256(gguf_repo)
    ranges = [rng for _, url, rng in hub.requests[n_requests:] if url.startswith("/cdn/") and rng]
    assert len(ranges) == 1  # resumed from what the client had written (whole chunks), not started over
    kept = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < kept <= size // 2
    assert hub.served[key] - before == size + (size // 2 - kept)


def test_download_killed_then_resumed_by_the_next_process(hub, home, gguf_repo):
    """huggingface_hub 2.x leaves a killed process's `ETAG.UUID.incomplete` in blobs/ and starts
    over; lmforge finishes that file with a Range request."""
    import signal
    import time

    size, key = gguf_repo.stat().st_size, f"gguf-org/SmolLM2-135M-Instruct-GGUF/{SMOL_Q4_1}"
    before, n_requests = hub.served.get(key, 0), len(hub.requests)
    hub.rate = size / 4  # about four seconds for the whole file
    try:
        child = lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1", background=True)
        while hub.served.get(key, 0) - before < size // 2 and child.poll() is None:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        hub.rate = None
    (partial,) = (home / "hf" / "hub").rglob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < size
    age(partial)  # left long enough ago that no process can still be writing it
    path = Path(ok(lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1")).stdout.split()[-1])
    assert sha256(path) == sha256(gguf_repo)
    ranges = [rng for _, url, rng in hub.requests[n_requests:] if url.startswith("/cdn/") and rng]
    assert ranges == [f"bytes={kept}-"]
    assert hub.served[key] - before < 1.5 * size
    assert not list((home / "hf" / "hub").rglob("*.incomplete"))
    # a partial file that is not a prefix of the blob is not trusted: the blob is fetched whole
    fresh = home / "fresh"
    blobs = fresh / "hf" / "hub" / "models--gguf-org--SmolLM2-135M-Instruct-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    age(blobs / f"{sha256(gguf_repo)}.0badf11e.incomplete", b"\1" * (size // 2))
    path = Path(ok(lmforge(hub, fresh, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1")).stdout.split()[-1])
    assert sha256(path) == sha256(gguf_repo) and not list(blobs.glob("*.incomplete"))


def age(path: Path, data: bytes | None = None, seconds: float = 600) -> Path:
    """PATH (written with DATA if given), last modified SECONDS ago."""
    import time

    if data is not None:
        path.write_bytes(data)
    os.utime(path, (time.time() - seconds, time.time() - seconds))
    return path


def cdn_ranges(hub, since: int) -> list[str]:
    return [rng for _, url, rng in hub.requests[since:] if url.startswith("/cdn/") and rng]


def test_young_partial_is_left_alone_and_a_cached_file_sends_no_head(hub, home, gguf_repo):
    """A partial file written to recently may be another process's live download (flock does not
    hold on Lustre, GPFS, some NFS): lmforge neither adopts nor deletes it. A stale one left in
    blobs/ costs no request for a file the cache holds under a pinned commit."""
    size, repo = gguf_repo.stat().st_size, "gguf-org/SmolLM2-135M-Instruct-GGUF"
    blobs = home / "hf" / "hub" / "models--gguf-org--SmolLM2-135M-Instruct-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    prefix = gguf_repo.read_bytes()[: size // 2]
    live = blobs / f"{sha256(gguf_repo)}.1ive0000.incomplete"
    live.write_bytes(prefix)
    n_requests = len(hub.requests)
    path = Path(ok(lmforge(hub, home, "pull", f"{repo}:Q4_1")).stdout.split()[-1])
    assert sha256(path) == sha256(gguf_repo)
    assert cdn_ranges(hub, n_requests) == []  # downloaded whole, beside the other process's file
    assert live.read_bytes() == prefix
    age(live)
    commit = hub.repos[repo].refs["main"]
    n_requests = len(hub.requests)
    assert Path(ok(lmforge(hub, home, "pull", f"{repo}@{commit}:Q4_1")).stdout.split()[-1]) == path
    assert [u for m, u, _ in hub.requests[n_requests:] if m == "HEAD" or "/resolve/" in u] == []
    assert live.read_bytes() == prefix  # not adopted: the file it would finish is cached


def test_partial_of_a_xet_file_is_not_adopted(hub, home):
    """What hf_xet leaves behind is not known to be a prefix of the blob: never adopted, never deleted."""
    repo, name = "xet-org/tiny-xet", "tiny-xet-Q8_0.gguf"
    data = b"GGUF" + bytes(range(256)) * 4096  # a blob of its own (the fake Hub keys blobs by sha256)
    hub.add(repo, {name: data})
    hub.xet.add(f"{repo}/{name}")
    blobs = home / "hf" / "hub" / "models--xet-org--tiny-xet" / "blobs"
    blobs.mkdir(parents=True)
    stale = age(blobs / f"{hashlib.sha256(data).hexdigest()}.0ld0xe70.incomplete", data[: len(data) // 2])
    n_requests = len(hub.requests)
    r = ok(lmforge(hub, home, "pull", f"{repo}/{name}", env_extra={"HF_HUB_DISABLE_XET": "1"}))
    assert Path(r.stdout.split()[-1]).read_bytes() == data
    assert cdn_ranges(hub, n_requests) == [] and stale.read_bytes() == data[: len(data) // 2]


def test_download_failure_is_one_line_and_leaves_nothing_half_done(hub, home, gguf_repo):
    key = f"gguf-org/SmolLM2-135M-Instruct-GGUF/{SMOL_Q4_1}"
    hub.cut[key], hub.fail_after_cut = gguf_repo.stat().st_size // 3, True  # cut, then the Hub fails (503)
    try:
        r = lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1")
    finally:
        hub.failing.discard(key)
        hub.fail_after_cut = False
    assert_user_error(r, "503", "run the command again")
    assert not list((home / "hf" / "hub").rglob(SMOL_Q4_1))  # no truncated file the next run would trust
    path = Path(ok(lmforge(hub, home, "pull", "gguf-org/SmolLM2-135M-Instruct-GGUF:Q4_1")).stdout.split()[-1])
    assert sha256(path) == sha256(gguf_repo)


def test_offline(hub, home, tiny_repo):
    r = lmforge(hub, home, "run", "tiny-org/tiny-llama", "-p", "Hello", offline=True)
    assert_user_error(r, "not in the Hub cache", "HF_HUB_OFFLINE=1", "lmforge pull tiny-org/tiny-llama")
    ok(lmforge(hub, home, "pull", "tiny-org/tiny-llama"))
    n_requests = len(hub.requests)
    text = run_text(hub, home, "tiny-org/tiny-llama", offline=True)
    assert text == run_text(hub, home, tiny_repo) and len(hub.requests) == n_requests  # the cache alone


def test_offline_catalogue_name_falls_back_to_the_cached_main(hub, home, tiny_llama):
    """A cache filled from `main` before the catalogue pinned its commits still serves offline;
    stderr says which revision is used."""
    from lmforge.registry import CATALOGUE

    entry = CATALOGUE["smollm2-360m"]
    main = hub.add(entry.repo, folder_files(tiny_llama))  # the Hub's `main` (the pin is not on this Hub)
    r = lmforge(hub, home, "run", "smollm2-360m", "-p", "Hello", offline=True)
    assert_user_error(r, "not in the Hub cache", "HF_HUB_OFFLINE=1", "lmforge pull")  # nothing cached: as before
    ok(lmforge(hub, home, "pull", entry.repo))
    n_requests = len(hub.requests)
    args = ("run", "smollm2-360m", "-p", "Hello", "--raw", "--max-tokens", "6")
    r = ok(lmforge(hub, home, *args, offline=True))
    assert r.stdout == run_text(hub, home, tiny_llama) and len(hub.requests) == n_requests
    assert f"pinned commit {entry.revision[:7]} is not in the Hub cache" in r.stderr
    assert f"using the cached main (commit {main[:7]}) of {entry.repo}" in r.stderr
    # a Hub id the user pinned to a commit is not swapped for another
    r = lmforge(hub, home, "run", f"{entry.repo}@{'0' * 40}", "-p", "Hello", offline=True)
    assert_user_error(r, "not in the Hub cache", "HF_HUB_OFFLINE=1")


def test_gated_repo_needs_login(hub, home, tiny_llama):
    hub.add("gated-org/tiny-gated", folder_files(tiny_llama), token="hf_secret")
    before = hub.weight_bytes
    r = lmforge(hub, home, "pull", "gated-org/tiny-gated")
    assert_user_error(r, "gated", "hf auth login", "HF_TOKEN")
    assert hub.weight_bytes == before
    ok(lmforge(hub, home, "pull", "gated-org/tiny-gated", token="hf_secret"))
    assert_user_error(lmforge(hub, home, "pull", "no-org/no-such-model"), "no-org/no-such-model", "hf auth login")


def test_refused_before_any_weight_byte(hub, home, tiny_llama):
    config = (tiny_llama / "config.json").read_bytes()
    hub.add("pickle-org/only-pickles", {"config.json": config, "pytorch_model.bin": b"PICKLE" * 1000})
    neox = json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}).encode()
    hub.add("neox-org/tiny-neox", {"config.json": neox, "model.safetensors": b"\0" * 4000})
    before, n_requests = hub.weight_bytes, len(hub.requests)
    assert_user_error(lmforge(hub, home, "convert", "pickle-org/only-pickles", "-o", home / "o"), "pickle")
    assert_user_error(lmforge(hub, home, "run", "neox-org/tiny-neox", "-p", "x"), "gpt_neox", "supports")
    assert hub.weight_bytes == before
    assert not any(url.endswith((".bin", ".safetensors")) or "/cdn/" in url for _, url, _ in hub.requests[n_requests:])


def test_local_path_wins_and_did_you_mean(hub, home, tiny_llama):
    import shutil

    shutil.copytree(tiny_llama, home / "tiny-org" / "tiny-llama")
    n_requests = len(hub.requests)
    ok(lmforge(hub, home, "inspect", "tiny-org/tiny-llama"))
    assert len(hub.requests) == n_requests
    assert_user_error(lmforge(hub, home, "run", "phi-3-mini4k", "-p", "x"), "did you mean 'phi-3-mini-4k'?")
    assert_user_error(lmforge(hub, home, "pull", "smollm2-1.7"), "did you mean 'smollm2-1.7b'?")


def test_models_and_rm(hub, home, tiny_repo):
    ok(lmforge(hub, home, "pull", "tiny-org/tiny-llama"))
    run_text(hub, home, "tiny-org/tiny-llama")
    report = json.loads(ok(lmforge(hub, home, "models", "--json")).stdout)
    names = [c["name"] for c in report["catalogue"]]
    assert names[0] == "smollm2-135m" and "phi-3-mini-4k" in names and "mistral-7b-v0.3" in names
    (download,) = report["downloads"]
    weights = sum(p.stat().st_size for p in tiny_repo.iterdir() if p.is_file())
    assert download["repo"] == "tiny-org/tiny-llama" and download["bytes"] == weights
    (form,) = report["forms"]
    assert form["repo"] == "tiny-org/tiny-llama" and form["target"] == "cpu-int4" and form["bytes"] > 0
    text = ok(lmforge(hub, home, "models")).stdout
    assert "phi-3-mini-4k" in text and "tiny-org/tiny-llama" in text and form["name"] in text
    r = ok(lmforge(hub, home, "rm", form["name"]))
    assert f"removed form {form['name']}" in r.stdout and not Path(form["path"]).exists()
    run_text(hub, home, "tiny-org/tiny-llama")  # converts again
    r = ok(lmforge(hub, home, "rm", "tiny-org/tiny-llama"))
    assert "removed form" in r.stdout and "removed download tiny-org/tiny-llama" in r.stdout
    report = json.loads(ok(lmforge(hub, home, "models", "--json")).stdout)
    assert report["downloads"] == [] and report["forms"] == []
    assert_user_error(lmforge(hub, home, "rm", "tiny-org/tiny-llama"), "nothing named", "lmforge models")
    assert_user_error(lmforge(hub, home, "rm", "no-such-form"), "nothing named")


def wikitext_zip(text: str) -> bytes:
    import io
    import zipfile

    from lmforge.evaluate import WIKITEXT2

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(WIKITEXT2[2], text.encode())
        z.writestr("wikitext-2-raw/wiki.train.raw", b"not this one")
    return buf.getvalue()


@pytest.fixture(scope="module")
def wikitext_repo(hub, wikitext):
    """The dataset repo llama.cpp's scripts/get-wikitext-2.sh fetches, holding a shortened text at
    the commit lmforge pins, and another text on `main` since."""
    from lmforge.evaluate import WIKITEXT2, WIKITEXT2_REVISION

    repo, name, _ = WIKITEXT2
    text = wikitext[:12000]
    hub.add(repo, {name: wikitext_zip(text), "README.md": b"ci data"}, refs=(), repo_type="dataset",
            commit=WIKITEXT2_REVISION)  # fmt: skip
    hub.add(repo, {name: wikitext_zip(wikitext[12000:24000]), "README.md": b"ci data"}, repo_type="dataset")
    return f"datasets/{repo}/{name}", text


def test_eval_default_text_moved_on_the_hub(home):
    """The Hub answers, and has no such repo, commit or file: said so, not "cannot be reached"."""
    from lmforge.evaluate import WIKITEXT2, WIKITEXT2_REVISION

    repo, name, _ = WIKITEXT2
    args = ("eval", "ppl", "smollm2-135m", "--ctx", "128", "--chunks", "3")
    alone = FakeHub()
    try:
        for publish in (
            None,  # no such repo
            lambda: alone.add(repo, {name: wikitext_zip("x")}, repo_type="dataset"),  # not at the pinned commit
            lambda: alone.add(repo, {"README.md": b"x"}, refs=(), repo_type="dataset", commit=WIKITEXT2_REVISION),
        ):
            if publish:
                publish()
            r = lmforge(alone, home, *args)
            assert_user_error(r, "WikiText-2", f"the Hub has no file {name} of Hub dataset {repo}", "--data FILE")
            assert "cannot be reached" not in r.stderr
    finally:
        alone.close()


def test_eval_default_text_from_the_hub(hub, home, wikitext_repo):
    key, text = wikitext_repo
    args = ("eval", "ppl", "smollm2-135m", "--ctx", "128", "--chunks", "3", "--json")
    r = lmforge(hub, home, *args, offline=True)
    assert_user_error(r, "WikiText-2", "not in the Hub cache", "HF_HUB_OFFLINE=1", "--data FILE")
    before = hub.served.get(key, 0)
    fetched = json.loads(ok(lmforge(hub, home, *args)).stdout)
    assert hub.served[key] > before  # downloaded once, into the Hub cache
    (home / "text.txt").write_bytes(text.encode())
    given = json.loads(ok(lmforge(hub, home, *args, "--data", home / "text.txt")).stdout)
    assert fetched["ppl"] == given["ppl"] and fetched["tokens_scored"] == given["tokens_scored"] > 0
    n_requests = len(hub.requests)
    cached = json.loads(ok(lmforge(hub, home, *args, offline=True)).stdout)
    assert cached["ppl"] == given["ppl"] and len(hub.requests) == n_requests  # the cache alone


def test_the_package_never_reads_the_project_tree():
    """An installed lmforge has no ../shared/ beside it: no module may refer to it."""
    import re

    pattern = re.compile(r"""["']shared["']|\.\./shared|shared/data|parents\[\d\]\.parent""")
    offenders = [p.name for p in (ROOT / "lmforge").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
