"""`lmforge inspect` on the default model and on tiny checkpoints, against config.json."""

import json
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)


def test_inspect_default_model_json():
    r = run_cli("inspect", "smollm2-135m", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (
        info["arch"],
        info["n_layers"],
        info["hidden_size"],
        info["n_heads"],
        info["n_kv_heads"],
        info["vocab_size"],
    ) == ("llama", 30, 576, 9, 3, 49152)
    assert info["head_dim"] == 64 and info["intermediate_size"] == 1536
    assert info["tied_embeddings"] is True and info["rope_theta"] == 100000.0
    # 210 Q4_1 + 1 Q8_0 + 61 F32 tensors, as llama.cpp's gguf-py lists them
    assert info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["n_tensors"] == 272
    assert 130e6 < info["n_params"] < 140e6


def test_inspect_tiny_matches_config(tiny_case):
    (arch, dtype, sharded, variant), folder = tiny_case
    r = run_cli("inspect", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = json.loads((folder / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert info["arch"] == arch
    assert info["n_layers"] == cfg["num_hidden_layers"]
    assert info["hidden_size"] == cfg["hidden_size"]
    assert info["n_heads"] == cfg["num_attention_heads"]
    assert info["n_kv_heads"] == cfg["num_key_value_heads"]
    assert info["head_dim"] == head_dim
    assert info["intermediate_size"] == cfg["intermediate_size"]
    assert info["vocab_size"] == cfg["vocab_size"]
    assert info["context_length"] == cfg["max_position_embeddings"]
    theta = cfg["rope_parameters"].get("full_attention", cfg["rope_parameters"])["rope_theta"]
    assert info["rope_theta"] == theta
    assert info["tied_embeddings"] == cfg["tie_word_embeddings"]
    assert info["tensor_types"] == {"BF16" if dtype == "bfloat16" else "F32": info["n_tensors"]}
    files = list(folder.glob("*.safetensors"))
    assert len(files) > 1 if sharded else len(files) == 1
    assert info["file_bytes"] == sum(f.stat().st_size for f in files)
    # n_params against transformers' own count (tied weights counted once)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
