"""What Hub ids and catalogue names mean, decided from a repo's file list (no server needed):
the forms `llama-cli -hf`, Ollama and onnxruntime-genai users type, on the file lists of the
published Phi-3 repos; the catalogue against lmforge's architectures."""

import io
import re

import pytest

from lmforge.arch import get_arch
from lmforge.checkpoint.hub import HubRef, parse_hub_id, plan_files
from lmforge.checkpoint.source import hub_ref
from lmforge.errors import CheckpointError, ModelNotFoundError
from lmforge.registry import CATALOGUE, PINNED, did_you_mean, names

# file lists as microsoft/Phi-3-mini-4k-instruct{,-gguf,-onnx} and mistralai/Mistral-7B-Instruct-v0.3 publish them
PHI3 = [
    ".gitattributes", "README.md", "config.json", "configuration_phi3.py", "modeling_phi3.py", "generation_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
    "added_tokens.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "sample_finetune.py",
]  # fmt: skip
PHI3_GGUF = ["README.md", "Phi-3-mini-4k-instruct-q4.gguf", "Phi-3-mini-4k-instruct-fp16.gguf", "Modelfile_q4"]
PHI3_ONNX = [
    f"{d}/{f}"
    for d in (
        "cpu_and_mobile/cpu-int4-rtn-block-32",
        "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4",
        "cuda/cuda-fp16",
        "cuda/cuda-int4-rtn-block-32",
        "directml/directml-int4-awq-block-128",
    )
    for f in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json")
] + ["README.md"]
MISTRAL = ["config.json", "consolidated.safetensors", "model.safetensors.index.json", "params.json",
           "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
           "tokenizer.json", "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json"]  # fmt: skip


def test_parse_hub_ids():
    assert parse_hub_id("microsoft/Phi-3-mini-4k-instruct") == HubRef("microsoft/Phi-3-mini-4k-instruct")
    assert parse_hub_id("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_hub_id("hf.co/org/name-GGUF:Q4_K_M") == HubRef("org/name-GGUF", tag="Q4_K_M")
    assert parse_hub_id("org/name/sub/file-q4.gguf") == HubRef("org/name", file="sub/file-q4.gguf")
    assert parse_hub_id("org/name-onnx:cuda/cuda-fp16") == HubRef("org/name-onnx", tag="cuda/cuda-fp16")
    for not_hub in ("./org/name", "/abs/path", "~/models/x", "name", "a/b/c", "org/name:"):
        assert parse_hub_id(not_hub) is None, not_hub


def test_safetensors_repo_takes_config_tokenizer_and_index_only():
    plan = plan_files(HubRef("microsoft/Phi-3-mini-4k-instruct"), PHI3)
    assert plan.kind == "hf" and plan.files[0] == "config.json"
    assert set(plan.files) == {
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
    }  # fmt: skip  -- never *.py, never README; shards come from the index
    assert "consolidated.safetensors" not in plan_files(HubRef("mistralai/Mistral-7B-Instruct-v0.3"), MISTRAL).files


def test_gguf_repo_quants():
    ref = HubRef("microsoft/Phi-3-mini-4k-instruct-gguf")
    assert plan_files(HubRef(ref.repo, tag="q4"), PHI3_GGUF).files == ["Phi-3-mini-4k-instruct-q4.gguf"]
    assert plan_files(HubRef(ref.repo, tag="FP16"), PHI3_GGUF).root == "Phi-3-mini-4k-instruct-fp16.gguf"
    with pytest.raises(ModelNotFoundError, match="Q4_K_M.*q4.gguf"):
        plan_files(ref, PHI3_GGUF)  # no default quant among two files: say which exist
    assert plan_files(ref, ["x-Q8_0.gguf", "x-Q4_K_M.gguf"]).files == ["x-Q4_K_M.gguf"]
    with pytest.raises(CheckpointError, match="split GGUF"):
        plan_files(HubRef("o/n", tag="Q8_0"), ["x-Q8_0-00001-of-00002.gguf", "x-Q8_0-00002-of-00002.gguf"])


def test_onnx_repo_folders():
    repo = "microsoft/Phi-3-mini-4k-instruct-onnx"
    plan = plan_files(HubRef(repo, tag="cuda-fp16"), PHI3_ONNX)
    assert plan.kind == "onnx" and plan.root == "cuda/cuda-fp16" and len(plan.files) == 5
    assert plan_files(HubRef(repo, tag="cpu_and_mobile/cpu-int4-rtn-block-32"), PHI3_ONNX).root.endswith("32")
    assert plan_files(HubRef(repo, tag="directml"), PHI3_ONNX).root == "directml/directml-int4-awq-block-128"
    with pytest.raises(ModelNotFoundError, match="more than one"):
        plan_files(HubRef(repo, tag="cpu-int4"), PHI3_ONNX)
    with pytest.raises(ModelNotFoundError, match="cuda/cuda-fp16"):
        plan_files(HubRef(repo), PHI3_ONNX)


def test_pickle_only_repo_refused():
    with pytest.raises(CheckpointError, match="pickle"):
        plan_files(HubRef("o/n"), ["config.json", "pytorch_model.bin", "tokenizer.json"])


def test_catalogue():
    for entry in CATALOGUE.values():
        assert get_arch(entry.arch).name == entry.arch  # only families lmforge runs
        assert parse_hub_id(entry.hub_id) == HubRef(entry.repo, entry.revision)
    assert hub_ref("phi-3-mini-4k") == HubRef("microsoft/Phi-3-mini-4k-instruct", PINNED["phi-3-mini-4k"])
    assert hub_ref("phi-3-mini-128k") == HubRef("microsoft/Phi-3-mini-128k-instruct", "main")  # none pinned yet
    assert all(re.fullmatch("[0-9a-f]{40}", c) for c in PINNED.values()) and set(PINNED) <= set(names())
    assert hub_ref("phi-3-mini-4k@abc123") == HubRef("microsoft/Phi-3-mini-4k-instruct", "abc123")
    assert did_you_mean("Phi-3-Mini-4K") == "phi-3-mini-4k"
    assert did_you_mean("qwen2.5-0.5") == "qwen2.5-0.5b"
    assert did_you_mean("smollm2-135") == "smollm2-135m"
    assert did_you_mean("gpt-4") is None


def test_download_bar_follows_the_progress_rule():
    from lmforge.progress import tqdm_class

    out = io.StringIO()
    bar = tqdm_class(True)(total=10, file=out, name="huggingface_hub.http_get")
    bar.update(10)
    bar.close()
    assert "10/10" in out.getvalue()
    assert tqdm_class(False)(total=10, file=io.StringIO()).disable
