"""CUDA checks: run only where ONNX Runtime has the CUDA provider (scripts/gpu_check.sh)."""

import pytest

from lmforge.export.convert import convert
from lmforge.generate import greedy_tokens
from lmforge.runtime.ort import OrtEngine
from tests.test_onnx_parity import prompt_ids, rel_err


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="no CUDA execution provider here")]


@pytest.mark.parametrize("target,tol", [("cuda-fp16", 1e-2), ("cuda-int4", 0.25)])
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_cuda_targets_match_cpu_fp32(arch, target, tol, tiny_factory, tmp_path):
    src = tiny_factory((arch, "float32", False, None))
    gpu = OrtEngine(convert(src, tmp_path / target, target=target, progress=False), device="cuda")
    cpu = OrtEngine(convert(src, tmp_path / "fp32", progress=False))
    ids = prompt_ids(24, cpu.vocab_size, 13)
    a = gpu.prefill(gpu.new_cache(1, 32), [ids])[0]
    b = cpu.prefill(cpu.new_cache(1, 32), [ids])[0]
    assert rel_err(a, b) <= tol


def test_default_model_on_cuda_fp16_greedy(tmp_path):
    gpu = OrtEngine(convert("smollm2-135m", tmp_path / "fp16", target="cuda-fp16", progress=False), device="cuda")
    cpu = OrtEngine(convert("smollm2-135m", tmp_path / "fp32", progress=False))
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    assert greedy_tokens(gpu, ids, 8) == greedy_tokens(cpu, ids, 8)
