"""What this machine offers: ONNX Runtime's execution providers, GPUs, CPU features, memory,
and whether llama.cpp and onnxruntime-genai are installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import metadata

CPU_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "neon",
    "asimd",
    "sve",
)


def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and name == "unknown":
                    name = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return name, flags


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _mib(text: str) -> int | None:
    """nvidia-smi's MiB figure in bytes; None for "[N/A]" and the like."""
    try:
        return int(float(text)) << 20
    except ValueError:
        return None


def _gpus() -> list[dict]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in r.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "memory_bytes": _mib(parts[1]), "free_bytes": _mib(parts[2])})
    return gpus


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _llamacpp() -> dict | None:
    version = _version("llama_cpp_python")
    if version is None:
        return None
    info = {"version": version}
    try:
        import llama_cpp

        info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as e:  # a broken build should not hide the rest of the report
        info["error"] = str(e).splitlines()[0][:200]
    return info


def devices() -> dict:
    """A JSON-ready description of the machine, for `lmforge devices` and `recommend`."""
    import onnxruntime as ort

    name, flags = _cpuinfo()
    mem = _meminfo()
    return {
        "onnxruntime": {"version": ort.__version__, "providers": ort.get_available_providers()},
        "onnxruntime_genai": _version("onnxruntime-genai"),
        "gpus": _gpus(),
        "cpu": {"model": name, "logical_cores": os.cpu_count(), "features": [f for f in CPU_FEATURES if f in flags]},
        "memory_bytes": mem.get("MemTotal"),
        "available_bytes": mem.get("MemAvailable"),
        "llama_cpp": _llamacpp(),
    }


def describe(info: dict) -> str:
    """The report as lines of text."""
    gib = 2**30
    lines = [
        f"ONNX Runtime {info['onnxruntime']['version']}: {', '.join(info['onnxruntime']['providers'])}",
        f"onnxruntime-genai: {info['onnxruntime_genai'] or 'not installed'}",
    ]
    cpu = info["cpu"]
    features = " ".join(cpu["features"]) or "no SIMD flags read"
    lines.append(f"CPU: {cpu['model']}, {cpu['logical_cores']} logical cores, {features}")
    if info["memory_bytes"]:
        free = f", {info['available_bytes'] / gib:.1f} GiB available" if info["available_bytes"] else ""
        lines.append(f"RAM: {info['memory_bytes'] / gib:.1f} GiB{free}")
    for g in info["gpus"] or []:
        size = f"{g['memory_bytes'] / gib:.1f} GiB" if g["memory_bytes"] else "memory not reported"
        free = f" ({g['free_bytes'] / gib:.1f} free)" if g["free_bytes"] else ""
        lines.append(f"GPU: {g['name']}, {size}{free}")
    if not info["gpus"]:
        lines.append("GPU: none visible (no nvidia-smi)")
    lc = info["llama_cpp"]
    if lc is None:
        lines.append("llama.cpp: not installed (pip install 'lmforge[llamacpp]')")
    else:
        lines.append(
            f"llama.cpp: llama-cpp-python {lc['version']}, GPU offload {'yes' if lc.get('gpu_offload') else 'no'}"
        )
        if lc.get("system_info"):
            lines.append(f"  {lc['system_info']}")
    return "\n".join(lines)
