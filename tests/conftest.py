"""Session fixtures: the default model, the WikiText-2 test text, and tiny random checkpoints."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import tiny

# Tests never reach a hub: everything they load is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# conversions that commands cache (run, eval, bench) go to a folder of the test session's own
if "LMFORGE_HOME" not in os.environ:  # removed when the session ends (each holds ~1 GB of conversions)
    os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-test-home-")
    atexit.register(shutil.rmtree, os.environ["LMFORGE_HOME"], ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Every architecture in fp32 and bf16, one sharded, plus Phi-3 longrope with partial rotary.
TINY_CASES = [
    ("llama", "float32", False, None),
    ("llama", "bfloat16", False, None),
    ("mistral", "float32", True, None),
    ("mistral", "bfloat16", False, None),
    ("qwen2", "float32", False, None),
    ("qwen2", "bfloat16", False, None),
    ("phi3", "float32", False, None),
    ("phi3", "bfloat16", False, None),
    ("phi3", "float32", False, "longrope"),
    ("gemma3", "float32", False, None),
    ("gemma3", "bfloat16", False, None),
]


def case_id(case) -> str:
    arch, dtype, sharded, variant = case
    return "-".join(
        x for x in (arch, "bf16" if dtype == "bfloat16" else "fp32", "sharded" if sharded else "", variant or "") if x
    )


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from lmforge.registry import DEFAULT_MODEL, known_model_path

    return known_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_onnx(tmp_path_factory):
    """The default model as cpu-fp32: model.onnx for lmforge, model.genai.onnx for onnxruntime-genai."""
    from lmforge.export.convert import convert

    return convert("smollm2-135m", tmp_path_factory.mktemp("default") / "cpu-fp32", progress=False)


@pytest.fixture(scope="session")
def wikitext() -> str:
    # newline="" keeps the file's CRLF line endings: they change tokenization.
    with open(WIKITEXT, encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> Path:
    return tiny.train_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory, default_model_path, spm_model) -> dict[str, Path]:
    """{"bpe": SmolLM2's tokenizer (from the default GGUF), "qwen2" / "gpt4o": the same vocabulary
    with Qwen2's / GPT-4o's pre-tokenizer, "spm": the trained SentencePiece one},
    each a folder with tokenizer.json + tokenizer_config.json (with a chat template)."""
    from lmforge.checkpoint import open_checkpoint

    root = tmp_path_factory.mktemp("tokenizers")
    ckpt = open_checkpoint(default_model_path)
    bpe = root / "bpe"
    bpe.mkdir()
    ckpt.tokenizer().save(bpe)
    cfg = json.loads((bpe / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ckpt.chat_template()
    (bpe / "tokenizer_config.json").write_text(json.dumps(cfg))
    # Qwen2's regex over SmolLM2's vocabulary: transformers' Qwen2 tokenizer class applies its
    # own pre-tokenizer, so the qwen2 checkpoint needs a tokenizer.json that agrees with it.
    from lmforge.checkpoint.gguf import read_metadata
    from lmforge.tokenizer import Tokenizer
    from tests.gguf_ref import bpe_vocab_meta, write_vocab_only

    meta = read_metadata(default_model_path)
    relabelled = write_vocab_only(root / "qwen2.gguf", bpe_vocab_meta(meta, "qwen2"), 49152)
    qwen2 = root / "qwen2"
    qwen2.mkdir()
    Tokenizer.from_gguf_metadata(read_metadata(relabelled)).save(qwen2)
    (qwen2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    # GPT-4o's o200k split (Phi-4-mini's) over the same vocabulary
    o200k = write_vocab_only(root / "gpt4o.gguf", bpe_vocab_meta(meta, "gpt-4o"), 49152)
    gpt4o = root / "gpt4o"
    gpt4o.mkdir()
    Tokenizer.from_gguf_metadata(read_metadata(o200k)).save(gpt4o)
    (gpt4o / "tokenizer_config.json").write_text(json.dumps(cfg))
    spm = root / "spm"
    hf = tiny.spm_hf_tokenizer(spm_model, root / "spm-src")
    hf.chat_template = ckpt.chat_template()
    hf.save_pretrained(spm)
    return {"bpe": bpe, "spm": spm, "qwen2": qwen2, "gpt4o": gpt4o}


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, tokenizer_folders):
    """build(case) -> folder of a tiny checkpoint; each case is built once per session."""
    built: dict[tuple, Path] = {}

    def build(case) -> Path:
        if case not in built:
            arch, dtype, sharded, variant = case
            folder = tmp_path_factory.mktemp(case_id(case))
            built[case] = tiny.build(folder, arch, dtype, sharded, variant, tokenizer_folders)
        return built[case]

    return build


@pytest.fixture(scope="session", params=TINY_CASES, ids=case_id)
def tiny_case(request, tiny_factory):
    """(case, folder) for each tiny checkpoint."""
    return request.param, tiny_factory(request.param)


@pytest.fixture(scope="session")
def int4_folder():
    """The default model as cpu-int4, converted once into the session's LMFORGE_HOME."""
    from lmforge.model import cached_onnx

    return cached_onnx("smollm2-135m", "cpu-int4", progress=False)


@pytest.fixture(scope="module")
def reference(int4_folder):
    """The same model in this process: each prompt generated alone (Model.generate/chat)."""
    from lmforge.model import load

    return load(int4_folder, threads=1)


@pytest.fixture(scope="module")
def server(int4_folder, tmp_path_factory):
    """`lmforge serve` on the int4 folder, one per test module. --max-batch 4 with more concurrent
    requests than that in the tests: some wait and join mid-flight."""
    from tests.test_server import NAME, Server

    s = Server(
        int4_folder,
        "--name",
        NAME,
        "--max-batch",
        4,
        "--threads",
        2,
        log=tmp_path_factory.mktemp("serve") / "serve.log",
    )
    yield s
    s.stop()
