"""`lmforge devices` against what ONNX Runtime, numpy's CPU dispatch and llama.cpp report."""

import json
import os

import pytest

from tests.test_errors import run_cli


def test_devices_json_agrees_with_the_libraries():
    import onnxruntime as ort
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_cpu

    r = run_cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["onnxruntime"]["providers"] == ort.get_available_providers()
    assert info["cpu"]["logical_cores"] == os.cpu_count()
    features = set(info["cpu"]["features"])
    for ours, theirs in (("avx2", "AVX2"), ("avx512f", "AVX512F"), ("fma", "FMA3"), ("avx512bw", "AVX512BW")):
        if theirs in numpy_cpu:
            assert (ours in features) == numpy_cpu[theirs], ours
    assert info["memory_bytes"] > info["available_bytes"] > 0
    if info["llama_cpp"] is not None:
        import llama_cpp

        assert info["llama_cpp"]["gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
    text = run_cli("devices").stdout
    assert "ONNX Runtime" in text and "CPU:" in text and "RAM:" in text


def test_recommend_fits_the_budget(tiny_factory):
    r = json.loads(run_cli("recommend", "smollm2-135m", "--memory", "0.6", "--json").stdout)
    assert r["recommended"] == "cpu-int4"  # a Q4_1 GGUF: int4 loses nothing more
    chosen = next(f for f in r["forms"] if f["target"] == "cpu-int4")
    assert chosen["fits"] and chosen["memory_bytes"] <= 0.6 * 2**30
    assert r["command"].startswith("lmforge convert smollm2-135m -o ") and r["command"].endswith("--target cpu-int4")
    r = json.loads(
        run_cli("recommend", str(tiny_factory(("llama", "float32", False, None))), "--memory", "8", "--json").stdout
    )
    assert r["recommended"] == "cpu-fp32"  # float source, room to spare: no quality cost
    from tests.test_errors import assert_user_error

    assert_user_error(run_cli("recommend", "smollm2-135m", "--memory", "0.2"), "fits in 0.2 GiB")


def test_recommend_picks_a_smaller_form_for_a_smaller_budget(tiny_factory):
    """A float source moves, as the budget shrinks, from cpu-fp32 to the GGUF types that cost the
    least perplexity (Q8_0, then Q4_K_M: +0.5% and +6% measured, where int4 RTN costs +27%)."""
    pytest.importorskip("llama_cpp")
    src = str(tiny_factory(("llama", "float32", False, None)))
    roomy = json.loads(run_cli("recommend", src, "--memory", "8", "--json").stdout)
    need = {f["target"]: f["memory_bytes"] for f in roomy["forms"]}
    assert roomy["recommended"] == "cpu-fp32"
    assert need["gguf-q4_k_m"] < need["gguf-q8_0"] < need["cpu-int4"] < need["cpu-fp32"]
    for low, high, expected in (("gguf-q8_0", "cpu-fp32", "gguf-q8_0"), ("gguf-q4_k_m", "gguf-q8_0", "gguf-q4_k_m")):
        budget = (need[low] + need[high]) / 2 / 2**30
        r = json.loads(run_cli("recommend", src, "--memory", f"{budget:.6f}", "--json").stdout)
        assert r["recommended"] == expected
        kind = expected.removeprefix("gguf-")
        assert r["command"].endswith(f".gguf --gguf {kind}") and r["command"].startswith(f"lmforge convert {src} -o ")


def test_recommend_and_eval_reject_bad_numbers():
    from tests.test_errors import assert_user_error

    assert_user_error(run_cli("recommend", "smollm2-135m", "--memory", "0"), "--memory must be more than 0")
    assert_user_error(run_cli("recommend", "smollm2-135m", "--context", "-5"), "--context must be at least 1")
    assert_user_error(run_cli("eval", "ppl", "smollm2-135m", "--chunks", "-1"), "--chunks must be at least 1")
